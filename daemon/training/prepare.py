"""Dataset -> tokens -> token cache: the `prepare` step, also run at the start of `run`.

Given the config and tokenizer, return the token cache, building it only when no cache
with the same key exists. The key hashes the dataset's content identity, the tokenizer
files, the template and max_seq_len, so any change to those builds a new cache and an
unchanged setup never tokenizes twice.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np

from mathlora_daemon.config import DataConfig
from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.training import template
from mathlora_daemon.training.cache import TokenCache, cache_key, load_cache, write_cache
from mathlora_daemon.training.data import RowStats, iter_rows, resolve_source, source_identity

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


def cache_identity(cfg: DataConfig, source_ident: dict, model_dir: Path) -> dict:
    return {"data": source_ident, "tokenizer": tokenizer_identity(model_dir),
            "template": template.TEMPLATE_ID, "max_seq_len": cfg.max_seq_len, "chunking": CHUNKING}


def prepare_tokens(cfg: DataConfig, run_dir: Path, model_dir: Path, tokenizer, log,
                   progress: bool | None = None) -> TokenCache:
    """Given the data config, run directory, model directory and its tokenizer, return
    the token cache; raise InputError when the dataset cannot be read or has no usable
    row (nothing is written then)."""
    source = resolve_source(cfg, run_dir)
    identity = cache_identity(cfg, source_identity(source, cfg), model_dir)
    key = cache_key(identity)
    root = RunDir(run_dir).cache
    cached = load_cache(root / key)
    if cached is not None:
        log.info("data.prepare.cached", key=key, sequences=len(cached), tokens=int(cached.meta["tokens"]))
        return cached

    from tqdm import tqdm  # the bar only draws on a terminal

    log.info("data.prepare.start", key=key, dataset=cfg.name, files=[p.name for p in source.files])
    started = time.monotonic()
    stats = RowStats()
    sequences: list[np.ndarray] = []
    exceeded = 0
    show = sys.stderr.isatty() if progress is None else progress
    for _label, problem, solution in tqdm(iter_rows(source, cfg, stats), desc="tokenizing", unit=" rows",
                                          disable=not show, total=cfg.limit or None):
        ids = encode_example(tokenizer, template.format_example(problem, solution))
        chunks = split_chunks(ids, cfg.max_seq_len)
        exceeded += len(chunks) > 1  # more than max_seq_len targets
        sequences.extend(np.asarray(c, dtype=np.int32) for c in chunks if len(c) >= 2)

    if stats.skipped:
        log.warning("data.prepare.skipped", skipped=stats.skipped, first=stats.skipped_examples)
    if not sequences:
        raise InputError(f"dataset {cfg.name!r} has no usable rows: {stats.rows} rows read, {stats.skipped} skipped "
                         f"for a missing or empty '{cfg.problem_field}' or '{cfg.solution_field}' field"
                         + (f" (first: {', '.join(stats.skipped_examples)})" if stats.skipped_examples else ""))
    meta = {"identity": identity, "dataset": cfg.name, "rows": stats.rows, "used_rows": stats.used,
            "skipped_rows": stats.skipped, "skipped_examples": stats.skipped_examples,
            "exceeded_max_seq_len": exceeded, "max_seq_len": cfg.max_seq_len}
    cache = write_cache(root, key, sequences, meta)
    seconds = time.monotonic() - started
    log.info("data.prepare.done", key=key, rows=stats.rows, used=stats.used, skipped=stats.skipped,
             sequences=len(cache), tokens=int(cache.meta["tokens"]), exceeded_max_seq_len=exceeded,
             exceeded_share=round(exceeded / max(stats.used, 1), 4), seconds=round(seconds, 3),
             rows_per_s=round(stats.rows / max(seconds, 1e-9), 1))
    return cache
