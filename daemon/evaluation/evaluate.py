"""`eval`: accuracy of the base model and of the adapters on held-out problems.

Each problem is answered greedily (temperature 0) with the prompt wrapped in the
training template, the final answer is extracted (daemon.answers: last `\\boxed{}`, a
"Final Answer:" line, the last number) and compared with the reference: the problem's
`answer` field, else the answer its `solution` ends with. The base model and the
adapters are scored on the same problems and shown side by side, as a table and as JSON
(both summaries and every item).

Problems come from the demo's test split (`<run-dir>/data/test.jsonl`) by default, a
local .jsonl/.parquet file or folder (`--data FILE`), or a hub dataset through
`datasets` (`--data hub:ID --split test`).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from mathlora_daemon.errors import InputError, hub_load_error
from mathlora_daemon.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RunDir
from mathlora_daemon.training.answers import FORMATTED, HOWS, answers_match, extract_answer
from mathlora_daemon.training.data import KIND_FIELDS
from mathlora_daemon.training.template import PromptFormat

DEFAULT_LIMIT = 50
DEFAULT_MAX_NEW_TOKENS = 512  # a worked solution; DeepSeek-Math's run to several hundred tokens
BATCH_SIZE = 32  # problems answered together
DEFAULT_SPLIT = "test"
ANSWER_FIELD = "answer"
HUB_PREFIX = "hub:"
# The template's own headers: once the model writes one, it has started a new example,
# and an answer boxed there is not its answer to this problem.
STOP_MARKERS = ("\n### Problem:", "\n### Solution:")

# (model, tokenizer, prompt, max_tokens) -> the generated text, or (text, tokens generated).
GenerateFn = Callable[[Any, Any, str, int], "str | tuple[str, int]"]


def cut_at_markers(text: str) -> str:
    """Given a generation, return it up to the first template header it wrote."""
    cut = min((i for i in (text.find(m) for m in STOP_MARKERS) if i >= 0), default=len(text))
    return text[:cut]


def batched_greedy(model, tokenizer, prompts: list[list[int]], max_tokens: int,
                   batch_size: int = BATCH_SIZE) -> list[tuple[str, int]]:
    """Given a loaded model, its tokenizer, prompts (token ids) and a token limit, return
    (the greedy continuation, tokens generated) for each, answered `batch_size` at a time
    by mlx-lm's batch generator (one forward pass serves the whole batch at every token).
    Generation stops at an end-of-turn token or the limit; a tutor-format answer is cut
    where the model began a new example."""
    from mlx_lm.generate import batch_generate

    out = []
    for start in range(0, len(prompts), batch_size):
        response = batch_generate(model, tokenizer, prompts[start:start + batch_size], max_tokens=max_tokens,
                                  completion_batch_size=batch_size, prefill_batch_size=min(batch_size, 8),
                                  return_token_ids=True)
        out += [(cut_at_markers(text), len(ids)) for text, ids in zip(response.texts, response.token_ids)]
    return out


def reference_answer(item: dict) -> str | None:
    """Given a problem record, return its reference answer: the non-empty `answer`
    field, else the answer extracted from its `solution`, else None."""
    answer = item.get(ANSWER_FIELD)
    if answer is not None and str(answer).strip():
        return str(answer).strip()
    solution = item.get("solution")
    return extract_answer(solution)[0] if isinstance(solution, str) else None


def recorded_template(adapter_path: Path | None, default: str) -> str:
    """The prompt format adapters were trained in (adapter_config.json's prompt_format),
    else `default` (the run's data.template)."""
    if adapter_path is None:
        return default
    try:
        config = json.loads((Path(adapter_path) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default
    template = (config.get("prompt_format") or {}).get("template") if isinstance(config, dict) else None
    return template if template in ("chat", "tutor") else default


def _load_model(model_dir: Path, adapter_path: Path | None):
    from mathlora_daemon.modelio.loading import load_model

    return load_model(model_dir, adapter_path)


def scorable_problems(problems: list[dict], limit: int) -> tuple[list[tuple[int, dict, str]], int]:
    """The problems that have a text and a reference answer (at most `limit`, 0 = all),
    as (index, record, reference), and how many were skipped; raise InputError for none."""
    scorable = [(i, p, reference_answer(p)) for i, p in enumerate(problems)]
    scorable = [(i, p, ref) for i, p, ref in scorable
                if isinstance(p.get("problem"), str) and p["problem"].strip() and ref]
    skipped = len(problems) - len(scorable)
    if limit:
        scorable = scorable[:limit]
    if not scorable:
        raise InputError(f"none of the {len(problems)} problems has both a problem text and a reference answer "
                         f"(an '{ANSWER_FIELD}' field or a solution with a final answer)")
    return scorable, skipped


def answer_and_score(model, tokenizer, template: str, scorable, max_new_tokens: int,
                     generate_fn: GenerateFn | None = None, batch_size: int = BATCH_SIZE) -> list[dict]:
    """Given a loaded model, its tokenizer, the prompt format's name and scorable
    problems, answer them greedily (batched) and return every scored item."""
    fmt = PromptFormat.of(template, tokenizer)
    if generate_fn is None:
        outs = batched_greedy(model, tokenizer, [fmt.prompt_ids(p["problem"]) for _, p, _ in scorable],
                              max_new_tokens, batch_size)
    else:  # one prompt at a time, as text (tests)
        outs = []
        for _, problem, _ in scorable:
            out = generate_fn(model, tokenizer, fmt.prompt_text(problem["problem"]), max_new_tokens)
            outs.append(out if isinstance(out, tuple)
                        else (out, len(tokenizer.encode(out, add_special_tokens=False))))
    items = []
    for (index, problem, reference), (text, tokens) in zip(scorable, outs):
        predicted, how = extract_answer(text)
        items.append({"index": index, "problem": problem["problem"], "kind": problem.get("kind"),
                      "reference": reference, "predicted": predicted, "how": how,
                      "correct": answers_match(predicted, reference), "format_ok": how in FORMATTED,
                      "tokens": tokens, "output": text})
    return items


def evaluate(model_dir: Path, problems: list[dict], adapter_path: Path | None, max_new_tokens: int, limit: int,
             generate_fn: GenerateFn | None = None, progress: bool | None = None, template: str = "tutor",
             batch_size: int = BATCH_SIZE) -> dict:
    """Given a model directory, problem records (`problem`, plus `answer` and/or
    `solution`, optionally `kind`), optional adapters, a token limit and a problem limit
    (0 = all), return {"adapter_path", "template", "summary", "items"}: every scored
    problem's prediction, how it was extracted, whether it is correct and well
    formatted, and the summary (n, accuracy, format compliance, per kind, mean generated
    tokens, seconds); raise InputError for a missing model or adapters, bad limits, or no
    problem with a problem text and a reference.

    The prompt format is the one the adapters record, else `template`. Problems without
    a problem text or a reference answer are not generated for; they are counted in
    summary["skipped"]. `generate_fn` replaces greedy generation (tests).
    """
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {max_new_tokens}: expected an integer >= 1")
    if limit < 0:
        raise InputError(f"--limit {limit}: expected an integer >= 0 (0 = all)")
    scorable, skipped = scorable_problems(problems, limit)
    started = time.monotonic()
    model, tokenizer = _load_model(model_dir, adapter_path)
    load_seconds = time.monotonic() - started
    template = recorded_template(adapter_path, template)
    which = "adapters" if adapter_path else "base"
    if sys.stderr.isatty() if progress is None else progress:
        print(f"eval {which}: {len(scorable)} problems, {template} format, batches of {batch_size} ...",
              file=sys.stderr)
    started = time.monotonic()
    items = answer_and_score(model, tokenizer, template, scorable, max_new_tokens, generate_fn, batch_size)
    seconds = time.monotonic() - started
    return {"adapter_path": str(adapter_path) if adapter_path else None, "template": template,
            "summary": summarize(items, skipped, seconds, load_seconds), "items": items}


def final_eval(model, tokenizer, problems: list[dict], n: int, template: str,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict:
    """The end of a run (train.final_eval): the first `n` validation problems answered
    by the base model (the adapters switched off) and by the trained adapters, in the
    training format; returns {"n", "base": summary, "adapters": summary, "seconds"}."""
    from mathlora_daemon.training.model import adapters_off

    started = time.monotonic()
    scorable, skipped = scorable_problems(problems, n)
    out = {}
    for name in ("base", "adapters"):
        t0 = time.monotonic()
        if name == "base":
            with adapters_off(model):
                items = answer_and_score(model, tokenizer, template, scorable, max_new_tokens)
        else:
            items = answer_and_score(model, tokenizer, template, scorable, max_new_tokens)
        out[name] = summarize(items, skipped, time.monotonic() - t0)
    return {"n": len(scorable), **out, "seconds": round(time.monotonic() - started, 1)}


def summarize(items: list[dict], skipped: int = 0, seconds: float = 0.0, load_seconds: float = 0.0) -> dict:
    """Given scored items, return the summary: n, correct, accuracy, format_ok,
    format_compliance (answers boxed or on a "Final Answer" line), the same per problem
    kind, how answers were extracted, mean generated tokens, skipped problems, seconds
    and problems per second."""
    def counts(group: list[dict]) -> dict:
        n = len(group)
        correct, formatted = sum(i["correct"] for i in group), sum(i["format_ok"] for i in group)
        return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "format_ok": formatted,
                "format_compliance": formatted / n if n else 0.0}

    kinds = sorted({item.get("kind") for item in items if item.get("kind")})
    return {**counts(items),
            "by_kind": {kind: counts([i for i in items if i.get("kind") == kind]) for kind in kinds},
            "extracted": {how: sum(item["how"] == how for item in items) for how in HOWS},
            "mean_generated_tokens": sum(item["tokens"] for item in items) / len(items) if items else 0.0,
            "skipped": skipped, "seconds": round(seconds, 3), "load_seconds": round(load_seconds, 3),
            "problems_per_s": round(len(items) / seconds, 3) if seconds > 0 else None}


# --- problems -----------------------------------------------------------------------------

def _hub_problems(dataset_id: str, subset: str | None, split: str, fields: dict[str, str],
                  limit: int) -> list[dict]:
    try:
        import datasets  # lazily: heavy, and only hub users need it
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise InputError(f"--data {HUB_PREFIX}{dataset_id}: `datasets` is not installed") from exc
    try:
        # Streaming reads only the rows evaluated, not a whole large dataset.
        ds = datasets.load_dataset(dataset_id, subset or None, split=split, streaming=True)
        rows = list(itertools.islice(iter(ds), limit or None))
    except Exception as exc:  # network (75), unknown dataset, subset or split (78)
        raise hub_load_error(f"--data {HUB_PREFIX}{dataset_id} (subset {subset!r}, split {split!r})", exc) from None
    return [_problem_record(row, fields, f"#{i}") for i, row in enumerate(rows, 1)]


def _problem_record(row: dict, fields: dict[str, str], label: str) -> dict:
    # Records use the names evaluate() reads, whatever the dataset calls them; the kind
    # (mathgen's `kind`, OpenR1's `problem_type`) gives the per-kind rows.
    kind = next((row[k] for k in KIND_FIELDS if isinstance(row.get(k), str) and row[k].strip()), None)
    return {"label": label, **{ours: row.get(theirs) for ours, theirs in fields.items()}, "kind": kind}


def load_problems(data: str | None, run: RunDir, data_cfg, split: str = DEFAULT_SPLIT, subset: str | None = None,
                  answer_field: str = ANSWER_FIELD, limit: int = 0) -> tuple[str, list[dict]]:
    """Given `--data` (None, a local file or folder, or `hub:ID`), the run directory and
    the data config (for the problem and solution field names), return (a description
    of the source, problem records with `label`, `problem`, `solution`, `answer`); read
    at most `limit` rows when limit > 0 and the source is a hub dataset. Raise InputError
    when the source is missing or cannot be read.

    None means the demo's test split, `<run-dir>/data/test.jsonl`. A relative path is
    looked up in the run directory, then the current directory.
    """
    from mathlora_daemon.training.data import read_records, resolve_source

    fields = {"problem": data_cfg.problem_field, "solution": data_cfg.solution_field, "answer": answer_field}
    if data is not None and data.startswith(HUB_PREFIX):
        dataset_id = data[len(HUB_PREFIX):].strip()
        if not dataset_id:
            raise InputError(f"--data {data}: expected hub:<dataset id>, e.g. hub:HuggingFaceH4/MATH-500")
        return f"{data} ({split})", _hub_problems(dataset_id, subset, split, fields, limit)
    if data is None:
        path = run.demo_test
        if not path.is_file():
            raise InputError(f"no held-out problems: {path} does not exist (the demo writes it); "
                             f"pass --data FILE or --data {HUB_PREFIX}<dataset id>")
        data = str(path)
    cfg = replace(data_cfg, name=data, split=split, subset=subset or data_cfg.subset, limit=0)
    try:
        source = resolve_source(cfg, run.root)
    except InputError as exc:  # it names the config key; the user gave --data
        raise InputError(str(exc).replace(f"data.name = {data!r}", f"--data {data}")) from None
    if not source.is_local:
        raise InputError(f"--data {data}: no such file or folder (looked in {run.root} and {Path.cwd()}); "
                         f"a hub dataset is named {HUB_PREFIX}{data}")
    columns = list(dict.fromkeys([*fields.values(), *KIND_FIELDS]))
    try:
        problems = [_problem_record(record, fields, label) for path in source.files
                    for label, record in read_records(path, columns, source.file_name(path))]
    except InputError as exc:
        raise InputError(str(exc).replace(f"data.name = {data!r}", f"--data {data}")) from None
    if not problems:
        raise InputError(f"--data {data}: holds no problems (an empty file?)")
    return data, problems


# --- output -------------------------------------------------------------------------------

def format_table(record: dict) -> str:
    """Given the eval record, return the side-by-side table of its runs (base, adapters):
    accuracy and format compliance (overall, then per problem kind), n, mean generated
    tokens, seconds."""
    runs = record["runs"]
    names = list(runs)
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    rows = [("accuracy", lambda s: pct(s["accuracy"])), ("format", lambda s: pct(s["format_compliance"])),
            ("n", lambda s: str(s["n"])), ("tokens", lambda s: f"{s['mean_generated_tokens']:.1f}"),
            ("seconds", lambda s: f"{s['seconds']:.1f}")]
    kinds = sorted({k for name in names for k in runs[name]["summary"].get("by_kind", {})})
    for kind in kinds:
        rows.append((f"{kind} accuracy / format", lambda s, k=kind: (
            f"{pct(s['by_kind'][k]['accuracy'])} / {pct(s['by_kind'][k]['format_compliance'])}"
            if k in s.get("by_kind", {}) else "-")))
    cells = [[label] + [fmt(runs[name]["summary"]) for name in names] for label, fmt in rows]
    widths = [max(len(row[c]) for row in cells + [[""] + names]) + 3 for c in range(len(names) + 1)]
    widths[0] = max(widths[0], 15)
    lines = ["".ljust(widths[0]) + "".join(n.ljust(w) for n, w in zip(names, widths[1:]))]
    lines += ["".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


# --- the command's parts (its front-end, the table or the JSON, is cli/evaluation.py) --------

def eval_adapters(run: RunDir, adapter_path: Path | None, no_base: bool) -> Path | None:
    """Given the run directory, `--adapter-path` and `--no-base`, return the adapters to
    score: `adapter_path` (checked at once, before any problem is read), else the run's
    own when trained; None when there are none (the base model alone). Raise InputError
    for adapters that cannot be loaded, or `no_base` with no adapters to evaluate."""
    if adapter_path is not None:
        from mathlora_daemon.modelio.loading import check_adapter_dir

        check_adapter_dir(adapter_path)
        return adapter_path
    if (run.adapters / ADAPTER_WEIGHTS).is_file():
        return run.adapters
    if no_base:
        raise InputError(f"--no-base: nothing to evaluate, {run.adapters} holds no adapters.safetensors "
                         "(train first, or pass --adapter-path)")
    return None


def eval_record(cfg, run: RunDir, described: str, problems: list[dict], adapters: Path | None, no_base: bool,
                limit: int, max_new_tokens: int, generate_fn: GenerateFn | None = None) -> dict:
    """Given the config, the run directory, the problems (and the description of their
    source), the adapters (None: none) and whether to leave out the base model, evaluate
    each and return the `eval` record: model, data, limit, max_new_tokens and `runs`
    (base, adapters: each summary and every item)."""
    model_dir = run.model(cfg.model.path)
    runs = {}
    for name, path in (("base", None), ("adapters", adapters)):
        if (name == "base" and no_base) or (name == "adapters" and adapters is None):
            continue
        runs[name] = evaluate(model_dir, problems, path, max_new_tokens, limit, generate_fn=generate_fn,
                              template=cfg.data.template)
    return {"model": str(model_dir), "data": described, "limit": limit, "max_new_tokens": max_new_tokens,
            "runs": runs}


def limit_note(problems: list[dict], limit: int, hub: bool) -> str:
    """What --limit left out, said at once ("50 of 60 problems (--limit 50; --limit 0 for
    all)"), or "" when it left out nothing. A hub dataset is read only up to the limit, so
    its size is not known."""
    if not limit:
        return ""
    if hub:
        return f"the first {limit} problems (--limit {limit}; --limit 0 for all)" if len(problems) >= limit else ""
    total = sum(1 for p in problems if isinstance(p.get("problem"), str) and p["problem"].strip()
                and reference_answer(p))
    return f"{limit} of {total} problems (--limit {limit}; --limit 0 for all)" if total > limit else ""
