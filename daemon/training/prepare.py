"""Dataset -> tokens -> token cache: the `prepare` step, also run at the start of `run`.

Given the config and tokenizer, return the token cache, building it only when no cache
with the same key exists. Each row becomes its prompt's tokens followed by its
solution's (training/template.py), with the prompt's length kept for
`train.mask_prompt`; a row whose problem hashes below `data.validation_fraction` (or
every row of `data.validation_name`) goes to the validation split and is never trained
on. Long rows are chunked or skipped (`data.long_rows`). The key hashes the datasets'
content identity, the tokenizer files, the prompt format, max_seq_len and the chunking,
so any change to those builds a new cache and an unchanged setup never tokenizes twice.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from mathlora_daemon.config import DataConfig
from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.training.cache import Split, TokenCache, cache_key, load_cache, write_cache
from mathlora_daemon.training.data import RowStats, count_rows, iter_rows, resolve_source, source_identity
from mathlora_daemon.training.template import PromptFormat

# How long rows are cut; part of the cache key, so a cache cut another way is rebuilt, never misread.
CHUNKING = "max_seq_len+1 tokens, overlap 1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")


def tokenizer_identity(model_dir: Path) -> str:
    """Given a model directory, return a hash of its tokenizer files' bytes."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = model_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:20]


def encode_example(tokenizer, text: str) -> list[int]:
    """Given the tokenizer wrapper and a training text, return its token ids with BOS
    as the tokenizer adds it and EOS appended (so the model learns where to stop)."""
    ids = list(tokenizer.encode(text))
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def split_chunks(ids: list[int], max_seq_len: int) -> list[list[int]]:
    """Given token ids, return chunks of at most max_seq_len + 1 tokens.

    A chunk of n tokens feeds the model n - 1 positions (`tokens[:-1]`) and trains n - 1
    next-token targets, so a full chunk of max_seq_len + 1 tokens feeds the model exactly
    max_seq_len positions: a round size on which GPU matmul and attention kernels stay on
    their fast path (1023 positions ran 1.5x slower than 1024 on an H200).
    Consecutive chunks overlap by one token, so every token after the first is still a
    prediction target exactly once.
    """
    if len(ids) <= max_seq_len + 1:
        return [ids]
    return [ids[start:start + max_seq_len + 1] for start in range(0, len(ids) - 1, max_seq_len)]


def validation_row(problem: str, fraction: float) -> bool:
    """Whether a row is held out for validation: a hash of its problem text, as a number
    in [0, 1), below `fraction`. Deterministic, independent of the row's position, and
    the same problem never lands on both sides."""
    digest = hashlib.sha256(problem.strip().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def cache_identity(cfg: DataConfig, source_ident: dict, validation_ident: dict, model_dir: Path,
                   prompt_format: PromptFormat) -> dict:
    return {"data": source_ident, "validation": validation_ident, "tokenizer": tokenizer_identity(model_dir),
            "prompt_format": prompt_format.identity, "max_seq_len": cfg.max_seq_len, "chunking": CHUNKING,
            "long_rows": cfg.long_rows}


@dataclass
class PrepareCounts:
    """What tokenizing found, beyond the rows read and skipped."""

    long_rows: int = 0       # rows longer than max_seq_len + 1 tokens (chunked or skipped)
    long_skipped: int = 0    # of those, skipped (data.long_rows = "skip")
    prompt_too_long: int = 0  # rows whose prompt alone fills max_seq_len: nothing of the solution would be seen


def _add_row(row, fmt: PromptFormat, cfg: DataConfig, split: Split, counts: PrepareCounts,
             keep_problem: bool, stats: RowStats, keep_reference: bool = False) -> None:
    ids, prompt_len = fmt.example(row.problem, row.solution)
    if prompt_len >= cfg.max_seq_len:
        # Not a row to train on (nothing of its solution would fit), and said like any
        # other skipped row, with its label: a 5 MB problem must not vanish in silence.
        counts.prompt_too_long += 1
        stats.used -= 1
        stats.skip(row.label, f"its prompt alone is {prompt_len} tokens, data.max_seq_len is {cfg.max_seq_len}")
        return
    chunks = split_chunks(ids, cfg.max_seq_len)
    if len(chunks) > 1:  # more than max_seq_len targets
        counts.long_rows += 1
        if cfg.long_rows == "skip":
            counts.long_skipped += 1
            return
    for k, chunk in enumerate(chunks):
        if len(chunk) >= 2:
            split.add(chunk, max(0, min(prompt_len - k * cfg.max_seq_len, len(chunk))))
    if keep_problem:
        split.problems.append({"label": row.label, "problem": row.problem, "solution": row.solution,
                               "answer": row.answer, "kind": row.kind})
    elif keep_reference:  # GRPO's training rows: the problem and the answer to check, not the solution
        from mathlora_daemon.training.rewards import reference_of

        reference = reference_of(row.answer, row.solution)
        if reference is not None:
            split.problems.append({"label": row.label, "problem": row.problem, "answer": reference,
                                   "kind": row.kind})


def prepare_tokens(cfg: DataConfig, run: RunDir, model_dir: Path, tokenizer, log,
                   progress: bool | None = None, train_problems: bool = False) -> TokenCache:
    """Given the data config, run directory, model directory and its tokenizer, return
    the training split's token cache (its `.validation` holds the held-out split); raise
    InputError when a dataset cannot be read or leaves no usable row (nothing is written
    then)."""
    fmt = PromptFormat.of(cfg.template, tokenizer)
    source = resolve_source(cfg, run.root)
    val_cfg = replace(cfg, name=cfg.validation_name, limit=0) if cfg.validation_name else None
    val_source = resolve_source(val_cfg, run.root) if val_cfg else None
    val_ident = source_identity(val_source, val_cfg) if val_source else {"fraction": cfg.validation_fraction}
    identity = cache_identity(cfg, source_identity(source, cfg), val_ident, model_dir, fmt)
    if train_problems:  # GRPO keeps the training rows' problems and reference answers too
        identity["train_problems"] = {"answer_field": cfg.answer_field}
    key = cache_key(identity)
    root = run.cache
    cached = load_cache(root / key)
    if cached is not None:
        log.info("data.prepare.cached", key=key, sequences=len(cached), tokens=int(cached.meta["tokens"]),
                 validation_sequences=cached.meta.get("validation_sequences", 0))
        return cached

    from tqdm import tqdm  # the bar only draws on a terminal

    log.info("data.prepare.start", key=key, dataset=cfg.name, files=[p.name for p in source.files],
             template=cfg.template, validation=cfg.validation_name or cfg.validation_fraction)
    started = time.monotonic()
    stats, val_stats, counts = RowStats(), RowStats(), PrepareCounts()
    train, validation = Split(), Split()
    show = sys.stderr.isatty() if progress is None else progress
    rows = iter_rows(source, cfg, stats)
    for row in tqdm(rows, desc="tokenizing", unit=" rows", disable=not show, total=count_rows(source, cfg)):
        held_out = val_source is None and validation_row(row.problem, cfg.validation_fraction)
        _add_row(row, fmt, cfg, validation if held_out else train, counts, keep_problem=held_out, stats=stats,
                 keep_reference=train_problems and not held_out)
    if val_source is not None:
        for row in iter_rows(val_source, val_cfg, val_stats):
            _add_row(row, fmt, cfg, validation, counts, keep_problem=True, stats=val_stats)

    skipped = stats.skipped + val_stats.skipped
    if skipped:
        log.warning("data.prepare.skipped", skipped=skipped, first=stats.skipped_examples + val_stats.skipped_examples)
    if not train.sequences:
        raise InputError(f"dataset {cfg.name!r} has no usable rows: {stats.rows} rows read, {stats.skipped} skipped "
                         f"(a missing or empty '{cfg.problem_field}' or solution, or a prompt longer than "
                         "data.max_seq_len)"
                         + (f" (first: {', '.join(stats.skipped_examples)})" if stats.skipped_examples else "")
                         + (f", {counts.long_skipped} longer than max_seq_len skipped" if counts.long_skipped else ""))
    if val_source is not None and not validation.sequences:
        raise InputError(f"data.validation_name = {cfg.validation_name!r}: no usable rows ({val_stats.rows} read, "
                         f"{val_stats.skipped} skipped)")
    meta = {"identity": identity, "dataset": cfg.name, "rows": stats.rows, "used_rows": stats.used,
            "skipped_rows": stats.skipped, "skipped_examples": stats.skipped_examples,
            "exceeded_max_seq_len": counts.long_rows, "long_rows": cfg.long_rows,
            "long_rows_skipped": counts.long_skipped, "prompt_too_long": counts.prompt_too_long,
            "max_seq_len": cfg.max_seq_len, "template": cfg.template, "prompt_format": fmt.describe(),
            "validation": cfg.validation_name or f"{cfg.validation_fraction:g} of the rows"}
    cache = write_cache(root, key, train, validation, meta)
    seconds = time.monotonic() - started
    log.info("data.prepare.done", key=key, rows=stats.rows, used=stats.used, skipped=stats.skipped,
             sequences=len(cache), tokens=int(cache.meta["tokens"]), exceeded_max_seq_len=counts.long_rows,
             exceeded_share=round(counts.long_rows / max(stats.used, 1), 4), long_rows=cfg.long_rows,
             long_rows_skipped=counts.long_skipped, prompt_too_long=counts.prompt_too_long,
             validation_rows=len(validation.problems), validation_sequences=len(validation.sequences),
             seconds=round(seconds, 3), rows_per_s=round(stats.rows / max(seconds, 1e-9), 1))
    return cache
