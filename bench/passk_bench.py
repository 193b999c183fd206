"""How much can GRPO add? Sampled accuracy, pass@k and majority vote of trained adapters (issue 21).

GRPO learns only from groups whose completions disagree, and what it mostly does is make
the right answer the model already samples sometimes into the one it gives first (Yue et
al. 2025, "Does Reinforcement Learning Really Incentivize Reasoning Capacity in LLMs
Beyond the Base Model?": RL raises pass@1 toward pass@k, not pass@k itself). So pass@k of
the adapters GRPO starts from bounds what GRPO can be expected to reach in a short run,
and the share of problems whose k samples all agree is the share of groups that carry no
signal. This measures, for each adapter directory given (or the base model, "base"):

  greedy      accuracy answering greedily (what `eval` reports), on the same problems
  sampled     mean accuracy of the k samples (pass@1 at the sampling temperature)
  pass@j      the unbiased estimate (Chen et al. 2021) for j = 1, 2, 4, ..., k
  maj@k       accuracy of the most common final answer among the k samples
  flat        share of problems whose k samples are all right or all wrong

Sampling is the daemon's own (training/rollouts.py: the GRPO rollouts, seeded per problem
and sample), scoring the reward's (training/rewards.py: math-verify, then the fallback).

    python3 bench/passk_bench.py --model-dir <smollm2-bf16> --test /tmp/grpo/data/test.jsonl \\
        --adapters base,/tmp/grpo/runs/sft-half/adapters,/tmp/grpo/runs/sft/adapters \\
        --k 16 --temperature 0.9 --max-new-tokens 64 --out passk.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from math import comb
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pass_at(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def measure(model_dir: Path, adapters: Path | None, problems: list[dict], limit: int, k: int, temperature: float,
            max_new_tokens: int, seed: int) -> dict:
    import mlx.core as mx

    from mathlora_daemon.evaluation.evaluate import answer_and_score, recorded_template, scorable_problems
    from mathlora_daemon.modelio.loading import load_model
    from mathlora_daemon.training.grpo import rollout_seeds
    from mathlora_daemon.training.rewards import score
    from mathlora_daemon.training.rollouts import sample_rollouts
    from mathlora_daemon.training.template import PromptFormat

    model, tokenizer = load_model(model_dir, adapters)
    template = recorded_template(adapters, "chat")
    scorable, _ = scorable_problems(problems, limit)  # as `eval` takes them: a text and a reference
    greedy = answer_and_score(model, tokenizer, template, scorable, max_new_tokens)
    fmt = PromptFormat.of(template, tokenizer)
    started = time.monotonic()
    rollouts, stats = sample_rollouts(model, tokenizer, [list(fmt.prompt_ids(p["problem"])) for _, p, _ in scorable],
                                      [rollout_seeds(seed, 0, i, k) for i in range(len(scorable))],
                                      max_new_tokens, temperature=temperature)
    mx.clear_cache()
    rows = []
    for i, (_, problem, reference) in enumerate(scorable):
        scores = [score(r.text, reference) for r in rollouts[i * k:(i + 1) * k]]
        correct = sum(s.correct for s in scores)
        votes = Counter(s.answer for s in scores if s.answer is not None)
        top = votes.most_common(1)[0][0] if votes else None
        top_correct = next((s.correct for s in scores if s.answer == top), False) if top is not None else False
        rows.append({"kind": problem.get("kind"), "correct": correct, "formatted": sum(s.formatted for s in scores),
                     "distinct_answers": len(votes), "maj_correct": bool(top_correct),
                     "greedy_correct": bool(greedy[i]["correct"])})
    n = len(rows)
    js = [j for j in (1, 2, 4, 8, 16, 32, 64) if j <= k]
    summary = {
        "n": n, "k": k, "temperature": temperature,
        "greedy": sum(r["greedy_correct"] for r in rows) / n,
        "sampled": sum(r["correct"] for r in rows) / (n * k),
        "format": sum(r["formatted"] for r in rows) / (n * k),
        **{f"pass@{j}": sum(pass_at(k, r["correct"], j) for r in rows) / n for j in js},
        f"maj@{k}": sum(r["maj_correct"] for r in rows) / n,
        "flat": sum(r["correct"] in (0, k) for r in rows) / n,
        "all_right": sum(r["correct"] == k for r in rows) / n,
        "distinct_answers_mean": sum(r["distinct_answers"] for r in rows) / n,
        "sampling_s": round(time.monotonic() - started, 1), "tokens_per_s": round(stats["tokens_per_s"]),
    }
    kinds = sorted({r["kind"] for r in rows if r["kind"]})
    summary["by_kind"] = {kind: {"n": len(g), "greedy": sum(r["greedy_correct"] for r in g) / len(g),
                                 f"pass@{k}": sum(r["correct"] > 0 for r in g) / len(g),
                                 "sampled": sum(r["correct"] for r in g) / (len(g) * k)}
                          for kind in kinds for g in [[r for r in rows if r["kind"] == kind]]}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True, help="held-out problems (.jsonl: problem, answer, kind)")
    parser.add_argument("--adapters", required=True, help="comma-separated adapter directories; 'base' for none")
    parser.add_argument("--limit", type=int, default=300, help="the first N scorable problems (0 = all), as eval")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx

    problems = [json.loads(line) for line in args.test.read_text().splitlines() if line.strip()]
    record = {"header": {"command": " ".join(["bench/passk_bench.py", *sys.argv[1:]]), "platform": platform.platform(),
                         "device": str(mx.default_device()), "mlx": mx.__version__, "model": str(args.model_dir),
                         "test": str(args.test)},
              "runs": {}}
    for name in args.adapters.split(","):
        adapters = None if name == "base" else Path(name)
        if adapters is not None and not adapters.exists():
            print(f"{name}: missing, skipped", flush=True)
            continue
        summary = measure(args.model_dir, adapters, problems, args.limit, args.k, args.temperature,
                          args.max_new_tokens, args.seed)
        label = "base" if adapters is None else adapters.parent.name
        record["runs"][label] = summary
        print(label, json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                 for k, v in summary.items() if k != "by_kind"}), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
