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

from mathlora_daemon.errors import InputError
from mathlora_daemon.evaluation.answers import FORMATTED, HOWS, answers_match, extract_answer
from mathlora_daemon.rundir import ADAPTER_WEIGHTS, RunDir
from mathlora_daemon.training.template import format_prompt

DEFAULT_LIMIT = 50
DEFAULT_MAX_NEW_TOKENS = 256
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


def greedy_generate(model, tokenizer, prompt: str, max_tokens: int) -> tuple[str, int]:
    """Given a loaded model, its tokenizer, a templated prompt and a token limit, return
    (the greedy continuation, tokens generated); it stops at EOS, at the limit, or at a
    template header (a new example begun)."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    text, tokens = "", 0
    for response in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=0.0)):
        text += response.text
        tokens = response.generation_tokens
        if any(m in text for m in STOP_MARKERS):
            break
    return cut_at_markers(text), tokens


def reference_answer(item: dict) -> str | None:
    """Given a problem record, return its reference answer: the non-empty `answer`
    field, else the answer extracted from its `solution`, else None."""
    answer = item.get(ANSWER_FIELD)
    if answer is not None and str(answer).strip():
        return str(answer).strip()
    solution = item.get("solution")
    return extract_answer(solution)[0] if isinstance(solution, str) else None


def _load_model(model_dir: Path, adapter_path: Path | None):
    from mlx_lm.utils import load

    if not (model_dir / "config.json").is_file():
        raise InputError(f"model: {model_dir} is not an MLX model directory (no config.json)")
    if adapter_path is not None and not (adapter_path / ADAPTER_WEIGHTS).is_file():
        raise InputError(f"--adapter-path: {adapter_path} holds no adapters.safetensors")
    return load(str(model_dir), adapter_path=str(adapter_path) if adapter_path else None)


def evaluate(model_dir: Path, problems: list[dict], adapter_path: Path | None, max_new_tokens: int, limit: int,
             generate_fn: GenerateFn | None = None, progress: bool | None = None) -> dict:
    """Given a model directory, problem records (`problem`, plus `answer` and/or
    `solution`), optional adapters, a token limit and a problem limit (0 = all), return
    {"adapter_path", "summary", "items"}: every scored problem's prediction, how it was
    extracted, whether it is correct and well formatted, and the summary (n, accuracy,
    format compliance, mean generated tokens, seconds); raise InputError for a missing
    model or adapters, bad limits, or no problem with a problem text and a reference.

    Problems without a problem text or a reference answer are not generated for; they
    are counted in summary["skipped"]. `generate_fn` replaces greedy generation (tests).
    """
    from tqdm import tqdm

    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens {max_new_tokens}: expected an integer >= 1")
    if limit < 0:
        raise InputError(f"--limit {limit}: expected an integer >= 0 (0 = all)")
    scorable = [(i, p, reference_answer(p)) for i, p in enumerate(problems)]
    scorable = [(i, p, ref) for i, p, ref in scorable
                if isinstance(p.get("problem"), str) and p["problem"].strip() and ref]
    skipped = len(problems) - len(scorable)
    if limit:
        scorable = scorable[:limit]
    if not scorable:
        raise InputError(f"none of the {len(problems)} problems has both a problem text and a reference answer "
                         f"(an '{ANSWER_FIELD}' field or a solution with a final answer)")

    started = time.monotonic()
    model, tokenizer = _load_model(model_dir, adapter_path)
    load_seconds = time.monotonic() - started
    generate = generate_fn or greedy_generate
    show = sys.stderr.isatty() if progress is None else progress
    which = "adapters" if adapter_path else "base"
    items = []
    started = time.monotonic()
    for index, problem, reference in tqdm(scorable, desc=f"eval {which}", unit=" problems", disable=not show):
        out = generate(model, tokenizer, format_prompt(problem["problem"]), max_new_tokens)
        text, tokens = out if isinstance(out, tuple) else (out, len(tokenizer.encode(out, add_special_tokens=False)))
        predicted, how = extract_answer(text)
        items.append({"index": index, "problem": problem["problem"], "reference": reference, "predicted": predicted,
                      "how": how, "correct": answers_match(predicted, reference), "format_ok": how in FORMATTED,
                      "tokens": tokens, "output": text})
    seconds = time.monotonic() - started
    return {"adapter_path": str(adapter_path) if adapter_path else None,
            "summary": summarize(items, skipped, seconds, load_seconds), "items": items}


def summarize(items: list[dict], skipped: int = 0, seconds: float = 0.0, load_seconds: float = 0.0) -> dict:
    """Given scored items, return the summary: n, correct, accuracy, format_ok,
    format_compliance (answers boxed or on a "Final Answer" line), how answers were
    extracted, mean generated tokens, skipped problems and seconds."""
    n = len(items)
    correct = sum(item["correct"] for item in items)
    formatted = sum(item["format_ok"] for item in items)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0, "format_ok": formatted,
            "format_compliance": formatted / n if n else 0.0,
            "extracted": {how: sum(item["how"] == how for item in items) for how in HOWS},
            "mean_generated_tokens": sum(item["tokens"] for item in items) / n if n else 0.0,
            "skipped": skipped, "seconds": round(seconds, 3), "load_seconds": round(load_seconds, 3)}


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
    except Exception as exc:  # network, unknown dataset, subset or split
        raise InputError(f"--data {HUB_PREFIX}{dataset_id} (subset {subset!r}, split {split!r}) could not be "
                         f"loaded: {exc}") from None
    return [_problem_record(row, fields, f"#{i}") for i, row in enumerate(rows, 1)]


def _problem_record(row: dict, fields: dict[str, str], label: str) -> dict:
    # Records use the names evaluate() reads, whatever the dataset calls them.
    return {"label": label, **{ours: row.get(theirs) for ours, theirs in fields.items()}}


def load_problems(data: str | None, run_dir: Path, data_cfg, split: str = DEFAULT_SPLIT, subset: str | None = None,
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
        path = RunDir(run_dir).data / "test.jsonl"
        if not path.is_file():
            raise InputError(f"no held-out problems: {path} does not exist (the demo writes it); "
                             f"pass --data FILE or --data {HUB_PREFIX}<dataset id>")
        data = str(path)
    cfg = replace(data_cfg, name=data, split=split, subset=subset or data_cfg.subset, limit=0)
    source = resolve_source(cfg, run_dir)
    if not source.is_local:
        raise InputError(f"--data {data}: no such file or folder (looked in {run_dir} and {Path.cwd()}); "
                         f"a hub dataset is named {HUB_PREFIX}{data}")
    columns = list(dict.fromkeys(fields.values()))
    problems = [_problem_record(record, fields, label) for path in source.files
                for label, record in read_records(path, columns, source.file_name(path))]
    return data, problems


# --- output -------------------------------------------------------------------------------

def format_table(record: dict) -> str:
    """Given the eval record, return the side-by-side table of its runs (base, adapters):
    accuracy, format compliance, n, mean generated tokens and seconds."""
    runs = record["runs"]
    names = list(runs)
    rows = [("accuracy", lambda s: f"{100 * s['accuracy']:.1f}%"),
            ("format", lambda s: f"{100 * s['format_compliance']:.1f}%"),
            ("n", lambda s: str(s["n"])),
            ("tokens", lambda s: f"{s['mean_generated_tokens']:.1f}"),
            ("seconds", lambda s: f"{s['seconds']:.1f}")]
    cells = [[label] + [fmt(runs[name]["summary"]) for name in names] for label, fmt in rows]
    widths = [max(len(row[c]) for row in cells + [[""] + names]) + 3 for c in range(len(names) + 1)]
    widths[0] = max(widths[0], 15)
    lines = ["".ljust(widths[0]) + "".join(n.ljust(w) for n, w in zip(names, widths[1:]))]
    lines += ["".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


# --- the command ---------------------------------------------------------------------------

def eval_main(cfg, run_dir: Path, data: str | None, split: str, subset: str | None, answer_field: str, limit: int,
              max_new_tokens: int, adapter_path: Path | None, no_base: bool, as_json: bool, out: Path | None,
              generate_fn: GenerateFn | None = None) -> int:
    """The `eval` command: evaluate the base model and the adapters (default: the run's
    own, when trained), print the table (or the JSON record), also write it to `out`, and
    return 0; raise InputError for a missing model, adapters or problems."""
    from mathlora_checkpoints.fsio import atomic_write_text

    run = RunDir(run_dir)
    adapters = adapter_path
    if adapters is not None and not (adapters / ADAPTER_WEIGHTS).is_file():
        raise InputError(f"--adapter-path: {adapters} holds no adapters.safetensors")
    if adapters is None:
        if (run.adapters / ADAPTER_WEIGHTS).is_file():
            adapters = run.adapters
        elif no_base:
            raise InputError(f"--no-base: nothing to evaluate, {run.adapters} holds no adapters.safetensors "
                             "(train first, or pass --adapter-path)")
        else:
            print(f"no adapters in {run.adapters}: evaluating the base model only", file=sys.stderr)
    described, problems = load_problems(data, run.root, cfg.data, split, subset, answer_field, limit)
    model_dir = run.model(cfg.model.path)
    runs = {}
    for name, path in (("base", None), ("adapters", adapters)):
        if (name == "base" and no_base) or (name == "adapters" and adapters is None):
            continue
        runs[name] = evaluate(model_dir, problems, path, max_new_tokens, limit, generate_fn=generate_fn)
    record = {"model": str(model_dir), "data": described, "limit": limit, "max_new_tokens": max_new_tokens,
              "runs": runs}
    text = json.dumps(record, indent=2, ensure_ascii=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, text + "\n")
    print(text if as_json else f"{described}\n{format_table(record)}")
    return 0
