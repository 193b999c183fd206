"""data.pack through the real daemon: packed rows train, resume bit-exactly after SIGKILL,
and are recorded in the token cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runs import cli, copy, events, finish, kill_at, make_tiny_run, sha, start

PACK = ("--set", "data.pack=true", "--set", "data.max_seq_len=1024", "--set", "train.batch_size=2",
        "--set", "train.grad_accumulation_steps=1", "--set", "train.epochs=2", "--set", "train.max_steps=0",
        "--set", "daemon.checkpoint_every_steps=2", "--set", "daemon.keep_checkpoints=10",
        "--set", "lora.dropout=0.1")


@pytest.fixture(scope="module")
def packed_template(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("pack") / "run")


@pytest.fixture(scope="module")
def packed_reference(packed_template, tmp_path_factory) -> dict:
    run = copy(packed_template, tmp_path_factory.mktemp("pack-ref") / "run")
    finish(start(run, *PACK))
    return {"dir": run, "adapters": sha(run / "adapters" / "adapters.safetensors"),
            "losses": {e["step"]: e["loss"] for e in events(run, "train.step")}}


def test_packed_rows_hold_several_sequences_with_little_padding(packed_reference):
    run = packed_reference["dir"]
    pack = events(run, "data.pack")[0]
    start_event = events(run, "train.start")[0]
    n = pack["sequences"]
    assert n == start_event["sequences"] >= 64  # 64 rows (a long one in chunks)
    assert pack["rows"] == start_event["rows"] < n / 2  # the demo's rows are short: several to a row
    assert pack["padding"] < 0.15  # 64 sequences of ~250 tokens in rows of 1025: the last rows are part-empty
    # 2 rows a step, 2 epochs: the schedule counts rows, not sequences
    assert start_event["total_steps"] == 2 * -(-pack["rows"] // 2)
    steps = events(run, "train.step")
    assert len(steps) == start_event["total_steps"]
    records = list((run / "cache").glob("*/train/packs-1025.npz"))
    assert len(records) == 1
    with np.load(records[0], allow_pickle=False) as saved:
        assert sorted(saved["members"].tolist()) == list(range(n))
    assert events(run, "train.eval")  # validation loss measured as before (unpacked)


@pytest.mark.parametrize("point", ["micro@3", "save@4"])
def test_sigkill_resumes_a_packed_run_bit_exactly(packed_template, packed_reference, tmp_path, point):
    run = copy(packed_template, tmp_path / "run")
    kill_at(run, point, tmp_path, *PACK)
    finish(start(run, *PACK))
    assert events(run, "resume")
    assert sha(run / "adapters" / "adapters.safetensors") == packed_reference["adapters"]
    for e in events(run, "train.step"):
        assert e["loss"] == packed_reference["losses"][e["step"]], e


def test_packing_is_refused_for_grpo_with_the_key_named(packed_template, tmp_path):
    run = copy(packed_template, tmp_path / "run")
    result = cli("run", "--set", "data.pack=true", "--set", 'train.method="grpo"', run=run)
    assert result.returncode == 78
    assert "data.pack = true" in result.stderr and "Traceback" not in result.stderr
