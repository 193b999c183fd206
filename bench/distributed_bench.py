"""Data-parallel scaling: tokens/s of the daemon's training step with 1 vs N ranks.

Weak scaling, as a user adds machines or GPUs: every rank computes one micro-batch of
--batch sequences of --seq tokens per optimizer step (the global batch is batch x ranks),
with the daemon's own compiled step (`daemon.trainer.train_step` with the World from
`daemon.distributed.init_world`, i.e. the shares, the all_sum of LoRA gradients inside
the compiled update and the summed loss) plus the one boundary collective per step that
`Runtime.merge_ranks` adds. The model is a shape from bench/train_bench.py with random
weights (the same seed on every rank), LoRA rank 8 on q/v; rank 0's LoRA weights are
copied to all ranks first, as `run` does.

Driver (spawns `mlx.launch` for each world size > 1 and writes one JSON + markdown):

    .venv/bin/python bench/distributed_bench.py --shape tiny --ranks 1,2 --steps 10 --warmup 2
    python3 bench/distributed_bench.py --shape deepseek-7b --dtype bfloat16 --batch 8 --ranks 1,2 \\
        --backend nccl --out dist.json --md dist.md        # a 2-GPU Linux machine

Scaling efficiency = tokens/s(N) / (N x tokens/s(1)).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def measure(args) -> dict:
    """One rank's part of one world size; rank 0's record is returned (others: {})."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from train_bench import SHAPES, build_mlx_model, fixed_sequences, memory_cache

    from mathlora_daemon.config import Config
    from mathlora_daemon.runtime.world import broadcast_arrays, gather_ints, init_world
    from mathlora_daemon.training.model import apply_lora
    from mathlora_daemon.training.step import make_optimizer, train_step

    world = init_world()
    model, _ = build_mlx_model(args.shape, args.dtype, 0, args, None)
    cfg = Config()
    cfg.lora.targets, cfg.lora.dropout = ["q_proj", "v_proj"], 0.0
    apply_lora(model, cfg)
    params = broadcast_arrays(world, dict(tree_flatten(model.trainable_parameters())))
    model.load_weights(list(params.items()), strict=False)
    model.train()
    steps = args.warmup + args.steps
    global_batch = args.batch * world.size
    cache = memory_cache(fixed_sequences(global_batch * steps, args.seq, SHAPES[args.shape]["vocab_size"]), "bench",
                         args.seq)
    optimizer = make_optimizer(1e-5)
    times, tokens = [], 0
    for step in range(steps):
        micro = [np.arange(start, start + args.batch)
                 for start in range(step * global_batch, (step + 1) * global_batch, args.batch)]
        t0 = time.perf_counter()
        gather_ints(world, [0, 0])  # the boundary's merge of stop/wait wishes
        result = train_step(model, optimizer, cache, micro, 0, step, world=world)
        elapsed = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(elapsed)
            tokens = result.tokens
    if not world.leader:
        return {}
    median = statistics.median(times)
    return {"ranks": world.size, "backend": world.backend or "none", "batch_per_rank": args.batch,
            "global_batch": global_batch, "seq": args.seq, "tokens_per_step": tokens,
            "step_s_median": round(median, 4), "tokens_per_s": round(tokens / median, 1),
            "tokens_per_s_mean": round(tokens * len(times) / sum(times), 1),
            "peak_memory_gb_rank0": round(mx.get_peak_memory() / 1e9, 3)}


def run_world(args, ranks: int, out: Path) -> dict:
    """Run the measurement with `ranks` ranks (through mlx.launch when > 1); return rank 0's record."""
    worker = [sys.executable, str(Path(__file__).resolve()), "--worker", "--shape", args.shape, "--dtype", args.dtype,
              "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--record", str(out)]
    if ranks == 1:
        argv = worker
    else:
        launcher = Path(sys.executable).parent / "mlx.launch"
        # mlx.launch's console script, else its module (a --target install has no script on PATH)
        argv = [str(launcher)] if launcher.exists() else [
            sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]
        argv += ["--hosts", "127.0.0.1", "-n", str(ranks)]
        if args.backend:
            argv += ["--backend", args.backend]
        if args.starting_port:
            argv += ["--starting-port", str(args.starting_port)]
        argv += ["--", *worker]
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if not out.exists():
        raise SystemExit(f"{ranks} ranks: no result (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ranks", default="1,2", help="world sizes to measure, e.g. 1,2")
    p.add_argument("--backend", default=None, help="mlx.launch --backend (ring, nccl, ...)")
    p.add_argument("--starting-port", type=int, default=None, help="mlx.launch --starting-port (ring)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--record", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        record = measure(args)
        if record:
            args.record.write_text(json.dumps(record))
        return 0

    import mlx.core as mx

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in [int(r) for r in args.ranks.split(",")]:
            record = run_world(args, ranks, Path(tmp) / f"r{ranks}.json")
            records.append(record)
            print(json.dumps(record), flush=True)
    base = next((r for r in records if r["ranks"] == 1), None)
    for r in records:
        if base:
            r["speedup"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            r["efficiency"] = round(r["speedup"] / r["ranks"], 3)
    doc = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
           "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores",
           "mlx": mx.__version__, "device": str(mx.default_device()), "records": records}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["| ranks | backend | global batch | tokens/step | step s (median) | tokens/s | speedup | efficiency |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['ranks']} | {r['backend']} | {r['global_batch']} | {r['tokens_per_step']} | {r['step_s_median']} "
              f"| {r['tokens_per_s']:,.0f} | {r.get('speedup', '')} | {r.get('efficiency', '')} |" for r in records]
    table = "\n".join(lines)
    print(table)
    if args.md:
        args.md.write_text(f"{doc['when']} {doc['machine']} mlx {doc['mlx']} ({doc['device']})\n\n`{doc['command']}`"
                           f"\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
