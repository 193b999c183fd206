"""GRPO rollouts: how fast does training/rollouts.py decode a step's completions, against
an earlier version of itself, on shapes a GRPO step has? (issue 21)

A step of the GRPO bench: 16 answer-only prompts (the chat format) x G = 8 completions,
SmolLM2-135M-Instruct in bf16 with rank-16 LoRA on all seven projections, temperature
0.9, fresh LoRA (the base model's answers). Two shapes: `eos` (at most 64 new tokens,
ending at the model's end-of-sequence: rows end at different lengths and leave the batch)
and `fixed` (128 tokens, end-of-sequence off: every row decodes to the end). Each variant runs once to warm up (kernel compilation),
then --repeats times; the median seconds and tokens/s are kept.

Variants: `current` with its own batch (the KV-cache budget's: the whole step for this
model) and with batch 64; `baseline` (--baseline FILE: an older rollouts.py, e.g.
`git show 584aeb8:daemon/training/rollouts.py > /tmp/rollouts_old.py`) with batch 64,
as the GRPO step called it then. The completions of each variant are compared with the
current one's (equal on the CPU; on a GPU the batch composition may change rounding).

    python3 bench/rollout_bench.py --model-dir /tmp/pack-model/smollm2-bf16 \\
        --baseline /tmp/rollouts_old.py --out rollouts.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location("rollouts_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--baseline", type=Path, help="an older rollouts.py to compare with")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import mlx.core as mx

    from mathlora_daemon.config import Config, LoraConfig, TrainConfig
    from mathlora_daemon.demo.mathgen import generate_problems
    from mathlora_daemon.training import rollouts as current
    from mathlora_daemon.training.model import apply_lora, load_base
    from mathlora_daemon.training.template import PromptFormat

    model, tokenizer, _ = load_base(args.model_dir)
    apply_lora(model, Config(lora=LoraConfig(rank=16, alpha=32.0, dropout=0.0, targets=TARGETS),
                             train=TrainConfig(seed=0)))
    mx.eval(model.parameters())
    fmt = PromptFormat.of("chat", tokenizer)
    prompts = [list(fmt.prompt_ids(r["problem"])) for r in generate_problems(args.prompts, seed=11)]
    seeds = [[1000 + 37 * i + j for j in range(args.group_size)] for i in range(len(prompts))]
    eos = set(tokenizer.eos_token_ids)

    variants = [("current", current, None), ("current-64", current, 64)]
    if args.baseline:
        variants.append(("baseline-64", load_module(args.baseline), 64))
    record = {"header": {"command": " ".join(sys.argv), "platform": platform.platform(),
                         "device": str(mx.default_device()), "mlx": mx.__version__, "model": str(args.model_dir),
                         "prompts": len(prompts), "group_size": args.group_size,
                         "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
                         "lora": "rank 16, all 7 projections", "temperature": 0.9}, "shapes": {}}
    for shape, max_new, use_eos in (("eos", 64, True), ("fixed", 128, False)):
        tokenizer.eos_token_ids = eos if use_eos else set()
        rows, reference = {}, None
        for name, module, batch in variants:
            def once():
                kwargs = {"batch_size": batch} if batch else {}
                return module.sample_rollouts(model, tokenizer, prompts, seeds, max_new, temperature=0.9, **kwargs)

            once()  # warm-up: kernels compile for the shapes
            runs = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                rollouts, stats = once()
                runs.append((time.perf_counter() - started, stats["tokens"]))
            ids = [r.completion_ids for r in rollouts]
            reference = reference or ids
            seconds = statistics.median(s for s, _ in runs)
            rows[name] = {"seconds": round(seconds, 4), "tokens": runs[0][1],
                          "tokens_per_s": round(runs[0][1] / seconds, 1), "batch": stats.get("batch_size", batch),
                          "same_completions_as_current": ids == reference,
                          "same_completion_share": round(sum(a == b for a, b in zip(ids, reference)) / len(ids), 3)}
            print(shape, name, json.dumps(rows[name]), flush=True)
        if "baseline-64" in rows:
            rows["speedup_current_over_baseline"] = round(rows["baseline-64"]["seconds"] / rows["current"]["seconds"], 2)
        rows["speedup_current_over_current_64"] = round(rows["current-64"]["seconds"] / rows["current"]["seconds"], 2)
        record["shapes"][shape] = rows
    tokenizer.eos_token_ids = eos
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
