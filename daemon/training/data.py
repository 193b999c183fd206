"""Dataset rows in: local .jsonl / .parquet files and folders, or Hugging Face datasets.

Yields (row label, problem, solution) for every usable row and counts the rest. Labels
are what a user can find again: `train.jsonl:17` for a line, `shard.parquet#17` for a
parquet row (`data/train-00000-of-00010.parquet#17` in a hub-style layout), `#17` for a
row that `datasets` read (1-based).

A hub dataset stored as parquet shards (OpenR1-Math-220k: `data/train-*.parquet` for the
`default` subset, `extended/train-*.parquet` for `extended`, both for `all`) is
downloaded with huggingface_hub and read by the same code as a local folder with that
layout, so the hub and a local copy give the same rows, cache key and tokens by
construction. `datasets` remains the fallback for hub datasets not laid out that way.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from mathlora_daemon.config import DataConfig, shorten
from mathlora_daemon.errors import InputError, hub_load_error

LOCAL_SUFFIXES = (".jsonl", ".parquet")
# Read with every row when present: the reference answer and the problem's kind (OpenR1
# calls it problem_type, the demo kind), for `eval` and the final eval's table.
ANSWER_FIELD = "answer"
KIND_FIELDS = ("kind", "problem_type")
# OpenR1-Math-220k: several model solutions per row, each checked by math-verify.
GENERATIONS_FIELD, VERIFIED_FIELD = "generations", "correctness_math_verify"
MAX_LISTED_SKIPS = 5
# Hub-style layout (the one `push_to_hub` writes and OpenR1-Math-220k uses): for each
# subset, the groups of repo folders that may hold it, in order of preference; the first
# group found is read, its folders in order. OpenR1's `all` is data/ + extended/ (its
# all/ folder, a copy of both, when only that was downloaded); early revisions of the
# repo named data/ `default/`. Any other subset name is the folder of that name.
SUBSET_LAYOUTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "default": (("data",), ("default",)),
    "extended": (("extended",),),
    "all": (("data", "extended"), ("all",)),
}
LAYOUT_DIRS = ("data", "extended")


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
    """A resolved dataset: local files (in reading order) or a hub dataset id.

    `root` is set for a hub-style layout (a local one or a hub download): file names are
    then taken relative to it (`data/train-00000-of-00010.parquet`), the same for both.
    """

    name: str
    files: tuple[Path, ...] = ()
    root: Path | None = None
    # A hub source's download, by (subset, split), so that the cache key and the rows
    # come from one download; not part of the source's identity.
    downloaded: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_local(self) -> bool:
        return bool(self.files)

    def file_name(self, path: Path) -> str:
        """Given one of the files, return the name it is known by in labels and the key."""
        return path.relative_to(self.root).as_posix() if self.root is not None else path.name


def subset_layouts(subset: str) -> tuple[tuple[str, ...], ...]:
    """Given a subset (dataset configuration) name, return the groups of layout folders
    that may hold it, in order of preference: `default` -> data (or default), `extended`
    -> extended, `all` -> data then extended (or all), any other name -> that folder."""
    return SUBSET_LAYOUTS.get(subset or "default", ((subset,),))


def is_layout(folder: Path, subset: str) -> bool:
    """Given a folder and the subset, return whether it is a hub-style layout: it has a
    `data/` or `extended/` (or one of the subset's) subfolder holding parquet files."""
    names = dict.fromkeys(LAYOUT_DIRS + tuple(d for group in subset_layouts(subset) for d in group))
    return any((folder / d).is_dir() and any((folder / d).rglob("*.parquet")) for d in names)


def _split_files(base: Path, split: str) -> list[Path]:
    # `train-00000-of-00010.parquet` (push_to_hub) or `train/0000.parquet` (parquet export).
    if not base.is_dir():
        return []
    found = (p for p in base.rglob("*.parquet") if p.is_file() and p.relative_to(base).as_posix().startswith(split))
    return sorted(found, key=lambda p: p.relative_to(base).as_posix())


def _find_layout(folder: Path, subset: str, split: str) -> tuple[Path, ...] | None:
    for group in subset_layouts(subset):
        found = {d: _split_files(folder / d, split) for d in group}
        if not any(found.values()):
            continue
        missing = [d for d in group if not found[d]]
        if missing:
            # Reading part of a subset would silently train on less than it names.
            raise InputError(f"{folder}: subset {subset!r} is {' + '.join(f'{d}/' for d in group)}, but "
                             f"{', '.join(f'{d}/{split}*.parquet' for d in missing)} is missing "
                             f"(download it, or set data.subset to the part you have)")
        return tuple(f for d in group for f in found[d])
    return None


def layout_files(folder: Path, subset: str, split: str) -> tuple[Path, ...]:
    """Given a hub-style layout folder, a subset and a split, return its parquet files
    for them: the first of the subset's folder groups present, its folders in order, in
    each the files whose path below it starts with the split name, sorted; raise
    InputError when there are none or a group is only partly there."""
    files = _find_layout(folder, subset, split)
    if files is None:
        have = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        wanted = " or ".join(" + ".join(f"{d}/{split}*.parquet" for d in group) for group in subset_layouts(subset))
        raise InputError(f"{folder}: no parquet files for subset {subset!r} and split {split!r} (looked for "
                         f"{wanted}; folders there: {', '.join(have) or 'none'})")
    return files


def resolve_source(cfg: DataConfig, run_dir: Path) -> DataSource:
    """Given the data config and run directory, return the DataSource it names; raise
    InputError when a local path is named but missing or holds no .jsonl/.parquet file.

    A relative path is looked up in the run directory first, then the current directory.
    """
    raw = Path(cfg.name).expanduser()
    candidates = [raw] if raw.is_absolute() else [run_dir / raw, Path.cwd() / raw]
    for path in candidates:
        try:
            path.stat()
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:  # a name too long for the file system, a loop of links: the key's fault
            raise InputError(f"data.name = {shorten(repr(cfg.name))}: not a usable path "
                             f"({exc.strerror or exc})") from None
        if path.is_file():
            if path.suffix not in LOCAL_SUFFIXES:
                raise InputError(f"data.name = {cfg.name!r}: {path} is not a .jsonl or .parquet file")
            return DataSource(cfg.name, (path.resolve(),))
        if path.is_dir():
            if is_layout(path, cfg.subset):
                root = path.resolve()
                return DataSource(cfg.name, layout_files(root, cfg.subset, cfg.split), root)
            files = tuple(sorted(p.resolve() for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file()))
            if not files:
                raise InputError(f"data.name = {cfg.name!r}: folder {path} holds no .jsonl or .parquet file")
            return DataSource(cfg.name, files)
    if raw.suffix in LOCAL_SUFFIXES or cfg.name.startswith((".", "/", "~")) or cfg.name.count("/") > 1:
        raise InputError(f"data.name = {cfg.name!r}: no such file or folder (looked in {run_dir} and {Path.cwd()})")
    return DataSource(cfg.name)


def _snapshot_download(repo_id: str, allow_patterns: list[str]) -> Path:
    """Given a hub dataset id and file patterns, return the local folder (same layout as
    the repo) holding those files, downloading what the local hub cache lacks."""
    from huggingface_hub import snapshot_download  # lazily: only hub users need it

    return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=allow_patterns))


# How hub files are fetched: (repo id, allow_patterns) -> local folder of the repo's
# layout. A module attribute so that tests can serve a fake hub from a local folder.
hub_download: Callable[[str, list[str]], Path] = _snapshot_download


def hub_patterns(cfg: DataConfig) -> list[list[str]]:
    """Given the data config, return the repo file patterns its subset and split need,
    one list per folder group in order of preference."""
    return [[f"{d}/{cfg.split}*.parquet" for d in group] for group in subset_layouts(cfg.subset)]


def resolve_hub(source: DataSource, cfg: DataConfig) -> DataSource:
    """Given a DataSource, return it with a hub dataset's parquet files for the subset and
    split resolved to local files (downloaded on first use, once per source); return it
    unchanged when it is local or the repo has no such files (`datasets` reads it then);
    raise InputError when the hub cannot be reached and nothing is cached."""
    if source.is_local:
        return source
    slot = (cfg.subset, cfg.split)
    if slot not in source.downloaded:
        local = source  # not a parquet repo of this layout: `datasets` reads it
        for patterns in hub_patterns(cfg):
            try:
                folder = hub_download(source.name, patterns)
            except Exception as exc:  # network, unknown or gated repo, offline without a cached copy
                # No silent fallback to `datasets` here: a key that depends on whether the
                # network was up would make a resumed run's fingerprint differ.
                raise InputError(f"data.name = {cfg.name!r} (subset {cfg.subset!r}, split {cfg.split!r}): could "
                                 f"not fetch it from the Hugging Face hub: {exc}") from None
            # The same reader as for a local copy: same files, same order, same rows.
            files = _find_layout(folder, cfg.subset, cfg.split)
            if files:
                local = DataSource(source.name, files, folder)
                break
        source.downloaded[slot] = local
    return source.downloaded[slot]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def source_identity(source: DataSource, cfg: DataConfig) -> dict:
    """Given a DataSource, return what identifies its content for the cache key: for
    local files (a hub dataset's parquet shards included) their names, sizes and SHA-256
    in reading order; for a hub dataset that `datasets` reads, its id, subset, split."""
    ident: dict = {"fields": row_fields(cfg), "solution_source": cfg.solution_source, "limit": cfg.limit}
    source = resolve_hub(source, cfg)
    if source.is_local:
        # Same bytes under the same relative names give the same key, whether they came
        # from the hub or from a local copy, in any directory.
        ident["files"] = [{"name": source.file_name(path), "bytes": path.stat().st_size, "sha256": _sha256(path)}
                          for path in source.files]
    else:
        ident["hub"] = {"name": source.name, "subset": cfg.subset, "split": cfg.split}
    return ident


def count_rows(source: DataSource, cfg: DataConfig) -> int | None:
    """Given a DataSource, return how many rows iter_rows will read (at most cfg.limit)
    when that is known without reading them (parquet metadata), else None."""
    source = resolve_hub(source, cfg)
    if not source.is_local or any(p.suffix != ".parquet" for p in source.files):
        return cfg.limit or None
    import pyarrow.parquet as pq

    try:
        total = sum(pq.ParquetFile(p).metadata.num_rows for p in source.files)
    except Exception:  # a damaged file: iter_rows reports it properly
        return cfg.limit or None
    return min(total, cfg.limit) if cfg.limit else total


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
                # json's messages may end in "at" ("Unterminated string starting at"): no stutter.
                reason = exc.msg[:-3] if exc.msg.endswith(" at") else exc.msg
                raise InputError(f"{path}: line {lineno} is not valid JSON (column {exc.colno}: {reason})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}: line {lineno} is a JSON {type(record).__name__}, expected an object "
                                 "with problem and solution fields")
            yield f"{path.name}:{lineno}", record


def _parquet_records(path: Path, columns: list[str], name: str | None = None) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq  # lazily: only parquet users pay for it

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise InputError(f"{path}: not a readable parquet file ({exc})") from None
    # Only the named columns are read: OpenR1's `generations` and `messages` hold most
    # of its bytes and are never decoded.
    present = [c for c in columns if c in pf.schema_arrow.names]
    row = 0
    for batch in pf.iter_batches(columns=present, batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield f"{name or path.name}#{row}", record


def read_records(path: Path, columns: list[str], name: str | None = None) -> Iterator[tuple[str, dict]]:
    """Given a .jsonl or .parquet file and the columns wanted, yield (label, record) for
    every row (a parquet file gives only those columns); raise InputError for a file that
    cannot be parsed, naming the file and line."""
    if path.suffix == ".jsonl":
        return _jsonl_records(path)
    return _parquet_records(path, columns, name)


def _hub_records(source: DataSource, cfg: DataConfig) -> Iterator[tuple[str, dict]]:
    try:
        import datasets  # lazily: heavy, and only hub users need it
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise InputError(f"data.name = {cfg.name!r} names a hub dataset, but `datasets` is not installed") from exc
    try:
        ds = datasets.load_dataset(source.name, cfg.subset or None, split=cfg.split)
    except Exception as exc:  # network (75), unknown dataset, unknown subset/split (78)
        raise hub_load_error(f"data.name = {cfg.name!r} (subset {cfg.subset!r}, split {cfg.split!r})", exc) from None
    for row, record in enumerate(ds, 1):
        yield f"#{row}", record


class Row(NamedTuple):
    """A usable dataset row: where it is, the problem, the solution to train on, and the
    reference answer and problem kind when the dataset has them (eval reads those)."""

    label: str
    problem: str
    solution: str
    answer: str | None = None
    kind: str | None = None


def _verified_generation(record: dict) -> tuple[str | None, str]:
    """OpenR1's `generations` (several model solutions) and `correctness_math_verify`
    (one bool each): the first generation that math-verify found correct, or (None, why)."""
    generations, verified = record.get(GENERATIONS_FIELD), record.get(VERIFIED_FIELD)
    if not isinstance(generations, list) or not generations:
        return None, f"missing '{GENERATIONS_FIELD}'"
    if not isinstance(verified, list):
        return None, f"missing '{VERIFIED_FIELD}'"
    for text, ok in zip(generations, verified):
        if ok is True and isinstance(text, str) and text.strip():
            return text, ""
    return None, "no generation verified correct"


def row_fields(cfg: DataConfig) -> list[str]:
    """The columns a row is built from (only these are read from parquet files)."""
    solution = [GENERATIONS_FIELD, VERIFIED_FIELD] if cfg.solution_source == "generation" else [cfg.solution_field]
    return list(dict.fromkeys([cfg.problem_field, *solution, cfg.answer_field or ANSWER_FIELD, *KIND_FIELDS]))


def iter_rows(source: DataSource, cfg: DataConfig, stats: RowStats) -> Iterator[Row]:
    """Given a DataSource, yield a Row for each usable row, counting rows and skips into
    `stats`; raise InputError for a file that cannot be parsed, naming the file and line.
    Stops after `cfg.limit` rows when it is set. With `data.solution_source =
    "generation"` the solution is the first of OpenR1's generations verified correct."""
    fields = row_fields(cfg)
    source = resolve_hub(source, cfg)
    if source.is_local:
        records = (rec for path in source.files for rec in read_records(path, fields, source.file_name(path)))
    else:
        records = _hub_records(source, cfg)
    if cfg.limit:
        # Stop before reading row limit + 1: a broken line after the limit is not read.
        records = itertools.islice(records, cfg.limit)
    for label, record in records:
        stats.rows += 1
        problem = record.get(cfg.problem_field)
        if not isinstance(problem, str) or not problem.strip():
            stats.skip(label, f"missing '{cfg.problem_field}'" if problem is None
                       else f"empty or non-text '{cfg.problem_field}'")
            continue
        if cfg.solution_source == "generation":
            solution, why = _verified_generation(record)
        else:
            solution = record.get(cfg.solution_field)
            why = f"missing '{cfg.solution_field}'" if solution is None else f"empty or non-text '{cfg.solution_field}'"
        answer = record.get(cfg.answer_field or ANSWER_FIELD)
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)  # GSM8K-style sets store numbers
        if solution is None and cfg.solution_source == "solution" and isinstance(answer, str) and answer.strip():
            # An answer-only row (no solution field at all; an empty one stays a skipped
            # row): its solution is the final answer line, what SFT on such a set teaches
            # and what GRPO's reward checks.
            solution = f"The final answer is $\\boxed{{{answer.strip()}}}$."
        if not isinstance(solution, str) or not solution.strip():
            stats.skip(label, why)
            continue
        stats.used += 1
        kind = next((record[k] for k in KIND_FIELDS if isinstance(record.get(k), str) and record[k].strip()), None)
        yield Row(label, problem, solution, answer if isinstance(answer, str) and answer.strip() else None, kind)
