"""The demo's pretrained base model: where the shipped one lives and how it was made.

LoRA adapts what a model can already do; a randomly initialised model gives it nothing
to build on. So the demo ships a tiny Llama (`BASE_DIR`, about 2 MB, float32) that this
module pretrained on easy synthetic problems (mathgen, `easy=True`) in a plain format of
its own:

    Q: Solve for x: 3x + 2 = 11
    A: Subtract 2 from both sides: 3x = 9.
    Divide both sides by 3: x = 3.
    Answer: 3

It has never seen the chat format, DeepSeek-Math's instruction, a boxed answer, or any
of the demo's held-out test problems (kept apart by mathgen.problem_key, which ignores
wording). The demo's LoRA then has something real to teach: answer in the chat format
and box the answer, using the arithmetic the base already has, which is what a real
instruction-tuned model's LoRA does at a larger scale.

Pretraining this on two CPU cores would take hours (MLX's CPU matmul on Linux runs at a
few GFLOP/s), so it was made once on a GPU and committed, with its recipe and its
measured skill in `BASE_DIR/BUILD.json`:

    python -m mathlora_daemon.demo.base_model --out DIR --seconds 240
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent / "base"
BUILD_FILE = "BUILD.json"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json")
N_TRAIN, N_TEST = 600, 60  # the demo's LoRA train split and its held-out test split
TEST_SEED, TRAIN_SEED, POOL_SEED = 0, 1, 2
DIMS = dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256)
VOCAB = 1024
SEQ = 160  # model positions of a pretraining batch, unless a corpus text needs more


def demo_splits(n_train: int = N_TRAIN, n_test: int = N_TEST) -> tuple[list[dict], list[dict]]:
    """The demo's (train, test) problems: easy, deterministic, no test exercise in train."""
    from mathlora_daemon.demo.mathgen import generate_problems, problem_key

    test = generate_problems(n_test, TEST_SEED, easy=True)
    train = generate_problems(n_train, TRAIN_SEED, easy=True, exclude={problem_key(r) for r in test})
    return train, test


def chat_text(row: dict) -> str:
    """A row as the demo's chat format renders it (for training the tokenizer only)."""
    from mathlora_daemon.training.template import user_message

    return f"User: {user_message(row['problem'])}\n\nAssistant: {row['solution']}"


def copy_base(dest: Path) -> Path:
    """Copy the shipped base model's files into `dest` (0700 / 0600); return dest."""
    from mathlora_checkpoints.fsio import ensure_private_dir

    dest = ensure_private_dir(Path(dest))
    dest.chmod(0o700)
    for name in MODEL_FILES:
        shutil.copyfile(BASE_DIR / name, dest / name)
        (dest / name).chmod(0o600)
    return dest


def build(out: Path, seconds: float, max_steps: int, batch_size: int = 128, learning_rate: float = 3e-3,
          warmup: int = 200, seed: int = 0, dims: dict | None = None, vocab: int = VOCAB,
          eval_problems: int = N_TEST, log=print, init: Path | None = None, boxed: bool = False) -> dict:
    """Pretrain a base model into `out` for at most `seconds` of steps (and at most
    `max_steps`), from scratch or, with `init`, on from that model (its tokenizer kept),
    on the plain corpus (its solutions ending "Answer: N", or with `boxed` in the boxed
    final line); measure its skill on the demo's test split in its own format and in the
    chat format, and return (and write as BUILD.json, earlier stages kept) the recipe
    and the measurements."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    from mathlora_daemon.demo.assets import build_demo_model_dir
    from mathlora_daemon.demo.mathgen import KINDS, plain_text, problem_key, problem_pool
    from mathlora_daemon.training.model import save_safetensors_durable
    from mathlora_daemon.training.prepare import encode_example
    from mathlora_daemon.training.step import masked_loss

    dims = {**DIMS, **(dims or {})}
    started = time.monotonic()
    train, test = demo_splits()
    pool = problem_pool(POOL_SEED, exclude={problem_key(r) for r in test})
    by_kind = {k: [r for r in pool if r["kind"] == k] for k in KINDS}
    rng = np.random.default_rng(seed)
    out = Path(out)
    stages = []
    if init is None:
        picked = rng.choice(len(pool), size=min(len(pool), 6000), replace=False)
        tokenizer_texts = [plain_text(pool[i]) for i in picked]
        tokenizer_texts += [chat_text(r) for r in train]
        build_demo_model_dir(out, tokenizer_texts, seed=seed, vocab_size=vocab, max_position_embeddings=512, **dims)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for name in MODEL_FILES:
            shutil.copyfile(Path(init) / name, out / name)
        if (Path(init) / BUILD_FILE).is_file():
            earlier = json.loads((Path(init) / BUILD_FILE).read_text())
            stages = earlier.pop("stages", []) + [earlier]
        dims = {k: v for k, v in json.loads((out / "config.json").read_text()).items()
                if k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")}
    model, tokenizer = load(str(out))
    encoded = {k: [np.asarray(encode_example(tokenizer, plain_text(r, boxed)), np.int32) for r in rows]
               for k, rows in by_kind.items()}
    longest = max(len(s) for seqs in encoded.values() for s in seqs)
    seq = max(SEQ, -(-(longest - 1) // 32) * 32)  # one compiled shape that every text fits
    log(f"pool {len(pool)} problems ({', '.join(f'{k} {len(v)}' for k, v in by_kind.items())}); "
        f"longest {longest} tokens; prepared in {time.monotonic() - started:.1f} s")

    def batch():
        # Kinds uniformly (the small ones are repeated more), then a problem of that kind.
        kinds = rng.integers(len(KINDS), size=batch_size)
        tokens = np.zeros((batch_size, seq + 1), np.int32)
        lengths = np.zeros(batch_size, np.int32)
        for row, k in enumerate(kinds):
            seqs = encoded[KINDS[k]]
            ids = seqs[rng.integers(len(seqs))]
            tokens[row, :len(ids)], lengths[row] = ids, len(ids)
        return mx.array(tokens), mx.array(lengths)

    # The schedule's length: max_steps, or what `seconds` allows at the speed measured
    # over the first steps, whichever is less.
    total = [max_steps]
    peak, floor = learning_rate, learning_rate * 0.1

    def lr_at(step):
        warm = mx.minimum((step + 1) / warmup, 1.0)
        t = mx.clip((step - warmup) / max(total[0] - warmup, 1), 0.0, 1.0)
        return warm * (floor + (peak - floor) * 0.5 * (1 + mx.cos(math.pi * t)))

    lr = mx.array(peak)
    optimizer = optim.AdamW(learning_rate=peak, weight_decay=0.01)
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    state = [model.state, optimizer.state]

    def step_fn(tokens, lengths, lr):
        (loss, _), grads = loss_and_grad(model, tokens, lengths)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.learning_rate = lr
        optimizer.update(model, grads)
        return loss

    step_fn = mx.compile(step_fn, inputs=state, outputs=state)
    losses, step, t_train = [], 0, time.monotonic()
    while step < total[0]:
        lr = lr_at(mx.array(step, mx.float32))
        loss = step_fn(*batch(), lr)
        mx.eval(state, loss)
        step += 1
        if step % 50 == 0 or step == 1:
            losses.append([step, round(loss.item(), 4)])
        if step == 20:
            t_steady = time.monotonic()  # the first steps hold the compilation
        if step == 220 and seconds:
            per_step = (time.monotonic() - t_steady) / 200
            total[0] = max(min(max_steps, int((seconds - (t_steady - t_train)) / per_step) + 20), step)
            log(f"{per_step * 1000:.2f} ms a step after {t_steady - t_train:.1f} s of set-up: {total[0]} steps")
        if step % (2000 if total[0] > 5000 else 50) == 0:
            log(f"step {step}/{total[0]} loss {loss.item():.4f} ({time.monotonic() - t_train:.0f} s)")
    train_seconds = time.monotonic() - t_train
    weights = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}
    save_safetensors_durable(out / "model.safetensors", weights)

    skill = measure_skill(out, test[:eval_problems], boxed=boxed)
    record = {
        "command": " ".join(["python -m mathlora_daemon.demo.base_model", *sys.argv[1:]]),
        "made": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": _device(), "platform": platform.platform(), "versions": _versions(),
        "dims": dims, "vocab": json.loads((out / "config.json").read_text())["vocab_size"],
        "parameters": sum(v.size for v in weights.values()),
        "init": str(init) if init else None,
        "corpus": {"format": "Q: <problem>\\nA: <steps>\\n" + ("The final answer is $\\\\boxed{<answer>}$."
                                                                  if boxed else "Answer: <answer>"),
                   "problems": len(pool),
                   "by_kind": {k: len(v) for k, v in by_kind.items()}, "easy": True, "pool_seed": POOL_SEED,
                   "excluded": f"the demo's {N_TEST} test problems (mathgen.problem_key, seed {TEST_SEED})"},
        "training": {"steps": step, "batch_size": batch_size, "seq": seq, "learning_rate": learning_rate,
                     "warmup": warmup, "schedule": "cosine to 10%", "optimizer": "AdamW wd 0.01, clip 1.0",
                     "seconds": round(train_seconds, 1), "losses": losses},
        "skill": skill,
        "stages": stages,
    }
    (out / BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def measure_skill(model_dir: Path, problems: list[dict], max_tokens: int = 128, boxed: bool = False) -> dict:
    """The base model's accuracy on `problems` in its own plain format (its answer on
    the "Answer:" line, or with `boxed` in the boxed final line), and its accuracy and
    format compliance in the demo's chat format (what the demo shows as "before")."""
    from mlx_lm.utils import load

    from mathlora_daemon.evaluation.evaluate import answer_and_score, batched_greedy, summarize
    from mathlora_daemon.training.answers import answers_match, last_boxed

    model, tokenizer = load(str(model_dir))
    prompts = [list(tokenizer.encode(f"Q: {p['problem']}\nA:")) for p in problems]
    outs = batched_greedy(model, tokenizer, prompts, max_tokens)
    own = []
    for p, (text, _) in zip(problems, outs):
        if boxed:
            got = last_boxed(text)
        else:
            line = next((ln for ln in text.splitlines() if ln.startswith("Answer:")), "")
            got = line[len("Answer:"):].strip() or None
        own.append({"kind": p["kind"], "correct": answers_match(got, p["answer"])})
    kinds = sorted({i["kind"] for i in own})
    chat = summarize(answer_and_score(model, tokenizer, "chat", [(i, p, p["answer"]) for i, p in enumerate(problems)],
                                      max_tokens))
    return {"problems": len(problems),
            "own_format_accuracy": sum(i["correct"] for i in own) / len(own),
            "own_format_by_kind": {k: sum(i["correct"] for i in own if i["kind"] == k) for k in kinds},
            "chat_accuracy": chat["accuracy"], "chat_format": chat["format_compliance"],
            "example": {"problem": problems[0]["problem"], "own_format_output": outs[0][0][:300]}}


def _device() -> str:
    import mlx.core as mx

    try:
        info = mx.device_info()
        return f"{mx.default_device()} {info.get('device_name', '')}".strip()
    except Exception:  # older MLX, or the CPU
        return str(mx.default_device())


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mlx", "mlx-lm", "mlx-cuda-13"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mathlora_daemon.demo.base_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory to write the model into (new)")
    parser.add_argument("--seconds", type=float, default=240.0, help="training time (0 = --max-steps steps)")
    parser.add_argument("--max-steps", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--layers", type=int, default=DIMS["num_layers"])
    parser.add_argument("--hidden", type=int, default=DIMS["hidden_size"])
    parser.add_argument("--ffn", type=int, default=DIMS["intermediate_size"])
    parser.add_argument("--heads", type=int, default=DIMS["num_heads"])
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None, help="go on from this model (its tokenizer kept)")
    parser.add_argument("--boxed", action="store_true", help="solutions end in the boxed final line")
    parser.add_argument("--warmup", type=int, default=200)
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out}: not empty")
    dims = dict(num_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.ffn, num_heads=args.heads)
    record = build(args.out, args.seconds, args.max_steps, args.batch_size, args.learning_rate, warmup=args.warmup,
                   seed=args.seed, dims=dims, vocab=args.vocab, log=lambda m: print(m, flush=True), init=args.init,
                   boxed=args.boxed)
    print(json.dumps({k: record[k] for k in ("parameters", "training", "skill")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
