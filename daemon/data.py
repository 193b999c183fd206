"""Dataset rows in: local .jsonl / .parquet files and folders, or Hugging Face datasets.

Yields (row label, problem, solution) for every usable row and counts the rest. Labels
are what a user can find again: `train.jsonl:17` for a line, `shard.parquet#17` for a
parquet row, `#17` for a hub row (1-based).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from daemon.config import DataConfig
from daemon.errors import InputError

LOCAL_SUFFIXES = (".jsonl", ".parquet")
MAX_LISTED_SKIPS = 5


@dataclass
class RowStats:
    """What reading the dataset found; filled in while rows are iterated."""

    rows: int = 0
    used: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)  # first few labels + reason

    def skip(self, label: str, why: str) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < MAX_LISTED_SKIPS:
            self.skipped_examples.append(f"{label} ({why})")


@dataclass(frozen=True)
class DataSource:
    """A resolved dataset: local files (sorted) or a hub dataset id."""

    name: str
    files: tuple[Path, ...] = ()

    @property
    def is_local(self) -> bool:
        return bool(self.files)


def resolve_source(cfg: DataConfig, run_dir: Path) -> DataSource:
    """Given the data config and run directory, return the DataSource it names; raise
    InputError when a local path is named but missing or holds no .jsonl/.parquet file.

    A relative path is looked up in the run directory first, then the current directory.
    """
    raw = Path(cfg.name).expanduser()
    candidates = [raw] if raw.is_absolute() else [run_dir / raw, Path.cwd() / raw]
    for path in candidates:
        if path.is_file():
            if path.suffix not in LOCAL_SUFFIXES:
                raise InputError(f"data.name = {cfg.name!r}: {path} is not a .jsonl or .parquet file")
            return DataSource(cfg.name, (path.resolve(),))
        if path.is_dir():
            files = tuple(sorted(p.resolve() for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file()))
            if not files:
                raise InputError(f"data.name = {cfg.name!r}: folder {path} holds no .jsonl or .parquet file")
            return DataSource(cfg.name, files)
    if raw.suffix in LOCAL_SUFFIXES or cfg.name.startswith((".", "/", "~")) or cfg.name.count("/") > 1:
        raise InputError(f"data.name = {cfg.name!r}: no such file or folder (looked in {run_dir} and {Path.cwd()})")
    return DataSource(cfg.name)


def source_identity(source: DataSource, cfg: DataConfig) -> dict:
    """Given a DataSource, return what identifies its content for the cache key: for
    local files their names, sizes and SHA-256; for a hub dataset its id, subset, split."""
    ident: dict = {"fields": [cfg.problem_field, cfg.solution_field], "limit": cfg.limit}
    if source.is_local:
        files = []
        for path in source.files:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
            files.append({"name": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()})
        ident["files"] = files
    else:
        ident["hub"] = {"name": source.name, "subset": cfg.subset, "split": cfg.split}
    return ident


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}: line {lineno} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}: line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}: line {lineno} is a JSON {type(record).__name__}, expected an object "
                                 "with problem and solution fields")
            yield f"{path.name}:{lineno}", record


def _parquet_records(path: Path, columns: list[str]) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq  # lazily: only parquet users pay for it

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise InputError(f"{path}: not a readable parquet file ({exc})") from None
    present = [c for c in columns if c in pf.schema_arrow.names]
    row = 0
    for batch in pf.iter_batches(columns=present, batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield f"{path.name}#{row}", record


def _hub_records(source: DataSource, cfg: DataConfig) -> Iterator[tuple[str, dict]]:
    try:
        import datasets  # lazily: heavy, and only hub users need it
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise InputError(f"data.name = {cfg.name!r} names a hub dataset, but `datasets` is not installed") from exc
    try:
        ds = datasets.load_dataset(source.name, cfg.subset or None, split=cfg.split)
    except Exception as exc:  # network, unknown dataset, unknown subset/split
        raise InputError(f"data.name = {cfg.name!r} (subset {cfg.subset!r}, split {cfg.split!r}) could not be "
                         f"loaded: {exc}") from None
    for row, record in enumerate(ds, 1):
        yield f"#{row}", record


def iter_rows(source: DataSource, cfg: DataConfig, stats: RowStats) -> Iterator[tuple[str, str, str]]:
    """Given a DataSource, yield (label, problem, solution) for each usable row, counting
    rows and skips into `stats`; raise InputError for a file that cannot be parsed, naming
    the file and line. Stops after `cfg.limit` rows when it is set."""
    fields = [cfg.problem_field, cfg.solution_field]
    if source.is_local:
        records = (rec for path in source.files for rec in
                   (_jsonl_records(path) if path.suffix == ".jsonl" else _parquet_records(path, fields)))
    else:
        records = _hub_records(source, cfg)
    if cfg.limit:
        # Stop before reading row limit + 1: a broken line after the limit is not read.
        records = itertools.islice(records, cfg.limit)
    for label, record in records:
        stats.rows += 1
        values = []
        for name in fields:
            value = record.get(name)
            if not isinstance(value, str) or not value.strip():
                why = f"missing '{name}'" if value is None else f"empty or non-text '{name}'"
                stats.skip(label, why)
                break
            values.append(value)
        else:
            stats.used += 1
            yield label, values[0], values[1]
