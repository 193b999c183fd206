"""`demo`: the embedded default, runnable offline in a few minutes on two CPU cores.

Given a run directory, write a tiny Llama-architecture model (tokenizer trained on the
demo data, same layout as a converted model) in `mlx_model/`, synthetic step-by-step
math problems in `data/` (train + held-out test), and a `mathlora.toml` pointing at
them; then train, and show the loss and a generation before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from mathlora_daemon.config import Config, DataConfig, LoraConfig, ModelConfig, TrainConfig, load_config, to_toml
from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import CONFIG_FILE, LOCK_FILE, RunDir

MARKER = "mathlora-daemon demo run directory"
# What a demo run directory may already hold (anything else: refuse, lose nothing).
DEMO_ENTRIES = {CONFIG_FILE, LOCK_FILE, ".tmp-mlx_model", "mlx_model", "data", "cache", "checkpoints", "adapters",
                "logs", "state", "debug"}
N_TRAIN, N_TEST = 800, 60
# The base model is pretrained on these kinds only; LoRA then has to teach percentages
# and derivatives, which the base has never seen.
BASE_KINDS = ("linear_equation", "order_of_operations", "fractions", "gcd_lcm")
BASE_ROWS, BASE_STEPS = 2000, 150


def demo_config() -> Config:
    """Return the demo's config: the tiny model and the synthetic data, with a learning
    rate and step count sized so that the loss visibly falls within a couple of minutes."""
    return Config(
        # The model is the directory the demo writes: a local path, nothing to download or convert.
        model=ModelConfig(name="mlx_model", path="mlx_model"),
        data=DataConfig(name="data/train.jsonl", max_seq_len=256),
        lora=LoraConfig(rank=16, alpha=32.0, dropout=0.0,
                        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        train=TrainConfig(epochs=1, batch_size=4, grad_accumulation_steps=2, learning_rate=1e-3, seed=0),
    )


def check_run_dir(run_dir: Path) -> None:
    """Given a directory, raise InputError unless it is absent, empty or a demo run
    directory (so the demo never writes over a user's files)."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise InputError(f"--run-dir {run_dir}: exists and is not a directory")
    config = run_dir / CONFIG_FILE
    if config.exists() and MARKER not in config.read_text(errors="replace").splitlines()[0]:
        raise InputError(f"--run-dir {run_dir}: holds a {CONFIG_FILE} that is not the demo's; "
                         "choose another directory for the demo")
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in DEMO_ENTRIES)
    if foreign:
        raise InputError(f"--run-dir {run_dir}: not empty ({', '.join(foreign[:5])}); choose an empty or new "
                         "directory for the demo")


def prepare_demo(run_dir: Path, base_steps: int = BASE_STEPS) -> Config:
    """Given a run directory and how many steps to pretrain the tiny base model (0 = a
    random base), write the demo model, data and config there (reusing any already
    written) and return the config."""
    from mathlora_daemon.demo.assets import build_demo_model_dir, pretrain_base
    from mathlora_daemon.demo.mathgen import generate_problems, write_demo_dataset
    from mathlora_daemon.training.template import format_example

    check_run_dir(run_dir)
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    train_path = run_dir / "data" / "train.jsonl"
    if not train_path.exists():
        write_demo_dataset(run_dir / "data", n_train=N_TRAIN, n_test=N_TEST, seed=0)
    if not (run_dir / "mlx_model" / "model.safetensors").exists():
        rows = [json.loads(line) for line in train_path.read_text().splitlines()]
        tmp = run_dir / ".tmp-mlx_model"
        shutil.rmtree(tmp, ignore_errors=True)
        build_demo_model_dir(tmp, [format_example(r["problem"], r["solution"]) for r in rows], seed=0, vocab_size=512)
        if base_steps:
            test = {json.loads(line)["problem"] for line in (run_dir / "data" / "test.jsonl").read_text().splitlines()}
            base = [format_example(r["problem"], r["solution"]) for r in generate_problems(BASE_ROWS, 1, BASE_KINDS)
                    if r["problem"] not in test]
            print(f"pretraining the tiny base model on {len(base)} problems of {len(BASE_KINDS)} kinds "
                  f"({base_steps} steps) ...", file=sys.stderr)
            losses = pretrain_base(tmp, base, base_steps, seed=0)
            print(f"base model loss {losses[0]:.3f} -> {losses[-1]:.3f}", file=sys.stderr)
        os.rename(tmp, run_dir / "mlx_model")  # the model appears whole or not at all
    config_path = run_dir / CONFIG_FILE
    if not config_path.exists():
        config_path.write_text(to_toml(demo_config(), comment=f"{MARKER}: tiny model, synthetic math data.\n"
                                                              "Every key is documented in README.md."))
    return load_config(config_path)


def _steps_logged(run_dir: Path) -> list[dict]:
    path = RunDir(run_dir).log_file
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"train.step"' in line]


def _train(run_dir: Path, interrupt_at: int | None) -> int:
    """Run `mathlora-daemon run` as its own process, as launchd would; with interrupt_at,
    send it SIGTERM once that step is logged. Return its exit code."""
    proc = subprocess.Popen([sys.executable, "-m", "mathlora_daemon", "run", "--run-dir", str(run_dir)])
    try:
        while interrupt_at is not None and proc.poll() is None:
            steps = _steps_logged(run_dir)
            if steps and steps[-1]["step"] >= interrupt_at:
                proc.send_signal(signal.SIGTERM)
                break
            time.sleep(0.2)
        return proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise


def run_demo(run_dir: Path, prepare_only: bool = False, base_steps: int = BASE_STEPS) -> int:
    """Given a run directory, prepare the demo and, unless prepare_only, train it the way
    the daemon trains overnight: interrupted once by SIGTERM (checkpoint, exit 0), started
    again (resume), then show `status`, the loss and a generation. Return the exit code."""
    from mathlora_daemon.evaluation.generate import generate_text
    from mathlora_daemon.runtime.status import status_main

    prepare_demo(run_dir, base_steps)
    print(f"demo prepared in {run_dir}: model {run_dir / 'mlx_model'}, data {run_dir / 'data'}, "
          f"config {run_dir / CONFIG_FILE}")
    if prepare_only:
        return 0
    test = json.loads((run_dir / "data" / "test.jsonl").read_text().splitlines()[0])
    print(f"\nproblem: {test['problem']}\nexpected answer: {test['answer']}\n\nbase model, greedy:")
    generate_text(run_dir / "mlx_model", test["problem"], None, max_new_tokens=80, temperature=0.0, out=sys.stdout)

    print("\ntraining (mathlora-daemon run); it gets SIGTERM at step 40, as launchd would send at logout ...")
    code = _train(run_dir, interrupt_at=40)
    stopped = _steps_logged(run_dir)[-1]["step"] if _steps_logged(run_dir) else 0
    print(f"\nthe daemon exited with {code} after checkpointing step {stopped}; status now:\n")
    status_main(run_dir, as_json=False, out=sys.stdout)
    if code != 0:
        return code
    print("\nstarting it again: it resumes from the checkpoint, exactly where it stopped ...")
    code = _train(run_dir, interrupt_at=None)
    if code != 0:
        return code
    print()
    status_main(run_dir, as_json=False, out=sys.stdout)
    steps = _steps_logged(run_dir)
    first, last = steps[0]["loss"], sum(s["loss"] for s in steps[-10:]) / len(steps[-10:])
    print(f"\nloss: first step {first:.3f} -> mean of the last 10 steps {last:.3f} over {steps[-1]['step']} steps")
    print("\nwith adapters, greedy:")
    generate_text(run_dir / "mlx_model", test["problem"], run_dir / "adapters", max_new_tokens=80, temperature=0.0,
                  out=sys.stdout)
    print(f"\nnext: mathlora-daemon status --run-dir {run_dir} | mathlora-daemon logs --run-dir {run_dir} "
          f"--event checkpoint | mathlora-daemon generate --run-dir {run_dir} --prompt \"Solve for x: 3x + 7 = 22\"")
    return 0
