"""Benchmark checkpoint save and restore for a DeepSeek-Math-7B-sized LoRA adapter.

LoRA rank 8 on q_proj and v_proj of 30 layers, hidden size 4096: per layer and
projection lora_a (4096, 8) and lora_b (8, 4096), float32 = 3,932,160 parameters, plus
Adam's first and second moments, step and learning rate: the daemon's own checkpoint.

It runs the daemon's code path, not a stand-in: `save_training_checkpoint` (MLX arrays
serialized to safetensors, written to a temporary directory, every file and directory
fsynced, manifest last, renamed into place) and `restore_training_checkpoint` (verify
sizes and SHA-256 of every file, load adapters into the model and the optimizer state).
The 7B base weights play no part in either, so the model here holds only the LoRA
parameters, with mlx-lm's key names.

Prints one JSON object with the median of --runs runs:

    .venv/bin/python bench/checkpoint_bench.py [--runs 5] [--dir /path/on/target/disk]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mathlora_checkpoints import store  # noqa: E402
from mathlora_daemon.config import Config  # noqa: E402
from mathlora_daemon.training.checkpointing import Progress, restore_training_checkpoint, save_training_checkpoint  # noqa: E402
from mathlora_daemon.training.step import make_optimizer  # noqa: E402

LAYERS, HIDDEN, RANK = 30, 4096, 8


class LoraOnly(nn.Module):
    """The trainable part of a LoRA'd 7B Llama: model.layers.N.self_attn.{q,v}_proj.lora_{a,b}."""

    def __init__(self):
        super().__init__()
        self.model = {"layers": [{"self_attn": {p: {"lora_a": mx.random.normal((HIDDEN, RANK)) * 0.01,
                                                     "lora_b": mx.random.normal((RANK, HIDDEN)) * 0.01}
                                                 for p in ("q_proj", "v_proj")}} for _ in range(LAYERS)]}


def make_state(seed: int):
    mx.random.seed(seed)
    model = LoraOnly()
    optimizer = make_optimizer(1e-5)
    grads = {k: v for k, v in model.trainable_parameters().items()}  # any gradient fills the moments
    optimizer.update(model, grads)
    mx.eval(model.parameters(), optimizer.state)
    return model, optimizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: temp dir)")
    args = parser.parse_args()

    cfg = Config()
    model, optimizer = make_state(0)
    params = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    assert params == 3_932_160, params
    progress = Progress(global_step=1000, tokens_seen=10**6, train_seconds=3600.0, recent_losses=[0.5] * 100)
    fp = {"bench": True}

    base = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    save_s, verify_s, restore_s, sizes = [], [], [], []
    try:
        for run in range(args.runs):
            root = base / f"run-{run}" / "checkpoints"
            t0 = time.perf_counter()
            info = save_training_checkpoint(root, model, optimizer, progress, 0, 8000, fp, cfg)
            save_s.append(time.perf_counter() - t0)
            sizes.append(info.bytes)

            t0 = time.perf_counter()
            assert store.verify_checkpoint(info.path) is None
            verify_s.append(time.perf_counter() - t0)

            fresh, fresh_opt = make_state(run + 1)  # different values, so the restore must overwrite them
            t0 = time.perf_counter()
            _, restored = restore_training_checkpoint(info.path, fresh, fresh_opt, fp)
            restore_s.append(time.perf_counter() - t0)
            assert restored.global_step == 1000
            same = [mx.array_equal(a, b).item() for (_, a), (_, b) in
                    zip(tree_flatten(model.trainable_parameters()), tree_flatten(fresh.trainable_parameters()))]
            assert all(same) and mx.array_equal(fresh_opt.state["step"], optimizer.state["step"]).item()
            shutil.rmtree(root.parent)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(json.dumps({
        "trainable_params": params,
        "optimizer_tensors": len(tree_flatten(optimizer.state)),
        "bytes": statistics.median(sizes),
        "save_s": round(statistics.median(save_s), 4),
        "verify_s": round(statistics.median(verify_s), 4),
        "restore_s (verify + load + apply)": round(statistics.median(restore_s), 4),
        "runs": args.runs,
        "all_save_s": [round(x, 4) for x in save_s],
        "all_restore_s": [round(x, 4) for x in restore_s],
        "mlx": mx.__version__, "device": str(mx.default_device()),
        "platform": platform.platform(), "cpus": os.cpu_count(),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
