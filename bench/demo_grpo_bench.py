"""GRPO on the demo (CPU, issue 21): does a GRPO run raise the sample reward and held-out
accuracy over its SFT start?

The demo (`mathlora-daemon demo`: one epoch of SFT on 600 worked solutions) gives the SFT
start. Each arm is a real `mathlora-daemon run` of `train.method = "grpo"` from those
adapters (`rl.init_adapters`, also the KL reference), over the same 600 problems (one
epoch: 75 steps of 8 prompts x G 8, 96 new tokens, constant lr), with the demo's
validation at every 25 steps. Then every adapter set, the SFT start included, is scored
by the same `mathlora-daemon eval` (the 60 held-out problems, greedy, 256 new tokens).

    .venv/bin/python bench/demo_grpo_bench.py --work /tmp/demo-grpo --arms lr1e-4:1e-4:0,lr2e-4:2e-4:0,lr1e-4-skip2:1e-4:2 \\
        --out bench/results/cpu-demo-grpo.json

An arm is NAME:LR:SKIP_FLAT_GROUPS. Arms run one after another (their step times are
comparable); each takes 4-6 minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from grpo_bench import events as all_events  # noqa: E402  the run's log, read as grpo_bench reads it
from learning_bench import cli  # noqa: E402  the same CLI runner and log


def events(run: Path, name: str) -> list[dict]:
    return [e for e in all_events(run) if e.get("event") == name]


def held_out(run: Path, adapters: Path, log: Path) -> dict:
    out = run / f"eval-{adapters.parent.name}.json"
    cli("eval", "--run-dir", str(run), "--adapter-path", str(adapters), "--limit", "0", "--max-new-tokens", "256",
        "--no-base", "--json", "--out", str(out), log=log)
    summary = json.loads(out.read_text())["runs"]["adapters"]["summary"]
    return {"accuracy": summary["accuracy"], "format": summary["format_compliance"], "n": summary["n"],
            "by_kind": {k: v["correct"] for k, v in summary["by_kind"].items()}}


def arm(work: Path, sft: Path, name: str, lr: float, skip: int, steps: int, log: Path) -> dict:
    run = work / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    for item in ("data", "mlx_model"):
        os.symlink(sft / item, run / item)
    shutil.copy(sft / "mathlora.toml", run / "mathlora.toml")
    cli("run", "--run-dir", str(run), "--set", 'train.method="grpo"', "--set", f'rl.init_adapters="{sft / "adapters"}"',
        "--set", f"train.learning_rate={lr}", "--set", 'train.lr_schedule="constant"', "--set", "rl.max_new_tokens=96",
        "--set", "rl.prompts_per_step=8", "--set", "train.batch_size=64", "--set", "train.grad_accumulation_steps=1",
        "--set", f"rl.skip_flat_groups={skip}", "--set", f"train.max_steps={steps}",
        "--set", "daemon.checkpoint_every_steps=25", log=log)
    rl = events(run, "rl.step")
    fifth = max(1, len(rl) // 5)

    def mean(key: str, part: list[dict]) -> float:
        return round(statistics.mean(e[key] for e in part), 4)

    return {"lr": lr, "skip_flat_groups": skip, "steps": len(rl),
            "first_fifth": {k: mean(k, rl[:fifth]) for k in ("reward_mean", "sample_accuracy", "zero_advantage_share")},
            "last_fifth": {k: mean(k, rl[-fifth:]) for k in ("reward_mean", "sample_accuracy", "zero_advantage_share")},
            "kl_max": max(e["kl"] for e in rl), "resampled_groups_mean": mean("resampled_groups", rl),
            "step_s_mean": round(statistics.mean(e["rollout_s"] + e["reward_s"] + e["reference_s"] + e["update_s"]
                                                 for e in rl), 3),
            "val_accuracy": [(e["step"], e.get("val_accuracy")) for e in events(run, "train.eval")],
            "rewards": [e["reward_mean"] for e in rl], "held_out": held_out(run, run / "adapters", log)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--arms", default="lr1e-4:1e-4:0,lr2e-4:2e-4:0,lr1e-4-skip2:1e-4:2")
    parser.add_argument("--steps", type=int, default=0, help="GRPO steps per arm (0: one epoch, 75)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "commands.log"
    sft = args.work / "sft"
    if not (sft / "adapters" / "adapters.safetensors").is_file():
        shutil.rmtree(sft, ignore_errors=True)
        cli("demo", "--run-dir", str(sft), log=log)
    record = {"command": " ".join(sys.argv), "platform": platform.platform(), "cpus": os.cpu_count(),
              "sft_start": held_out(sft, sft / "adapters", log), "arms": {}}
    for spec in args.arms.split(","):
        name, lr, skip = spec.split(":")
        record["arms"][name] = arm(args.work, sft, name, float(lr), int(skip), args.steps, log)
        print(name, json.dumps({k: v for k, v in record["arms"][name].items() if k != "rewards"}), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=2))
    print("sft start", json.dumps(record["sft_start"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
