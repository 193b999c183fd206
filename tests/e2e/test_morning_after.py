"""The end of the night, through the real CLI and real processes: every way a night ends
leaves the morning report, a later start undoes nothing, and no accepted request is lost.

Each test copies the tiny run (tests/runs.py) and drives `python -m mathlora_daemon`.
"""

from __future__ import annotations

import json
import random
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.control import send_request
from mathlora_daemon.runtime.lock import probe_lock

from runs import (
    ENV,
    TOTAL,
    assert_matches_reference,
    cli,
    copy,
    events,
    finish,
    hold,
    sha,
    start,
    step_logged,
    track,
    wait_for,
)
from runs import snapshot as run_snapshot


def set_keys(run: Path, **sections) -> None:
    """Append/replace keys in mathlora.toml: set_keys(run, train={"final_eval": 4})."""
    import tomllib

    from mathlora_daemon.config import Config, load_config, to_toml

    cfg = load_config(run / "mathlora.toml", [])
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    assert isinstance(cfg, Config)
    (run / "mathlora.toml").write_text(to_toml(cfg))
    tomllib.loads((run / "mathlora.toml").read_text())


def snapshot(run: Path) -> dict[str, str]:
    """Every file of the run (the log excepted) -> its hash: what a start must not change."""
    return run_snapshot(run, skip=("logs", "daemon.lock"), dirs=False)


def without_starts(files: dict[str, str]) -> dict[str, str]:
    """The crash guard records every start (state/starts.json); nothing else may change."""
    return {k: v for k, v in files.items() if k != "state/starts.json"}


# --- the report survives, the budget's end is evaluated, a later start undoes nothing -----

def test_a_budget_end_is_evaluated_and_later_starts_keep_the_report(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    set_keys(run, train={"final_eval": 4, "epochs": 400}, daemon={"budget_hours": 4 / 3600})
    finish(start(run))
    assert events(run, "budget.exhausted") and events(run, "train.final_eval")
    report = json.loads((run / "report.json").read_text())
    assert report["state"] == "budget_exhausted" and report["report"]["final_eval"]["n"] == 4
    first = cli("status", run=run)
    assert "eval " in first.stdout and "validation problems: accuracy" in first.stdout
    assert "eta" not in first.stdout  # nothing left to estimate on an exhausted run
    assert "adapters" in first.stdout and "val loss" in first.stdout

    before, loads = snapshot(run), len(events(run, "model.load.start"))
    again = start(run)  # launchd at the next login
    err = finish(again)
    assert "spent its training budget" in err and "mathlora-daemon status --run-dir" in err
    assert len(events(run, "model.load.start")) == loads  # the model was not loaded again
    assert without_starts(snapshot(run)) == without_starts(before)  # status, report, adapters as they were
    later = cli("status", run=run)
    for line in ("adapters", "val loss", "validation problems: accuracy", "train loss"):
        assert line in later.stdout, later.stdout  # the morning report is still there


def test_a_finished_run_started_again_touches_nothing(template_dir, reference, tmp_path):
    run = copy(reference["dir"], tmp_path / "run")
    finish(start(run))  # the reference ran before this version wrote report.json: this start writes it
    assert json.loads((run / "report.json").read_text())["state"] == "finished"
    before, done = snapshot(run), len(events(run, "train.done"))
    mtime = (run / "adapters" / "adapters.safetensors").stat().st_mtime_ns
    err = finish(start(run))
    assert "finished at step" in err and "nothing to do" in err
    assert len(events(run, "train.done")) == done and (run / "adapters" / "adapters.safetensors").stat().st_mtime_ns \
        == mtime
    assert without_starts(snapshot(run)) == without_starts(before)
    # More epochs: the same run has work again, and trains on from its last step.
    set_keys(run, train={"epochs": 5})
    finish(start(run))
    assert max(e["step"] for e in events(run, "train.step")) == TOTAL + TOTAL // 4


def test_a_stop_then_a_window_start_keeps_the_last_report(template_dir, tmp_path):
    """A run stopped by the user leaves its report; a start outside the window replaces
    the heartbeat but not the report."""
    run = copy(template_dir, tmp_path / "run")
    proc = start(run)
    wait_for(step_logged(run, 3), proc, "step 3")
    assert cli("stop", run=run).returncode == 0
    finish(proc)
    report = json.loads((run / "report.json").read_text())
    assert report["state"] == "stopped" and report["report"]["adapters"]
    set_keys(run, daemon={"window": _closed_window()})
    finish(start(run))
    out = cli("status", run=run).stdout
    assert "outside the training window" in out and "adapters" in out and "train loss" in out


def _closed_window() -> str:
    from datetime import datetime, timedelta

    now = datetime.now()
    a, b = now + timedelta(hours=2), now + timedelta(hours=3)
    return f"{a:%H:%M}-{b:%H:%M}"


# --- requests are acknowledged, durable, never lost ------------------------------------------

def test_a_stop_sent_during_start_up_is_never_lost(template_dir, tmp_path):
    """The race the soak found: `stop` answered while the daemon starts. Sent again and
    again from the moment the daemon exists, the first accepted one stops it."""
    for attempt in range(4):
        run = copy(template_dir, tmp_path / f"run{attempt}")
        proc = start(run)
        outcome = wait_for(lambda: send_request(RunDir(run), "stop", probe_lock)[0] == "accepted" or None, proc,
                           "an accepted stop", interval_s=0.001)
        assert outcome
        finish(proc)
        stops = events(run, "daemon.stop")
        assert stops[-1]["reason"] == "stopped by the user" and stops[-1]["step"] < TOTAL, stops


def test_a_thousand_random_requests_are_all_acted_on(template_dir, tmp_path):
    """1,000 random pause/resume requests against a running daemon, then a stop: every one
    the CLI path answers as accepted is logged by the daemon with its id, in order."""
    run = copy(template_dir, tmp_path / "run")
    set_keys(run, train={"epochs": 10000}, daemon={"checkpoint_every_steps": 1000})
    # The console goes to a file, as launchd's StandardErrorPath: 2,000 console lines
    # would fill a pipe nobody reads and block the daemon (not the daemon's fault).
    with open(tmp_path / "daemon.err", "w") as console:
        proc = track(subprocess.Popen([sys.executable, "-m", "mathlora_daemon", "run", "--run-dir", str(run)],
                                      env=ENV, stdin=subprocess.DEVNULL, stdout=console, stderr=console))
    wait_for(step_logged(run, 1), proc, "the first step")
    rng = random.Random(20)
    accepted = []
    for i in range(1000):
        command = rng.choice(("pause", "resume", "pause", "resume", "resume"))
        outcome, request, _ = send_request(RunDir(run), command, probe_lock)
        assert outcome == "accepted", (i, outcome)
        accepted.append((command, request["id"]))
        if i == 500:  # rm -rf state/ while running: later requests still arrive
            shutil.rmtree(run / "state")
    outcome, request, _ = send_request(RunDir(run), "stop", probe_lock)
    assert outcome == "accepted"
    accepted.append(("stop", request["id"]))
    assert proc.wait(timeout=120) == 0, (tmp_path / "daemon.err").read_text()[-3000:]
    acted = [(e["event"].split(".")[1], e["id"]) for e in events(run) if e["event"].startswith("control.")
             and e["event"] != "control.rejected"]
    assert acted == accepted
    assert events(run, "daemon.stop")[-1]["reason"] == "stopped by the user"


# --- a requested exit never waits for an evaluation --------------------------------------------

def test_sigterm_during_a_validation_pass_exits_at_once_and_the_run_matches(template_dir, reference, tmp_path):
    """SIGTERM mid-eval: the checkpoint is saved without it (deferred), the daemon exits 0
    at once, and the next start measures it first: the adapters are the uninterrupted
    run's, bit for bit (the evaluated steps, and so the selection, are the same)."""
    run = copy(template_dir, tmp_path / "run")
    proc = hold(run, "eval@8", tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)  # launchd's and systemd's stop timeout
    assert proc.returncode == 0, proc.stderr.read()
    deferred = events(run, "train.eval.deferred")
    assert deferred and deferred[0]["step"] == 8
    assert events(run, "daemon.stop")[-1]["signal_to_exit_s"] < 60
    state = json.loads((run / "checkpoints" / "step-00000008" / "trainer_state.json").read_text())
    assert state["eval"]["pending"] is True
    finish(start(run))
    resumed_evals = [e["step"] for e in events(run, "train.eval")]
    assert resumed_evals.count(8) == 1
    assert_matches_reference(run, reference)


def test_sigterm_during_the_final_eval_leaves_it_to_the_next_start(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    set_keys(run, train={"final_eval": 4})
    proc = hold(run, f"final_eval@{TOTAL}", tmp_path)
    adapters = run / "adapters" / "adapters.safetensors"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 0
    report = json.loads((run / "report.json").read_text())
    assert report["state"] == "finished" and report["report"]["final_eval_pending"] is True
    assert adapters.exists()
    assert "cut short by a stop" in cli("status", run=run).stdout
    finish(start(run))  # not "nothing to do": the final eval is owed
    report = json.loads((run / "report.json").read_text())
    assert report["report"]["final_eval"]["n"] == 4 and "final_eval_pending" not in report["report"]
    assert len(events(run, "train.step")) == TOTAL  # no step was taken again


# --- signals and exits tell their story ----------------------------------------------------------

def test_a_second_ctrl_c_exits_130_and_says_so(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    proc = hold(run, "save@4", tmp_path)
    proc.send_signal(signal.SIGINT)  # the first: stop at the boundary (after this save)
    wait_for(lambda: events(run, "signal.received"), proc, "the first SIGINT")
    proc.send_signal(signal.SIGINT)  # the second: at once
    proc.wait(timeout=60)
    assert proc.returncode == 130
    stop = events(run, "daemon.stop")[-1]
    assert stop["exit_code"] == 130 and "Ctrl-C" in stop["reason"]
    status = cli("status", run=run).stdout
    assert status.startswith("state      stopped") and "second Ctrl-C" in status


def test_a_signal_after_the_stop_finished_does_not_change_the_exit(template_dir, tmp_path):
    """Ctrl-C (or SIGTERM) again while the stopped daemon writes its end: exit 0 still,
    not a death by SIGINT (-2) nor 130."""
    run = copy(template_dir, tmp_path / "run")
    marker, release = tmp_path / "at-exit", tmp_path / "go"
    proc = start(run, env={"MATHLORA_TEST_HOLD": f"exit@{TOTAL}:{marker}:{release}"})
    wait_for(marker.exists, proc, "the end of training")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    release.touch()
    finish(proc, expect=0)
    assert events(run, "daemon.stop")[-1]["exit_code"] == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_a_stop_signal_while_the_daemon_starts_is_a_clean_stop(template_dir, tmp_path, sig):
    """launchd's SIGTERM at logout can come while the daemon is still importing and
    taking its lock: exit 0, nothing loaded, nothing trained, not a crash."""
    run = copy(template_dir, tmp_path / "run")
    marker, release = tmp_path / "starting", tmp_path / "go"
    proc = start(run, env={"MATHLORA_TEST_HOLD": f"start@0:{marker}:{release}"})
    wait_for(marker.exists, proc, "the start of `run`")
    proc.send_signal(sig)
    release.touch()
    err = finish(proc, expect=0)
    assert "Traceback" not in err
    stop = events(run, "daemon.stop")[-1]
    assert stop["reason"] == f"signal {sig.name}" and stop["exit_code"] == 0
    assert not events(run, "model.load.start") and not events(run, "train.step")
    assert json.loads((run / "state" / "starts.json").read_text())["clean_exit"] is True
    assert cli("status", run=run).stdout.startswith("state      stopped")


def test_sigquit_stops_with_a_checkpoint(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    proc = start(run)
    wait_for(step_logged(run, 5), proc, "step 5")
    proc.send_signal(signal.SIGQUIT)
    finish(proc)
    stop = events(run, "daemon.stop")[-1]
    assert stop["reason"] == "signal SIGQUIT" and stop["exit_code"] == 0
    assert any(e["step"] == stop["step"] for e in events(run, "checkpoint.saved"))
    # A kill while the final adapters were written leaves the writer's temporary file:
    # the next start removes it (and says so), the user's files stay.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = run / "adapters" / f".tmp-{dead.pid}-adapters.safetensors"
    leftover.write_bytes(b"half a file")
    finish(start(run))
    assert not leftover.exists() and (run / "adapters" / "adapters.safetensors").is_file()
    assert str(leftover) in [e["path"] for e in events(run, "checkpoint.cleaned")]


def test_a_temporary_failure_is_not_a_crash_in_status(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    proc = start(run, env={"MATHLORA_TEST_ENOSPC": "8"})
    finish(proc, expect=75)
    out = cli("status", run=run).stdout
    assert out.startswith("state      stopped") and "temporary failure" in out and "crashed" not in out
    err = events(run, "daemon.stop")[-1]["error"]
    assert "step 8" in err and "intact" in err


# --- run --debug is a scratch run -------------------------------------------------------------

def test_run_debug_changes_nothing_of_the_real_run(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    set_keys(run, daemon={"budget_hours": 1.0})
    proc = start(run)
    wait_for(step_logged(run, 6), proc, "step 6")
    assert cli("stop", run=run).returncode == 0
    finish(proc)
    real = {p: sha(run / p) for p in ("state/status.json", "state/starts.json", "report.json")}
    status_before = cli("status", "--json", run=run).stdout
    budget = json.loads(status_before)["budget_used_s"]
    debug = start(run, "--debug")
    out, err = debug.communicate(timeout=300)
    assert debug.returncode == 0, err
    assert {p: sha(run / p) for p in real} == real
    assert json.loads(cli("status", "--json", run=run).stdout)["budget_used_s"] == budget
    assert (run / "debug" / "state" / "status.json").exists() and (run / "debug" / "report.json").exists()
    # the debug start's crash record is its own, and it saw the debug run's steps
    assert json.loads((run / "debug" / "state" / "starts.json").read_text())["progressed"] is True
    # the command it suggests works as printed
    tried = next(line for line in out.splitlines() if line.startswith("try"))
    command = shlex.split(tried.split("  (or:")[0][len("try"):].strip())
    assert command[:2] == ["mathlora-daemon", "generate"] and "--adapter-path" in command
    command[command.index("--prompt") + 1] = "2+2"
    result = cli(*command[1:], "--max-new-tokens", "2")
    assert result.returncode == 0, result.stderr
