"""Measure SIGTERM-to-exit of the real daemon: how long launchd waits for a clean stop.

Builds a run directory with a model of the chosen shape (random weights, the demo's
byte-level tokenizer, long math texts so every sequence fills max_seq_len), starts
`python -m daemon run` as launchd would, sends SIGTERM once step `--at-step` is logged,
and reports the wall time from the signal to the process's exit next to the daemon's
own `signal_to_exit_s`, the checkpoint it wrote on the way out and the step time.

    python bench/sigterm_bench.py --shape tiny           # CPU, seconds
    python bench/sigterm_bench.py --shape deepseek-7b    # GPU: hidden 4096, 30 layers, bf16

launchd's ExitTimeOut (60 s in our plist) must stay well above the figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    # name: (hidden, layers, heads, intermediate, vocab, dtype, max_seq_len, batch, accumulation)
    "tiny": (128, 2, 4, 256, 512, "float32", 256, 4, 2),
    "deepseek-7b": (4096, 30, 32, 11008, 102400, "bfloat16", 1024, 1, 8),
}


def build_run(run: Path, shape: str) -> None:
    import mlx.core as mx
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.utils import save_model

    from mathlora_daemon.config import Config, DaemonConfig, DataConfig, LoraConfig, ModelConfig, TrainConfig, to_toml
    from mathlora_daemon.demo.assets import train_tokenizer
    from mathlora_daemon.demo.mathgen import generate_problems
    from mathlora_daemon.training.template import format_example

    hidden, layers, heads, inter, vocab, dtype, seq, batch, accum = SHAPES[shape]
    rows = generate_problems(2000, seed=0)
    long_rows = [{"problem": rows[i]["problem"], "solution": "\n".join(r["solution"] for r in rows[i:i + 40])}
                 for i in range(0, 2000, 40)]  # ~40 solutions a row: longer than max_seq_len
    (run / "data").mkdir(parents=True)
    (run / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in long_rows))
    model_dir = run / "mlx_model"
    train_tokenizer([format_example(r["problem"], r["solution"]) for r in rows], model_dir, vocab_size=512)
    config = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": inter,
              "num_attention_heads": heads, "num_key_value_heads": heads, "rms_norm_eps": 1e-6, "vocab_size": vocab,
              "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": dtype}
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    model.set_dtype(getattr(mx, dtype))
    save_model(model_dir, model, donate_model=True)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    cfg = Config(model=ModelConfig(name=f"bench/{shape}", path="mlx_model"),
                 data=DataConfig(name="data/train.jsonl", max_seq_len=seq),
                 lora=LoraConfig(rank=8, alpha=16.0, targets=["q_proj", "v_proj"]),
                 train=TrainConfig(batch_size=batch, grad_accumulation_steps=accum, learning_rate=1e-5),
                 daemon=DaemonConfig(prevent_sleep=False, pause_on_battery=False, memory_warning_available_gb=0.0,
                                     memory_critical_available_gb=0.0))
    (run / "mathlora.toml").write_text(to_toml(cfg))


def events(run: Path, name: str) -> list[dict]:
    path = run / "logs" / "daemon.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == name]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--at-step", type=int, default=3, help="send SIGTERM once this step is logged")
    parser.add_argument("--dir", type=Path, default=None, help="where to build the run (default: temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON record here")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="sigterm-bench-", dir=args.dir))
    run = base / "run"
    try:
        t0 = time.perf_counter()
        build_run(run, args.shape)
        build_s = time.perf_counter() - t0
        proc = subprocess.Popen([sys.executable, "-m", "mathlora_daemon", "run", "--run-dir", str(run)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while not any(e["step"] >= args.at_step for e in events(run, "train.step")):
            if proc.poll() is not None:
                raise SystemExit(f"daemon exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        # Land the signal inside a step: a fraction of a step after the boundary.
        step_s = events(run, "train.step")[-1]["step_s"]
        time.sleep(step_s * 0.3)
        sent = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=600)
        wall = time.perf_counter() - sent
        stop = events(run, "daemon.stop")[-1]
        saved = events(run, "checkpoint.saved")[-1]
        steps = events(run, "train.step")
        record = {
            "shape": args.shape, "exit_code": code, "signal_to_exit_wall_s": round(wall, 3),
            "signal_to_exit_daemon_s": stop.get("signal_to_exit_s"), "stopped_at_step": stop.get("step"),
            "checkpoint_s": saved["seconds"], "checkpoint_bytes": saved["bytes"],
            "step_s_median": sorted(e["step_s"] for e in steps)[len(steps) // 2],
            "micro_batches_per_step": SHAPES[args.shape][8], "tok_per_s_last": steps[-1]["tok_per_s"],
            "mem_peak_gb": steps[-1].get("mem_peak_gb"), "build_s": round(build_s, 1),
            "command": " ".join([Path(sys.executable).name] + sys.argv), "platform": platform.platform(),
            "python": platform.python_version(),
        }
        try:
            import mlx.core as mx

            record["device"] = str(mx.default_device())
            if mx.default_device().type == mx.DeviceType.gpu:
                record["gpu"] = mx.device_info().get("device_name")
        except Exception:  # the record still stands without the device name
            pass
        text = json.dumps(record, indent=2)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return 0 if code == 0 else 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
