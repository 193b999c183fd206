"""Crash safety and bit-exact resume, with real processes and real SIGKILLs.

A run is killed at exact moments (between the micro-batches of a step, halfway through
writing a checkpoint, in a later epoch) through the daemon's test hold points, then
restarted; its final adapters must be byte-identical to an uninterrupted run's, and
every loss it logged (re-done steps included) must equal the uninterrupted loss of that
step. Torn checkpoints, a full disk and a changed configuration are covered too.
"""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mathlora_checkpoints.store import list_checkpoints, verify_checkpoint

from runs import ENV, TOTAL, assert_matches_reference, copy, events, finish, kill_at, sha, start


def test_uninterrupted_runs_are_reproducible(template_dir, reference, tmp_path):
    run = copy(template_dir, tmp_path / "again")
    finish(start(run))
    assert_matches_reference(run, reference)


def test_sigkill_mid_accumulation_mid_save_and_in_a_later_epoch_resumes_bit_exactly(template_dir, reference,
                                                                                      tmp_path):
    run = copy(template_dir, tmp_path / "run")
    kill_at(run, "micro@7", tmp_path)  # between the two micro-batches of step 7
    assert [c.step for c in list_checkpoints(run / "checkpoints")] == [4]

    kill_at(run, "save@12", tmp_path)  # checkpoint 12 half written
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the killed save left its temporary directory"
    assert [c.step for c in list_checkpoints(run / "checkpoints")] == [4, 8]  # 12 does not exist

    kill_at(run, "micro@19", tmp_path)  # epoch 2 (steps 17-24)
    kill_at(run, "micro@19", tmp_path)  # killed again at the very same point: still fine

    finish(start(run))
    assert_matches_reference(run, reference)
    resumes = [e["from_step"] for e in events(run, "resume")]
    assert resumes == [4, 8, 16, 16]
    assert any(e["event"] == "checkpoint.cleaned" for e in events(run))
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    # retention: the newest 2, plus the one this last start resumed from
    assert [c.step for c in list_checkpoints(run / "checkpoints")] == [16, 28, 32]
    # Identical state, identical files: the last checkpoint's optimizer state too, although
    # every resume rebuilt the optimizer's state from a file (another insertion order).
    final = Path("checkpoints") / f"step-{TOTAL:08d}" / "optimizer.safetensors"
    assert sha(run / final) == sha(reference["dir"] / final)


def test_a_finished_run_restarted_does_no_more_steps(reference, tmp_path):
    run = copy(reference["dir"], tmp_path / "done")
    logged = events(run)
    err = finish(start(run))
    assert "finished at step" in err and events(run) == logged  # nothing to do: not even a log line
    assert sha(run / "adapters" / "adapters.safetensors") == reference["adapters"]


@pytest.fixture(scope="session")
def at_step_12(template_dir, tmp_path_factory) -> Path:
    """A run killed in step 13 with checkpoints 4, 8, 12 all kept. (Not train.max_steps=12:
    that is a 12-step run, whose learning-rate schedule is not the full run's.)"""
    base = tmp_path_factory.mktemp("twelve")
    run = copy(template_dir, base / "run")
    kill_at(run, "micro@13", base, "--set", "daemon.keep_checkpoints=10")
    assert [c.step for c in list_checkpoints(run / "checkpoints")] == [4, 8, 12]
    return run


def _truncate(ckpt: Path) -> None:
    path = ckpt / "optimizer.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _flip_byte(ckpt: Path) -> None:
    path = ckpt / "adapters.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated": (_truncate, "size mismatch for optimizer.safetensors"),
    "flipped_byte": (_flip_byte, "sha256 mismatch for adapters.safetensors"),
    "missing_file": (lambda c: (c / "trainer_state.json").unlink(), "missing file trainer_state.json"),
    "no_manifest": (lambda c: (c / "MANIFEST.json").unlink(), "no MANIFEST.json"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_torn_checkpoint_is_rejected_and_the_previous_one_resumes_exactly(at_step_12, reference, tmp_path, case):
    corrupt, reason = CORRUPTIONS[case]
    run = copy(at_step_12, tmp_path / "run")
    corrupt(run / "checkpoints" / "step-00000012")
    finish(start(run, "--set", "daemon.keep_checkpoints=10"))
    rejected = events(run, "checkpoint.rejected")
    assert [Path(e["path"]).name for e in rejected] == ["step-00000012"]
    assert reason in rejected[0]["why"]
    assert [e["from_step"] for e in events(run, "resume")] == [8]
    assert_matches_reference(run, reference)
    assert verify_checkpoint(run / "checkpoints" / "step-00000012") is None  # rewritten whole


def test_disk_full_during_a_save_exits_75_and_loses_nothing(at_step_12, reference, tmp_path):
    run = copy(at_step_12, tmp_path / "run")
    ckpts = run / "checkpoints"
    before = {p.name: sha(f) for p in ckpts.iterdir() for f in sorted(p.iterdir())}
    err = finish(start(run, "--set", "daemon.keep_checkpoints=10", env={"MATHLORA_TEST_ENOSPC": "16"}), expect=75)
    assert "No space left on device" in err and "earlier checkpoints are intact" in err
    failed = events(run, "checkpoint.failed")
    assert len(failed) == 1 and failed[0]["level"] == "error" and failed[0]["errno"] == errno.ENOSPC
    assert failed[0]["step"] == 16
    for name in ("step-00000004", "step-00000008", "step-00000012"):
        assert verify_checkpoint(ckpts / name) is None
    assert {p.name: sha(f) for p in ckpts.iterdir() for f in sorted(p.iterdir())
            if p.name in {"step-00000004", "step-00000008", "step-00000012"}} == before
    assert not (ckpts / "step-00000016").exists()
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]

    finish(start(run))  # space is back: the next start resumes from 12 and ends where it should
    assert [e["from_step"] for e in events(run, "resume")][-1] == 12
    assert_matches_reference(run, reference)


def test_a_checkpoint_of_another_configuration_stops_with_78_and_names_the_fields(at_step_12, tmp_path):
    run = copy(at_step_12, tmp_path / "run")
    before = {f.name: sha(f) for f in sorted((run / "checkpoints" / "step-00000012").iterdir())}
    proc = start(run, "--set", "lora.rank=8", "--set", "train.grad_accumulation_steps=4")
    err = finish(proc, expect=78)
    assert "lora.rank: 4 -> 8" in err and "train.grad_accumulation_steps: 2 -> 4" in err
    assert {f.name: sha(f) for f in sorted((run / "checkpoints" / "step-00000012").iterdir())} == before
    stop = events(run, "daemon.stop")[-1]
    assert stop["exit_code"] == 78


def test_a_checkpoint_is_taken_at_least_every_segment(at_step_12, tmp_path):
    run = copy(at_step_12, tmp_path / "run")
    # a segment shorter than any step: every step boundary is a checkpoint
    finish(start(run, "--set", "train.max_steps=15", "--set", "daemon.checkpoint_every_steps=0",
                 "--set", "daemon.segment_minutes=0.00001", "--set", "daemon.keep_checkpoints=10"))
    saved = [e["step"] for e in events(run, "checkpoint.saved")]
    assert saved[-3:] == [13, 14, 15]
    assert all(e["seconds"] >= 0 and e["bytes"] > 0 for e in events(run, "checkpoint.saved"))


def test_fields_that_may_change_across_a_resume_are_accepted(at_step_12, tmp_path):
    run = copy(at_step_12, tmp_path / "run")
    finish(start(run, "--set", "train.max_steps=14", "--set", "daemon.budget_hours=2",
                 "--set", "daemon.segment_minutes=5", "--set", "daemon.keep_checkpoints=4"))
    assert [e["from_step"] for e in events(run, "resume")] == [12]
    assert max(e["step"] for e in events(run, "train.step")) == 14


def ckpt_cli(run: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mathlora_daemon", "checkpoints", *args, "--run-dir", str(run)],
                          capture_output=True, text=True, env=ENV, timeout=120)


def test_checkpoints_cli_lists_verifies_and_prunes(at_step_12, tmp_path):
    run = copy(at_step_12, tmp_path / "run")
    listed = json.loads(ckpt_cli(run, "list", "--json").stdout)["checkpoints"]
    assert [c["step"] for c in listed] == [4, 8, 12] and all(c["bytes"] > 0 for c in listed)
    human = ckpt_cli(run, "list").stdout.splitlines()
    assert len(human) == 3 and human[0].startswith("step        4")

    ok = ckpt_cli(run, "verify", "--json")
    assert ok.returncode == 0 and all(c["valid"] for c in json.loads(ok.stdout)["checkpoints"])
    _flip_byte(run / "checkpoints" / "step-00000008")
    bad = ckpt_cli(run, "verify")
    assert bad.returncode == 1
    assert "step        8" in bad.stdout and "INVALID: sha256 mismatch for adapters.safetensors" in bad.stdout

    pruned = json.loads(ckpt_cli(run, "prune", "--keep", "1", "--json").stdout)
    assert [c["step"] for c in pruned["kept"]] == [12]
    assert sorted(c["step"] for c in pruned["pruned"]) == [4, 8]
    assert ckpt_cli(run, "prune", "--keep", "0").returncode == 78


def _grouped(template: Path, dest: Path) -> Path:
    run = copy(template, dest)
    config = run / "mathlora.toml"
    text = config.read_text()
    assert "group_by_length = false" in text
    config.write_text(text.replace("group_by_length = false", "group_by_length = true"))
    return run


def test_length_grouped_batches_resume_bit_exactly(template_dir, reference, tmp_path):
    uninterrupted = _grouped(template_dir, tmp_path / "grouped-ref")
    finish(start(uninterrupted))
    grouped = {"losses": {e["step"]: e["loss"] for e in events(uninterrupted, "train.step")},
               "adapters": sha(uninterrupted / "adapters" / "adapters.safetensors")}
    assert grouped["losses"] != reference["losses"]  # another order of the same sequences

    run = _grouped(template_dir, tmp_path / "grouped")
    kill_at(run, "micro@7", tmp_path)
    kill_at(run, "micro@19", tmp_path)
    finish(start(run))
    assert [e["from_step"] for e in events(run, "resume")] == [4, 16]
    assert_matches_reference(run, grouped)


def test_building_compiled_traces_is_logged_and_not_charged_to_the_budget(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    # Each trace build takes 2 s longer, as a GPU's kernel compilation would.
    finish(start(run, "--set", "train.max_steps=6", env={"MATHLORA_TEST_SLOW_COMPILE": "2"}))
    compiled = events(run, "train.compiled")
    assert compiled[0]["step"] == 1 and compiled[0]["budgeted"] is False
    assert compiled[0]["traces"][0].startswith("accumulate 4x")  # batch 4, a length bucket
    total = sum(e["seconds"] for e in compiled)
    assert total >= 2 * sum(len(e["traces"]) for e in compiled) >= 4
    steps = events(run, "train.step")
    done = events(run, "train.done")[0]
    assert done["traces"] == compiled[-1]["traces_total"] and done["compile_s"] == pytest.approx(total, abs=0.01)
    # The budget counted the steps (and the checkpoints), not the seconds spent compiling.
    assert done["train_seconds"] < total / 2
    assert steps[-1]["budget_used_s"] <= done["train_seconds"] + 0.1
    assert all(e["step_s"] < 2 for e in steps)  # step times (and tokens/s) leave compiling out
