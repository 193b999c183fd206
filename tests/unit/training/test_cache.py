"""Tests for the token cache (daemon.cache) built by daemon.prepare.prepare_tokens:
reuse without re-tokenizing, memory-mapped .npy arrays, what changes the key, meta.json,
atomic writes, and that a damaged cache is rebuilt rather than trusted."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mathlora_daemon.config import DataConfig
from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.training import template
from mathlora_daemon.training.prepare import prepare_tokens, split_chunks


class CountingTokenizer:
    """Wraps the real tokenizer and counts the rows it tokenizes (in the chat format each
    row's prompt is tokenized by exactly one apply_chat_template call that returns ids)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def apply_chat_template(self, *args, **kwargs):
        if kwargs.get("tokenize", True):
            self.calls += 1
        return self.inner.apply_chat_template(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def run_dir(tmp_path, write_jsonl, math_rows):
    write_jsonl(tmp_path / "data" / "train.jsonl", math_rows)
    return tmp_path


def prepare(run_dir, model_dir, tokenizer, log, **cfg):
    cfg.setdefault("name", "data/train.jsonl")
    cfg.setdefault("validation_fraction", 0.0)  # every row trained on, unless a test holds some out
    return prepare_tokens(DataConfig(**cfg), RunDir(run_dir), model_dir, tokenizer, log, progress=False)


def cache_entries(run_dir):
    return sorted(p.name for p in (run_dir / "cache").iterdir())


def sequences(cache) -> list[list[int]]:
    return [cache.sequence(i).tolist() for i in range(len(cache))]


# --- reuse ----------------------------------------------------------------------------

def test_prepare_twice_reuses_the_cache_without_tokenizing(run_dir, tiny_model_dir, tiny_tokenizer, recording_log):
    tok = CountingTokenizer(tiny_tokenizer)
    first = prepare(run_dir, tiny_model_dir, tok, recording_log)
    assert tok.calls == 12
    assert recording_log.names() == ["data.prepare.start", "data.prepare.done"]
    done = recording_log.fields("data.prepare.done")
    assert (done["rows"], done["used"], done["skipped"]) == (12, 12, 0)
    assert (done["key"], done["sequences"]) == (first.path.name, len(first))

    recording_log.events.clear()
    second = prepare(run_dir, tiny_model_dir, tok, recording_log)
    assert tok.calls == 12  # nothing was tokenized the second time
    assert recording_log.names() == ["data.prepare.cached"]
    cached = recording_log.fields("data.prepare.cached")
    assert cached["key"] == first.path.name
    assert (cached["sequences"], cached["tokens"]) == (len(first), int(first.tokens.shape[0]))
    assert second.path == first.path == run_dir / "cache" / first.path.name
    assert cache_entries(run_dir) == [first.path.name]
    assert sequences(second) == sequences(first)


def test_cache_holds_the_encoded_examples_in_order(run_dir, tiny_model_dir, tiny_tokenizer, recording_log, math_rows):
    cache = prepare(run_dir, tiny_model_dir, tiny_tokenizer, recording_log)
    fmt = template.PromptFormat.of("chat", tiny_tokenizer)
    examples = [fmt.example(r["problem"], r["solution"]) for r in math_rows]
    expected = [ids for ids, _ in examples]
    assert sequences(cache) == expected
    assert cache.prompt_lens.tolist() == [n for _, n in examples]  # what train.mask_prompt masks
    assert cache.lengths.tolist() == [len(e) for e in expected]
    assert cache.meta["tokens"] == sum(len(e) for e in expected)


def test_arrays_are_memory_mapped_npy_without_pickle(run_dir, tiny_model_dir, tiny_tokenizer, recording_log):
    cache = prepare(run_dir, tiny_model_dir, tiny_tokenizer, recording_log)
    assert isinstance(cache.tokens, np.memmap) and isinstance(cache.offsets, np.memmap)
    assert cache.tokens.dtype == np.int32 and cache.offsets.dtype == np.int64
    assert sorted(p.name for p in cache.path.iterdir()) == ["meta.json", "train", "validation"]
    assert sorted(p.name for p in (cache.path / "train").iterdir()) == ["offsets.npy", "prompt_lens.npy", "tokens.npy"]
    tokens = np.load(cache.path / "train" / "tokens.npy", allow_pickle=False)
    offsets = np.load(cache.path / "train" / "offsets.npy", allow_pickle=False)
    assert offsets[0] == 0 and offsets[-1] == len(tokens) == cache.meta["tokens"]
    assert np.all(np.diff(offsets) >= 2)
    json.loads((cache.path / "meta.json").read_text())


def test_cache_files_are_private(run_dir, tiny_model_dir, tiny_tokenizer, recording_log):
    cache = prepare(run_dir, tiny_model_dir, tiny_tokenizer, recording_log)
    assert (run_dir / "cache").stat().st_mode & 0o777 == 0o700
    assert cache.path.stat().st_mode & 0o777 == 0o700
    for path in cache.path.rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o700 if path.is_dir() else 0o600), path.name


def test_no_temporary_dirs_left(run_dir, tiny_model_dir, tiny_tokenizer, recording_log):
    prepare(run_dir, tiny_model_dir, tiny_tokenizer, recording_log)
    prepare(run_dir, tiny_model_dir, tiny_tokenizer, recording_log, max_seq_len=128)
    assert not [n for n in cache_entries(run_dir) if n.startswith(".")]
    assert len(cache_entries(run_dir)) == 2


# --- meta.json --------------------------------------------------------------------------

def test_meta_reports_rows_skips_and_long_samples(tmp_path, write_jsonl, math_rows, tiny_model_dir, tiny_tokenizer,
                                                 recording_log):
    rows = list(math_rows[:6]) + [{"problem": "no solution"}, {"problem": "", "solution": "s"}]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    max_len = 128
    cache = prepare(tmp_path, tiny_model_dir, tiny_tokenizer, recording_log, max_seq_len=max_len)
    fmt = template.PromptFormat.of("chat", tiny_tokenizer)
    encoded = [fmt.example(r["problem"], r["solution"])[0] for r in math_rows[:6]]
    expected_chunks = [c for ids in encoded for c in split_chunks(ids, max_len)]
    exceeded = sum(len(ids) > max_len + 1 for ids in encoded)  # more than max_len targets
    assert exceeded > 0  # the test needs some long samples

    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta == cache.meta
    assert (meta["rows"], meta["used_rows"], meta["skipped_rows"]) == (8, 6, 2)
    assert meta["skipped_examples"] == ["train.jsonl:7 (missing 'solution')",
                                        "train.jsonl:8 (empty or non-text 'problem')"]
    assert meta["exceeded_max_seq_len"] == exceeded
    assert meta["max_seq_len"] == max_len
    assert meta["sequences"] == len(cache) == len(expected_chunks)
    assert meta["key"] == cache.path.name
    assert sequences(cache) == expected_chunks
    assert max(cache.lengths) == max_len + 1  # a full chunk: max_len model positions

    assert recording_log.fields("data.prepare.skipped")["skipped"] == 2
    assert recording_log.fields("data.prepare.done")["exceeded_max_seq_len"] == exceeded


def test_empty_dataset_is_an_input_error_and_writes_nothing(tmp_path, write_jsonl, tiny_model_dir, tiny_tokenizer,
                                                            recording_log):
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"problem": "p"}, {"question": "q", "solution": "s"}])
    with pytest.raises(InputError) as info:
        prepare(tmp_path, tiny_model_dir, tiny_tokenizer, recording_log)
    msg = str(info.value)
    assert "no usable rows" in msg and "2 rows read" in msg
    assert "train.jsonl:1 (missing 'solution')" in msg
    assert info.value.exit_code == 78
    assert not (tmp_path / "cache").exists()
    assert "data.prepare.done" not in recording_log.names()


def test_missing_dataset_is_an_input_error_and_writes_nothing(tmp_path, tiny_model_dir, tiny_tokenizer, recording_log):
    with pytest.raises(InputError) as info:
        prepare(tmp_path, tiny_model_dir, tiny_tokenizer, recording_log, name="data/nope.jsonl")
    assert "data/nope.jsonl" in str(info.value)
    assert not (tmp_path / "cache").exists()


# --- what changes the key -----------------------------------------------------------------

def key_of(run_dir, model_dir, tokenizer, log, **cfg) -> str:
    return prepare(run_dir, model_dir, tokenizer, log, **cfg).path.name


def test_key_changes_with_max_seq_len(run_dir, tiny_model_dir, tiny_tokenizer, recording_log):
    a = key_of(run_dir, tiny_model_dir, tiny_tokenizer, recording_log, max_seq_len=1024)
    b = key_of(run_dir, tiny_model_dir, tiny_tokenizer, recording_log, max_seq_len=128)
    assert a != b
    assert cache_entries(run_dir) == sorted([a, b])


def test_key_changes_with_dataset_content(run_dir, tiny_model_dir, tiny_tokenizer, recording_log, write_jsonl,
                                          math_rows):
    tok = CountingTokenizer(tiny_tokenizer)
    a = prepare(run_dir, tiny_model_dir, tok, recording_log)
    edited = [dict(r) for r in math_rows]
    edited[3]["solution"] = edited[3]["solution"].replace("The final answer", "So the final answer")
    write_jsonl(run_dir / "data" / "train.jsonl", edited)  # same name, new content
    b = prepare(run_dir, tiny_model_dir, tok, recording_log)
    assert a.path != b.path
    assert tok.calls == 24
    assert sequences(b)[3] != sequences(a)[3] and sequences(b)[4] == sequences(a)[4]


def test_key_changes_with_limit_and_fields(run_dir, tiny_model_dir, tiny_tokenizer, recording_log, write_jsonl,
                                           math_rows):
    base = key_of(run_dir, tiny_model_dir, tiny_tokenizer, recording_log)
    limited = key_of(run_dir, tiny_model_dir, tiny_tokenizer, recording_log, limit=5)
    # The same file read through other field names holding the same text.
    write_jsonl(run_dir / "data" / "qa.jsonl",
                [{"question": r["problem"], "answer": r["solution"]} for r in math_rows])
    swapped = [{"problem": r["problem"], "solution": r["solution"], "question": r["problem"],
                "answer": r["solution"]} for r in math_rows]
    write_jsonl(run_dir / "data" / "both.jsonl", swapped)
    by_default = key_of(run_dir, tiny_model_dir, tiny_tokenizer, recording_log, name="data/both.jsonl")
    by_custom = key_of(run_dir, tiny_model_dir, tiny_tokenizer, recording_log, name="data/both.jsonl",
                       problem_field="question", solution_field="answer")
    assert len({base, limited, by_default, by_custom}) == 4


def test_key_changes_with_tokenizer_files(run_dir, tiny_model_dir, tiny_tokenizer, recording_log, tmp_path_factory):
    other = tmp_path_factory.mktemp("tok") / "model"
    shutil.copytree(tiny_model_dir, other)
    same = key_of(run_dir, other, tiny_tokenizer, recording_log)
    assert same == key_of(run_dir, tiny_model_dir, tiny_tokenizer, recording_log)  # same bytes, same key
    cfg_path = other / "tokenizer_config.json"
    original = cfg_path.read_bytes()
    tok_cfg = json.loads(original)
    tok_cfg["model_max_length"] = 4096
    cfg_path.write_text(json.dumps(tok_cfg))
    assert key_of(run_dir, other, tiny_tokenizer, recording_log) != same
    (other / "tokenizer.json").write_bytes((tiny_model_dir / "tokenizer.json").read_bytes() + b" ")
    cfg_path.write_bytes(original)
    assert key_of(run_dir, other, tiny_tokenizer, recording_log) != same
    # Weights are not part of the tokenizer: with the tokenizer files restored, changed
    # weights keep the key.
    (other / "tokenizer.json").write_bytes((tiny_model_dir / "tokenizer.json").read_bytes())
    (other / "model.safetensors").write_bytes(b"changed weights")
    assert key_of(run_dir, other, tiny_tokenizer, recording_log) == same


def test_key_changes_with_template(run_dir, tiny_model_dir, tiny_tokenizer, recording_log, monkeypatch):
    a = key_of(run_dir, tiny_model_dir, tiny_tokenizer, recording_log)
    assert key_of(run_dir, tiny_model_dir, tiny_tokenizer, recording_log, template="tutor") != a
    monkeypatch.setattr(template, "INSTRUCTION", "Answer briefly.")  # the chat format's text itself
    assert key_of(run_dir, tiny_model_dir, tiny_tokenizer, recording_log) != a


def test_key_changes_with_the_chunking_so_an_older_cache_is_rebuilt_not_misread(run_dir, tiny_model_dir, tiny_tokenizer,
                                                                                 recording_log, monkeypatch):
    import mathlora_daemon.training.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "CHUNKING", "max_seq_len tokens, overlap 1")  # how earlier versions cut
    old = key_of(run_dir, tiny_model_dir, tiny_tokenizer, recording_log)
    monkeypatch.undo()
    tok = CountingTokenizer(tiny_tokenizer)
    new = prepare(run_dir, tiny_model_dir, tok, recording_log)
    assert new.path.name != old and tok.calls > 0  # tokenized again into a cache of its own
    assert sorted(cache_entries(run_dir)) == sorted([old, new.path.name])


def test_key_follows_content_not_path(run_dir, tiny_model_dir, tiny_tokenizer, recording_log):
    tok = CountingTokenizer(tiny_tokenizer)
    a = prepare(run_dir, tiny_model_dir, tok, recording_log)
    moved = run_dir / "elsewhere" / "train.jsonl"
    moved.parent.mkdir()
    shutil.copy2(run_dir / "data" / "train.jsonl", moved)
    recording_log.events.clear()
    b = prepare(run_dir, tiny_model_dir, tok, recording_log, name=str(moved))  # same name and bytes
    assert b.path == a.path
    assert recording_log.names() == ["data.prepare.cached"]
    assert tok.calls == 12
    # Another run directory with a copy of the file computes the same key.
    other_run = run_dir / "run2"
    (other_run / "data").mkdir(parents=True)
    shutil.copy2(moved, other_run / "data" / "train.jsonl")
    assert key_of(other_run, tiny_model_dir, tiny_tokenizer, recording_log) == a.path.name
    # The file name is part of the identity: a rename is a new dataset.
    shutil.copy2(moved, run_dir / "data" / "renamed.jsonl")
    assert key_of(run_dir, tiny_model_dir, tiny_tokenizer, recording_log, name="data/renamed.jsonl") != a.path.name


# --- damaged caches ---------------------------------------------------------------------

def damage_truncate_tokens(path):
    tokens = path / "train" / "tokens.npy"
    with open(tokens, "r+b") as fh:
        fh.truncate(tokens.stat().st_size - 8)


def damage_meta_garbage(path):
    (path / "meta.json").write_text("{not json")


def damage_meta_count(path):
    meta = json.loads((path / "meta.json").read_text())
    meta["sequences"] += 1
    (path / "meta.json").write_text(json.dumps(meta))


def damage_offsets_missing(path):
    (path / "train" / "offsets.npy").unlink()


def damage_offsets_pickle(path):
    np.save(path / "train" / "offsets.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)


def damage_prompt_lens_short(path):
    np.save(path / "train" / "prompt_lens.npy", np.zeros(3, np.int32), allow_pickle=False)


@pytest.mark.parametrize("damage", [damage_truncate_tokens, damage_meta_garbage, damage_meta_count,
                                    damage_offsets_missing, damage_offsets_pickle, damage_prompt_lens_short])
def test_damaged_cache_is_rebuilt(run_dir, tiny_model_dir, tiny_tokenizer, recording_log, damage):
    tok = CountingTokenizer(tiny_tokenizer)
    first = prepare(run_dir, tiny_model_dir, tok, recording_log)
    expected = sequences(first)
    path = first.path
    del first
    damage(path)
    recording_log.events.clear()
    rebuilt = prepare(run_dir, tiny_model_dir, tok, recording_log)
    assert tok.calls == 24  # re-tokenized, not trusted
    assert "data.prepare.done" in recording_log.names()
    assert rebuilt.path == path
    assert sequences(rebuilt) == expected
    assert cache_entries(run_dir) == [path.name]  # no temporary or moved-aside copy left
    recording_log.events.clear()
    prepare(run_dir, tiny_model_dir, tok, recording_log)
    assert recording_log.names() == ["data.prepare.cached"]



# --- the validation split ----------------------------------------------------------------------

def test_validation_rows_are_held_out_by_a_hash_of_the_problem_and_never_trained_on(
        tmp_path, write_jsonl, tiny_model_dir, tiny_tokenizer, recording_log):
    from mathlora_daemon.demo.mathgen import generate_problems
    from mathlora_daemon.training.prepare import validation_row

    rows = generate_problems(200, seed=5)
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    cache = prepare(tmp_path, tiny_model_dir, tiny_tokenizer, recording_log, validation_fraction=0.1)
    held = [r for r in rows if validation_row(r["problem"], 0.1)]
    assert 8 <= len(held) <= 35  # about a tenth
    problems = cache.validation.problems()
    assert [p["problem"] for p in problems] == [r["problem"] for r in held]
    assert {p["kind"] for p in problems} <= {r["kind"] for r in rows} and problems[0]["answer"]
    assert len(cache) + len(cache.validation) == len(rows)  # no row is long at 1024: one sequence each
    fmt = template.PromptFormat.of("chat", tiny_tokenizer)
    trained = {tuple(cache.sequence(i).tolist()) for i in range(len(cache))}
    assert not any(tuple(fmt.example(r["problem"], r["solution"])[0]) in trained for r in held)
    done = recording_log.fields("data.prepare.done")
    assert (done["validation_rows"], done["validation_sequences"]) == (len(held), len(held))
    # The same rows whatever else changes: the split depends on the problem text alone.
    assert validation_row(rows[0]["problem"], 0.1) == validation_row("  " + rows[0]["problem"] + "\n", 0.1)


def test_a_validation_file_holds_every_validation_row(tmp_path, write_jsonl, math_rows, tiny_model_dir,
                                                      tiny_tokenizer, recording_log):
    write_jsonl(tmp_path / "data" / "train.jsonl", math_rows[:8])
    write_jsonl(tmp_path / "data" / "test.jsonl", math_rows[8:])
    cache = prepare(tmp_path, tiny_model_dir, tiny_tokenizer, recording_log, validation_name="data/test.jsonl",
                    validation_fraction=0.5)
    assert len(cache) == 8 and len(cache.validation) == 4  # the fraction is not used with a file
    assert [p["problem"] for p in cache.validation.problems()] == [r["problem"] for r in math_rows[8:]]


def test_long_rows_are_chunked_or_skipped_and_counted(tmp_path, write_jsonl, math_rows, tiny_model_dir,
                                                      tiny_tokenizer, recording_log):
    write_jsonl(tmp_path / "data" / "train.jsonl", math_rows)
    chunked = prepare(tmp_path, tiny_model_dir, tiny_tokenizer, recording_log, max_seq_len=200)
    recording_log.events.clear()
    skipped = prepare(tmp_path, tiny_model_dir, tiny_tokenizer, recording_log, max_seq_len=200, long_rows="skip")
    fmt = template.PromptFormat.of("chat", tiny_tokenizer)
    long = [r for r in math_rows if len(fmt.example(r["problem"], r["solution"])[0]) > 201]
    assert long and len(long) < len(math_rows)
    assert chunked.meta["exceeded_max_seq_len"] == len(long) and chunked.meta["long_rows_skipped"] == 0
    assert len(chunked) == len(math_rows) + len(long)  # each long row here is two chunks
    assert len(skipped) == len(math_rows) - len(long) and skipped.meta["long_rows_skipped"] == len(long)
    assert recording_log.fields("data.prepare.done")["long_rows_skipped"] == len(long)
    # A later chunk has no prompt left: its prompt length is 0, so all of it is trained on.
    starts = chunked.prompt_lens.tolist()
    assert sorted(starts)[: len(long)] == [0] * len(long)
