"""Packing (data.pack, issue 22): real tokens per second and padding, packed against the
grouped unpacked run and against the fixed-length rate, on the lengths users have.

Data sets (each a real `mathlora-daemon run` of the same model, the loss on every token
(train.mask_prompt = false, so "tokens" counts every real token), `--steps` steps):

  demo          the demo's training rows (short worked solutions)
  answer-only   mathgen full-range problems with the solution "The final answer is
                $\\boxed{X}$." (20-80 tokens: mostly prompt)
  openr1-like   synthetic rows whose lengths follow OpenR1-Math's (log-normal, median
                ~0.4 max_seq_len, long tail chunked), text from mathgen solutions repeated
  fixed         rows longer than max_seq_len, chunked into full rows: the fixed-length rate

Runs per data set: `grouped` (train.group_by_length, batch B sequences) and `packed`
(data.pack, batch B_rows rows = positions per micro-batch close to the grouped run's,
`--rows`). Each run's rate is real tokens / step seconds over the steps after the first
two (compiled traces are built then); padding = 1 - real tokens / model positions.

    .venv/bin/python bench/pack_bench.py --model-dir /tmp/grpo-demo/mlx_model --work /tmp/pack \\
        --max-seq-len 1024 --batch 16 --rows 4 --steps 12 --out /tmp/pack/out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from learning_bench import cli  # noqa: E402  the same CLI runner and log


def make_sets(work: Path, n: int, max_seq_len: int) -> dict[str, Path]:
    import numpy as np

    from mathlora_daemon.demo.mathgen import generate_problems

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    # The easy kinds hold fewer than 2,000 distinct problems: beyond 1,500 the demo set takes
    # further draws (other seeds, repeats allowed: lengths are what this bench is about).
    demo = [r for seed in range(1, 2 + n // 1500) for r in generate_problems(min(n, 1500), seed=seed, easy=True)][:n]
    full = generate_problems(n, seed=2)
    rng = np.random.default_rng(0)
    sets = {
        "demo": demo,
        "answer-only": [{**r, "solution": f"The final answer is $\\boxed{{{r['answer']}}}$."} for r in full],
        # Repeats of a worked solution, log-normal in count: a median of about 0.4 max_seq_len
        # tokens (some 3 characters a token) and a long tail that chunking cuts.
        "openr1-like": [{**r, "solution": (r["solution"] + "\n") * max(1, int(rng.lognormal(
            np.log(max(1.0, 1.2 * max_seq_len / len(r["solution"]))), 0.8)))} for r in full],
        "fixed": [{**r, "solution": (r["solution"] + "\n") * (8 * max_seq_len // max(len(r["solution"]), 1) + 1)}
                  for r in full[: max(8, n // 8)]],
    }
    out = {}
    for name, rows in sets.items():
        out[name] = data / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def run_one(work: Path, model_dir: Path, data: Path, name: str, sets: list[str], log: Path) -> dict:
    run = work / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "mathlora.toml").write_text(f'[model]\nname = "{model_dir}"\npath = "{model_dir}"\n'
                                       f'[data]\nname = "{data}"\nvalidation_fraction = 0.0\n')
    started = time.monotonic()
    cli("run", "--run-dir", str(run), *sets, log=log)
    wall = time.monotonic() - started
    ev = [json.loads(line) for line in (run / "logs" / "daemon.jsonl").read_text().splitlines() if line.strip()]
    steps = [e for e in ev if e["event"] == "train.step"]
    pack = [e for e in ev if e["event"] == "data.pack"]
    tail = steps[2:] or steps
    tokens = sum(e["tokens"] for e in tail)
    seconds = sum(e["step_s"] for e in tail)
    positions = sum(e["tokens"] / max(1e-9, 1 - e["padding"]) for e in tail)
    return {"steps": len(steps), "wall_s": round(wall, 1), "tokens_per_s": round(tokens / seconds, 1),
            "padding": round(1 - tokens / positions, 4) if positions else None,
            "step_s_median": round(statistics.median(e["step_s"] for e in tail), 4),
            "pack": {k: pack[0][k] for k in ("rows", "sequences", "padding")} if pack else None}


def padding_of(work: Path, model_dir: Path, data: Path, name: str, max_seq_len: int, log: Path) -> dict:
    """`prepare` a packed run of the set and return its rows and padding, and best-fit
    decreasing's alone (what data.pack packed before 2026-12-05, sixth session)."""
    import numpy as np

    from mathlora_daemon.training.cache import load_cache
    from mathlora_daemon.training.packing import PackedRows, _best_fit_decreasing

    run = work / "runs" / f"{name}-padding"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    (run / "mathlora.toml").write_text(f'[model]\nname = "{model_dir}"\npath = "{model_dir}"\n'
                                       f'[data]\nname = "{data}"\nvalidation_fraction = 0.0\n'
                                       f'max_seq_len = {max_seq_len}\npack = true\n[train]\nmask_prompt = false\n')
    cli("prepare", "--run-dir", str(run), log=log)
    (cache_dir,) = [d for d in (run / "cache").iterdir() if d.is_dir()]
    cache = load_cache(cache_dir)
    packs = PackedRows.of(cache, max_seq_len + 1)
    lengths = np.asarray(cache.lengths)
    best_fit = len(_best_fit_decreasing(lengths, max_seq_len + 1))
    return {"sequences": int(len(lengths)), "mean_tokens": round(float(lengths.mean()), 1),
            "fewest_rows": int(-(-lengths.sum() // (max_seq_len + 1))),
            "rows": len(packs), "padding": round(packs.padding_share, 4), "best_fit_rows": best_fit,
            "best_fit_padding": round(1 - float(lengths.sum()) / (best_fit * (max_seq_len + 1)), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--rows-per-set", type=int, default=400)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16, help="sequences per micro-batch, unpacked")
    parser.add_argument("--rows", type=int, default=4, help="packed rows per micro-batch")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--sets", default="demo,answer-only,openr1-like,fixed")
    parser.add_argument("--padding-only", action="store_true",
                        help="no training: each set prepared with data.pack, the whole set's packed padding against "
                             "best-fit decreasing alone (exact on any machine: it depends on the tokenizer only)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import mlx.core as mx

    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "commands.log"
    data = make_sets(args.work, args.rows_per_set, args.max_seq_len)
    if args.padding_only:
        results = {name: padding_of(args.work, args.model_dir, data[name], name, args.max_seq_len, log)
                   for name in args.sets.split(",")}
        record = {"command": " ".join(sys.argv), "platform": platform.platform(), "model": str(args.model_dir),
                  "max_seq_len": args.max_seq_len, "rows_per_set": args.rows_per_set, "results": results}
        print(json.dumps(results, indent=1))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=2))
        return 0
    common = ["--set", f"data.max_seq_len={args.max_seq_len}", "--set", "train.mask_prompt=false", "--set",
              "train.grad_accumulation_steps=1", "--set", f"train.max_steps={args.steps}", "--set",
              "train.eval_sequences=0", "--set", "train.final_eval=0", "--set", "train.epochs=100",
              "--set", "daemon.checkpoint_every_steps=0"]
    results = {}
    record = {"command": " ".join(sys.argv), "platform": platform.platform(), "device": str(mx.default_device()),
              "mlx": mx.__version__, "model": str(args.model_dir), "max_seq_len": args.max_seq_len,
              "batch": args.batch, "rows": args.rows, "steps": args.steps, "results": results}
    for name in args.sets.split(","):
        # The fixed set's rows are all full: its grouped run takes as many rows as a packed
        # micro-batch, so it is the fixed-length rate at the same positions per micro-batch.
        batch = args.rows if name == "fixed" else args.batch
        grouped = run_one(args.work, args.model_dir, data[name], f"{name}-grouped",
                          common + ["--set", "train.group_by_length=true", "--set", f"train.batch_size={batch}"],
                          log)
        packed = run_one(args.work, args.model_dir, data[name], f"{name}-packed",
                         common + ["--set", "data.pack=true", "--set", f"train.batch_size={args.rows}"], log)
        results[name] = {"grouped": grouped, "packed": packed,
                         "packed_over_grouped": round(packed["tokens_per_s"] / grouped["tokens_per_s"], 3)}
        if "fixed" in results:
            rate = results["fixed"]["grouped"]["tokens_per_s"]
            for r in results.values():
                r["packed_over_fixed"] = round(r["packed"]["tokens_per_s"] / rate, 3)
        print(name, json.dumps(results[name]), flush=True)
        write(args.out, record)  # each set as it ends: a run cut short by a device limit keeps what it measured
    return 0


def write(out: Path | None, record: dict) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
