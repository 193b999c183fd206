"""Out of memory costs a step, not the night (training/oom.py), through the real daemon."""

from __future__ import annotations

import json
import signal

import pytest

from runs import TOTAL, cli, events, finish, hold, make_tiny_run, start

# tiny_config: micro-batches of 4 sequences, 2 a step, 32 steps.


@pytest.fixture(scope="module")
def tiny_template(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("oom") / "run")


def test_a_step_out_of_memory_is_taken_again_in_halves_and_the_run_goes_on(tiny_template, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_template, run)
    # Step 5 cannot hold more than one row per micro-batch: 4 -> 2 -> 1.
    finish(start(run, env={"MATHLORA_TEST_OOM": "5:1"}))
    splits = events(run, "train.batch_split")
    assert [(e["step"], e["split"], e["micro_batch_rows"]) for e in splits] == [(5, 2, 2), (5, 4, 1)]
    assert "Insufficient Memory" in splits[0]["error"] and "no longer bit-identical" in splits[0]["note"]
    steps = events(run, "train.step")
    assert [e["step"] for e in steps] == list(range(1, TOTAL + 1))  # no step lost, none taken twice
    assert all("batch_split" not in e for e in steps if e["step"] < 5)
    assert all(e["batch_split"] == 4 for e in steps if e["step"] >= 5)  # the split stays for the night
    # The same global batch: step 5 trained every token an unsplit step 5 would have.
    reference = tmp_path / "reference"
    shutil.copytree(tiny_template, reference)
    finish(start(reference, "--set", f"train.max_steps={5}"))
    ref5 = [e for e in events(reference, "train.step") if e["step"] == 5][0]
    split5 = [e for e in steps if e["step"] == 5][0]
    assert split5["tokens"] == ref5["tokens"]
    assert split5["loss"] == pytest.approx(ref5["loss"], rel=0.05)  # a mean over smaller micro-batches
    state = json.loads(sorted((run / "checkpoints").glob("step-*/trainer_state.json"))[-1].read_text())
    assert state["memory"]["batch_split"] == 4
    status = json.loads(cli("status", "--json", run=run).stdout)
    assert status["state"] == "finished" and status["batch_split"] == 4


def test_a_resumed_run_keeps_its_split(tiny_template, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_template, run)
    proc = hold(run, "micro@10", tmp_path, )  # no OOM: just a place to stop
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    # A start whose step 9 (re-done after the kill: the checkpoint is step 8) runs out of memory ...
    finish(start(run, env={"MATHLORA_TEST_OOM": "9:2"}))
    assert [e["split"] for e in events(run, "train.batch_split")] == [2]
    # ... and a later start resumes with the split it saved.
    finish(start(run, "--set", f"train.epochs={2 * 4}"))
    later = [e for e in events(run, "train.step") if e["step"] > TOTAL]
    assert later and all(e["batch_split"] == 2 for e in later)


def test_an_error_that_is_not_memory_is_not_retried(tiny_template, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_template, run)
    # One row per micro-batch and still out of memory: nothing left to split, the error goes up (a crash).
    proc = start(run, "--set", "train.batch_size=1", env={"MATHLORA_TEST_OOM": "3:0"})
    proc.wait(timeout=300)
    assert proc.returncode == 1
    assert [e["step"] for e in events(run, "train.step")] == [1, 2]


def test_a_start_killed_while_memory_ran_low_is_followed_by_one_with_the_split(tiny_template, tmp_path):
    """The system's kill (a SIGKILL, nothing to catch) with the last heartbeat showing less
    memory available than the warning level: the next start halves the micro-batches.
    (A warning level above any machine's memory makes every reading low here.)"""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_template, run)
    low = ("--set", "daemon.memory_warning_available_gb=4096", "--set", "daemon.memory_critical_available_gb=0")
    proc = hold(run, "micro@10", tmp_path, *low)
    status = json.loads((run / "state" / "status.json").read_text())
    assert status["state"] == "running" and status["phase"] == "training"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    finish(start(run, *low))
    (split,) = events(run, "train.batch_split")
    assert split["split"] == 2 and "died while training" in split["reason"]
    log = events(run)
    after = log[log.index(split) + 1:]
    steps = [e for e in after if e["event"] == "train.step"]
    assert [e["step"] for e in steps] == list(range(9, TOTAL + 1)) and all(e["batch_split"] == 2 for e in steps)
    # A kill with memory to spare is not taken for one.
    again = tmp_path / "again"
    shutil.copytree(tiny_template, again)
    proc = hold(again, "micro@10", tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    finish(start(again))
    assert not events(again, "train.batch_split")
