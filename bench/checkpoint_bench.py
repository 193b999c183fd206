"""Benchmark the checkpoint store on a DeepSeek-Math-7B-sized LoRA checkpoint.

LoRA rank 8 on q_proj and v_proj of 30 layers, hidden size 4096: per layer and
projection lora_a (4096, 8) and lora_b (8, 4096), float32 = 3,932,160 parameters; plus
Adam state (first and second moments of the same shapes and an int64 step counter).

Prints one JSON object: median seconds of save (serialize + write + fsync + publish),
verify (hash every file), load (load_checkpoint, which verifies, plus reading every
tensor into memory with safetensors) over --runs runs, and the checkpoint's bytes.

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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from checkpoints import store  # noqa: E402

LAYERS, HIDDEN, RANK = 30, 4096, 8


def make_groups(seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    adapters, optimizer = {}, {}
    for layer in range(LAYERS):
        for proj in ("q_proj", "v_proj"):
            prefix = f"model.layers.{layer}.self_attn.{proj}"
            for name, shape in (("lora_a", (HIDDEN, RANK)), ("lora_b", (RANK, HIDDEN))):
                key = f"{prefix}.{name}"
                adapters[key] = rng.standard_normal(shape, dtype=np.float32)
                optimizer[f"{key}.m"] = rng.standard_normal(shape, dtype=np.float32)
                optimizer[f"{key}.v"] = np.abs(rng.standard_normal(shape, dtype=np.float32))
    optimizer["step"] = np.array(1000, dtype=np.int64)
    return {"adapters": adapters, "optimizer": optimizer}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: temp dir)")
    args = parser.parse_args()

    groups = make_groups()
    params = sum(a.size for a in groups["adapters"].values())
    assert params == 3_932_160, params
    state = {"global_step": 1000, "epoch": 0, "cursor": 8000, "eval_loss": 0.5}

    base = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    save_s, verify_s, load_s, sizes = [], [], [], []
    try:
        for run in range(args.runs):
            root = base / f"run-{run}" / "checkpoints"

            t0 = time.perf_counter()
            info = store.save_checkpoint(root, 1000, groups, state)
            save_s.append(time.perf_counter() - t0)
            sizes.append(info.bytes)

            t0 = time.perf_counter()
            reason = store.verify_checkpoint(info.path)
            verify_s.append(time.perf_counter() - t0)
            assert reason is None, reason

            t0 = time.perf_counter()
            loaded_state, files = store.load_checkpoint(info.path)
            tensors = {g: _read(f) for g, f in files.items()}
            load_s.append(time.perf_counter() - t0)
            assert loaded_state == state
            assert np.array_equal(
                tensors["adapters"]["model.layers.29.self_attn.v_proj.lora_b"],
                groups["adapters"]["model.layers.29.self_attn.v_proj.lora_b"],
            )
            shutil.rmtree(root.parent)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    print(json.dumps({
        "trainable_params": params,
        "adam_tensors": len(groups["optimizer"]),
        "bytes": statistics.median(sizes),
        "save_s": round(statistics.median(save_s), 4),
        "verify_s": round(statistics.median(verify_s), 4),
        "load_s": round(statistics.median(load_s), 4),
        "runs": args.runs,
        "all_save_s": [round(x, 4) for x in save_s],
        "all_verify_s": [round(x, 4) for x in verify_s],
        "all_load_s": [round(x, 4) for x in load_s],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }, indent=2))
    return 0


def _read(path: Path) -> dict[str, np.ndarray]:
    """Read every tensor of a safetensors file into memory (copies, not lazy views)."""
    from safetensors.numpy import load_file

    return {k: np.array(v, copy=True) for k, v in load_file(path).items()}


if __name__ == "__main__":
    raise SystemExit(main())
