"""Tests for OpenR1-Math-220k as data (daemon.data): parquet shards with the real schema
in the hub's layout (`data/` = default, `extended/`, all = both), split selection, column
projection, and that the hub (served here by a fake download) and a local copy of the
same files give the same cache key and the same tokens."""

from __future__ import annotations

import fnmatch
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mathlora_daemon.training.data as data
from mathlora_daemon.config import DataConfig
from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.training.data import RowStats, count_rows, iter_rows, resolve_source, source_identity
from mathlora_daemon.training.prepare import prepare_tokens

REPO = "open-r1/OpenR1-Math-220k"

# OpenR1-Math-220k's columns and types, as its parquet shards store them.
SCHEMA = pa.schema([
    ("problem", pa.string()),
    ("solution", pa.string()),
    ("answer", pa.string()),
    ("problem_type", pa.string()),
    ("question_type", pa.string()),
    ("source", pa.string()),
    ("uuid", pa.string()),
    ("is_reasoning_complete", pa.list_(pa.bool_())),
    ("generations", pa.list_(pa.string())),
    ("correctness_math_verify", pa.list_(pa.bool_())),
    ("correctness_llama", pa.list_(pa.bool_())),
    ("finish_reasons", pa.list_(pa.string())),
    ("correctness_count", pa.int64()),
    ("messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
])


def openr1_rows(tag: str, n: int, empty_solution_at: tuple[int, ...] = (), long_at: tuple[int, ...] = (),
                generation_chars: int = 200) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = 3 + i, 7 + 2 * i
        problem = f"[{tag}] What is {a} + {b}?"
        steps = f"Add the numbers: {a} + {b} = {a + b}.\n" * (12 if i in long_at else 1)
        solution = "" if i in empty_solution_at else f"{steps}The final answer is $\\boxed{{{a + b}}}$."
        generation = ("<think>" + "reasoning " * (generation_chars // 10) + f"</think> \\boxed{{{a + b}}}")
        rows.append({
            "problem": problem, "solution": solution, "answer": str(a + b),
            "problem_type": "Algebra", "question_type": "math-word-problem", "source": "olympiads",
            "uuid": f"{tag}-{i:04d}", "is_reasoning_complete": [True, False],
            "generations": [generation, generation[::-1]], "correctness_math_verify": [True, False],
            "correctness_llama": None, "finish_reasons": ["stop", "length"], "correctness_count": 1,
            "messages": [{"content": problem, "role": "user"}, {"content": generation, "role": "assistant"}],
        })
    return rows


def write_shard(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return path


@pytest.fixture
def repo(tmp_path) -> Path:
    """A folder laid out like the hub repo: data/ (default, 2 shards + a test shard),
    extended/ (1 shard), README.md."""
    root = tmp_path / "remote" / "OpenR1-Math-220k"
    write_shard(root / "data" / "train-00000-of-00002.parquet", openr1_rows("d0", 5, empty_solution_at=(2,),
                                                                           long_at=(4,)))
    write_shard(root / "data" / "train-00001-of-00002.parquet", openr1_rows("d1", 4))
    write_shard(root / "data" / "test-00000-of-00001.parquet", openr1_rows("t0", 2))
    write_shard(root / "extended" / "train-00000-of-00001.parquet", openr1_rows("e0", 3, empty_solution_at=(0,)))
    (root / "README.md").write_text("---\nconfigs: ...\n---\n# OpenR1-Math-220k\n")
    return root


class FakeHub:
    """Serves `repo` as the hub would: copies the files that match the patterns into a
    snapshot folder of a private cache (a different path than the local copy) and
    returns it; records every call."""

    def __init__(self, remote: Path, cache: Path):
        self.remote, self.cache, self.calls = remote, cache, []

    def __call__(self, repo_id: str, allow_patterns: list[str]) -> Path:
        self.calls.append((repo_id, list(allow_patterns)))
        snapshot = self.cache / f"datasets--{repo_id.replace('/', '--')}" / "snapshots" / "0123abcd"
        for path in sorted(self.remote.rglob("*")):
            rel = path.relative_to(self.remote).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, snapshot / rel)
        snapshot.mkdir(parents=True, exist_ok=True)
        return snapshot


@pytest.fixture
def hub(repo, tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub(repo, tmp_path / "hf-cache")
    monkeypatch.setattr(data, "hub_download", fake)
    return fake


def names(source) -> list[str]:
    return [source.file_name(p) for p in source.files]


def read(source, cfg):
    stats = RowStats()
    return [tuple(row)[:3] for row in iter_rows(source, cfg, stats)], stats


# --- local folder in the hub's layout ---------------------------------------------------------

@pytest.mark.parametrize("subset, expected", [
    ("default", ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]),
    ("extended", ["extended/train-00000-of-00001.parquet"]),
    ("all", ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
             "extended/train-00000-of-00001.parquet"]),
])
def test_subsets_select_folders_in_order(repo, tmp_path, subset, expected):
    source = resolve_source(DataConfig(name=str(repo), subset=subset), tmp_path)
    assert names(source) == expected
    assert source.root == repo.resolve()


def test_split_selects_files_by_name(repo, tmp_path):
    source = resolve_source(DataConfig(name=str(repo), subset="default", split="test"), tmp_path)
    assert names(source) == ["data/test-00000-of-00001.parquet"]
    with pytest.raises(InputError) as info:
        resolve_source(DataConfig(name=str(repo), subset="extended", split="test"), tmp_path)
    assert "no parquet files for subset 'extended' and split 'test'" in str(info.value)
    assert "extended/test*.parquet" in str(info.value) and "folders there: data, extended" in str(info.value)


def test_all_folder_alone_serves_subset_all(repo, tmp_path):
    # The hub repo also has all/ (data/ + extended/ in one); a copy of only that works.
    only_all = tmp_path / "only-all"
    for i, shard in enumerate(sorted((repo / "data").glob("train-*")) + sorted((repo / "extended").glob("train-*"))):
        (only_all / "all").mkdir(parents=True, exist_ok=True)
        shutil.copy2(shard, only_all / "all" / f"train-{i:05d}-of-00003.parquet")
    cfg = DataConfig(name=str(only_all), subset="all")
    source = resolve_source(cfg, tmp_path)
    assert names(source) == [f"all/train-{i:05d}-of-00003.parquet" for i in range(3)]
    assert read(source, cfg)[1].rows == 12


def test_part_of_subset_all_is_an_error(repo, tmp_path):
    shutil.rmtree(repo / "extended")
    with pytest.raises(InputError) as info:
        resolve_source(DataConfig(name=str(repo), subset="all"), tmp_path)
    assert "subset 'all' is data/ + extended/" in str(info.value)
    assert "extended/train*.parquet is missing" in str(info.value)
    assert len(resolve_source(DataConfig(name=str(repo), subset="default"), tmp_path).files) == 2


def test_early_repo_layout_with_a_default_folder(repo, tmp_path):
    (repo / "data").rename(repo / "default")
    source = resolve_source(DataConfig(name=str(repo), subset="default"), tmp_path)
    assert names(source) == ["default/train-00000-of-00002.parquet", "default/train-00001-of-00002.parquet"]


def test_plain_folder_of_parquet_files_keeps_reading_all_files(repo, tmp_path):
    # The old way to name a local copy: its data/ folder itself, all files sorted.
    source = resolve_source(DataConfig(name=str(repo / "data"), subset="all", split="train"), tmp_path)
    assert source.root is None
    assert names(source) == ["test-00000-of-00001.parquet", "train-00000-of-00002.parquet",
                             "train-00001-of-00002.parquet"]


def test_rows_skips_and_labels(repo, tmp_path):
    cfg = DataConfig(name=str(repo), subset="all")
    rows, stats = read(resolve_source(cfg, tmp_path), cfg)
    assert (stats.rows, stats.used, stats.skipped) == (12, 10, 2)
    assert stats.skipped_examples == ["data/train-00000-of-00002.parquet#3 (empty or non-text 'solution')",
                                      "extended/train-00000-of-00001.parquet#1 (empty or non-text 'solution')"]
    assert rows[0][0] == "data/train-00000-of-00002.parquet#1"
    assert rows[0][1] == "[d0] What is 3 + 7?"
    assert rows[0][2] == "Add the numbers: 3 + 7 = 10.\nThe final answer is $\\boxed{10}$."
    assert [label.split("#")[0].split("/")[0] for label, _, _ in rows] == ["data"] * 8 + ["extended"] * 2
    assert count_rows(resolve_source(cfg, tmp_path), cfg) == 12
    assert count_rows(resolve_source(cfg, tmp_path), DataConfig(name=str(repo), limit=5)) == 5


def test_only_problem_and_solution_columns_are_read(repo, tmp_path, monkeypatch):
    requested = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        requested.append(kwargs.get("columns"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    cfg = DataConfig(name=str(repo), subset="all")
    rows, _ = read(resolve_source(cfg, tmp_path), cfg)
    assert len(rows) == 10
    # OpenR1's small columns (the answer and problem_type for eval), never generations or messages
    assert requested == [["problem", "solution", "answer", "problem_type"]] * 3


def test_huge_generations_column_is_not_decoded(tmp_path):
    # 2,000 rows with ~50 kB of `generations` each: projection reads only the small columns.
    write_shard(tmp_path / "big" / "data" / "train-00000-of-00001.parquet",
                openr1_rows("b", 2000, generation_chars=25_000))
    cfg = DataConfig(name=str(tmp_path / "big"), subset="default")
    started = time.monotonic()
    rows, stats = read(resolve_source(cfg, tmp_path), cfg)
    assert stats.used == 2000
    assert time.monotonic() - started < 2.0


# --- hub: download through huggingface_hub, read like a local folder --------------------------

def test_hub_downloads_only_the_subset_and_split(hub, tmp_path):
    cfg = DataConfig(name=REPO, subset="all", split="train")
    source = resolve_source(cfg, tmp_path)
    assert not source.is_local and hub.calls == []  # resolving names it; nothing is fetched yet
    ident = source_identity(source, cfg)
    rows, stats = read(source, cfg)
    assert hub.calls == [(REPO, ["data/train*.parquet", "extended/train*.parquet"])]  # once for key and rows
    assert [f["name"] for f in ident["files"]] == ["data/train-00000-of-00002.parquet",
                                                   "data/train-00001-of-00002.parquet",
                                                   "extended/train-00000-of-00001.parquet"]
    assert (stats.rows, stats.used, stats.skipped) == (12, 10, 2)
    assert rows[-1][0] == "extended/train-00000-of-00001.parquet#3"


@pytest.mark.parametrize("subset", ["default", "extended", "all"])
def test_hub_and_local_copy_have_the_same_identity(hub, repo, tmp_path, subset):
    local_copy = tmp_path / "elsewhere" / "my-openr1"
    shutil.copytree(repo, local_copy)
    hub_cfg = DataConfig(name=REPO, subset=subset)
    local_cfg = DataConfig(name=str(local_copy), subset=subset)
    hub_ident = source_identity(resolve_source(hub_cfg, tmp_path), hub_cfg)
    assert hub_ident == source_identity(resolve_source(local_cfg, tmp_path), local_cfg)
    assert "hub" not in hub_ident
    assert read(resolve_source(hub_cfg, tmp_path), hub_cfg)[0] == read(resolve_source(local_cfg, tmp_path),
                                                                       local_cfg)[0]


def test_hub_with_only_an_all_folder(repo, tmp_path, monkeypatch):
    remote = tmp_path / "remote-all"
    (remote / "all").mkdir(parents=True)
    shutil.copy2(repo / "data" / "train-00000-of-00002.parquet", remote / "all" / "train-00000-of-00001.parquet")
    fake = FakeHub(remote, tmp_path / "hf-cache-2")
    monkeypatch.setattr(data, "hub_download", fake)
    cfg = DataConfig(name=REPO, subset="all")
    ident = source_identity(resolve_source(cfg, tmp_path), cfg)
    assert [f["name"] for f in ident["files"]] == ["all/train-00000-of-00001.parquet"]
    assert fake.calls == [(REPO, ["data/train*.parquet", "extended/train*.parquet"]), (REPO, ["all/train*.parquet"])]


def test_subsets_have_different_identities(hub, tmp_path):
    idents = [source_identity(resolve_source(cfg, tmp_path), cfg)
              for cfg in (DataConfig(name=REPO, subset=s) for s in ("default", "extended", "all"))]
    assert len({repr(i) for i in idents}) == 3


def test_hub_and_local_copy_give_the_same_cache_and_tokens(hub, repo, tmp_path, tiny_model_dir, tiny_tokenizer,
                                                           recording_log):
    local_copy = tmp_path / "copy" / "OpenR1-Math-220k"
    shutil.copytree(repo, local_copy)
    caches = []
    for run, name in ((tmp_path / "run-hub", REPO), (tmp_path / "run-local", str(local_copy))):
        run.mkdir()
        cfg = DataConfig(name=name, subset="all", max_seq_len=200, validation_fraction=0.0)
        caches.append(prepare_tokens(cfg, RunDir(run), tiny_model_dir, tiny_tokenizer, recording_log, progress=False))
    from_hub, from_local = caches
    assert from_hub.path.name == from_local.path.name  # the cache key
    assert np.array_equal(np.asarray(from_hub.tokens), np.asarray(from_local.tokens))
    assert np.array_equal(np.asarray(from_hub.offsets), np.asarray(from_local.offsets))
    meta = from_hub.meta
    assert (meta["rows"], meta["used_rows"], meta["skipped_rows"]) == (12, 10, 2)
    # The long row (12 steps, ~390 tokens) exceeds 200 tokens and is split; the short ones are not.
    assert meta["exceeded_max_seq_len"] == 1
    assert meta["sequences"] > meta["used_rows"]
    assert len(hub.calls) == 1


def test_hub_repo_without_parquet_layout_falls_back_to_datasets(tmp_path, monkeypatch):
    import datasets

    empty = tmp_path / "snapshot"
    empty.mkdir()
    monkeypatch.setattr(data, "hub_download", lambda repo_id, patterns: empty)
    loaded = []

    def fake_load(name, subset, split):
        loaded.append((name, subset, split))
        return [{"problem": "p1", "solution": "s1"}, {"problem": "p2", "solution": ""}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = DataConfig(name="someone/qa", subset="main", split="train")
    source = resolve_source(cfg, tmp_path)
    assert source_identity(source, cfg)["hub"] == {"name": "someone/qa", "subset": "main", "split": "train"}
    rows, stats = read(source, cfg)
    assert rows == [("#1", "p1", "s1")]
    assert (stats.rows, stats.skipped) == (2, 1)
    assert loaded == [("someone/qa", "main", "train")]


def test_hub_download_failure_is_an_input_error(tmp_path, monkeypatch):
    def offline(repo_id, patterns):
        raise OSError("offline and not in the local cache")

    monkeypatch.setattr(data, "hub_download", offline)
    cfg = DataConfig(name=REPO)
    with pytest.raises(InputError) as info:
        source_identity(resolve_source(cfg, tmp_path), cfg)
    assert REPO in str(info.value) and "offline and not in the local cache" in str(info.value)
    assert info.value.exit_code == 78
