"""`status` for a daemon that holds its lock but does not move: stopped by SIGSTOP or
Ctrl-Z, or only slow to write its heartbeat; and no eta for a run that has ended or
spent its budget. The lock probe, the liveness check and the process state are
injected, so every input is controlled here (tests/e2e/test_night_details.py stops a
real daemon)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.status import read_status, render_status

PID = 4242


def status_of(run_dir: Path, age_s: float, process: str | None = "sleeping", held: bool = True,
              **fields) -> tuple[dict, list[int]]:
    """Write a heartbeat `age_s` old and read it back with the daemon's process in
    state `process`; return the status and the pids whose state was asked."""
    now = time.time()
    (run_dir / "state").mkdir(parents=True, exist_ok=True)
    heartbeat = dict(pid=PID, state="running", phase="training", step=40, total_steps=100, step_s=2.0,
                     budget_used_s=100.0, budget_total_s=3600.0, updated_unix=now - age_s)
    (run_dir / "state" / "status.json").write_text(json.dumps({**heartbeat, **fields}))
    asked: list[int] = []
    status = read_status(RunDir(run_dir), now=now, probe=lambda _run: (held, PID if held else None),
                         pid_alive=lambda pid: held, process_status=lambda pid: asked.append(pid) or process)
    return status, asked


@pytest.mark.parametrize("process", ["stopped", "tracing-stop"])
def test_a_stopped_daemon_is_said_to_be_suspended_with_how_to_resume_it(tmp_path, process):
    status, asked = status_of(tmp_path, age_s=26, process=process)
    assert asked == [PID] and status["state"] == "running" and status["suspended"] is True
    assert "eta_at" not in status  # no finish time while it does not move
    head = render_status(status).splitlines()[0]
    assert head == (f"state      running (pid {PID}), phase training, SUSPENDED (SIGSTOP or Ctrl-Z; "
                    f"`kill -CONT {PID}` resumes it)")
    # Stopped for longer than the stale limit: still SUSPENDED, not "hung?".
    status, _ = status_of(tmp_path, age_s=600, process=process)
    assert status["stale"] is True and "SUSPENDED" in render_status(status) and "hung" not in render_status(status)


def test_an_old_heartbeat_gets_a_hint_before_it_is_stale(tmp_path):
    head = render_status(status_of(tmp_path, age_s=26)[0]).splitlines()[0]
    assert head == (f"state      running (pid {PID}), phase training, last heartbeat 26 s ago; written every 10 s: "
                    "busy or suspended?")
    assert render_status(status_of(tmp_path, age_s=20)[0]).splitlines()[0] == (
        f"state      running (pid {PID}), phase training")
    stale = render_status(status_of(tmp_path, age_s=600)[0])
    assert "NO HEARTBEAT FOR 10 min (hung?)" in stale and "busy or suspended" not in stale
    # The process state cannot be read (gone, another user's /proc): no claim either way.
    status, _ = status_of(tmp_path, age_s=26, process=None)
    assert "suspended" not in status and "busy or suspended?" in render_status(status)


@pytest.mark.parametrize("state", ["budget_exhausted", "stopped", "finished", "failed"])
def test_a_run_that_has_ended_gets_no_eta(tmp_path, state):
    status, asked = status_of(tmp_path, age_s=3600, held=False, state=state, phase="done",
                              budget_used_s=3600.0, budget_left_s=0.0)
    assert status["state"] == state and asked == []  # only a live daemon's process is looked at
    assert "eta_s" not in status and "eta" not in render_status(status).split()


def test_a_spent_budget_gets_no_eta_and_a_short_one_says_it_runs_out_first(tmp_path):
    # Still running (writing its last checkpoint), but the budget is spent.
    status, _ = status_of(tmp_path, age_s=2, budget_used_s=3600.0)
    assert status["budget_left_s"] == 0 and "eta_s" not in status
    assert "budget runs out first" not in render_status(status)
    status, _ = status_of(tmp_path, age_s=2, budget_used_s=3540.0)  # 60 s left, 120 s of steps
    assert status["eta_s"] == 120.0 and "eta_at" in status
    assert "the budget runs out first" in render_status(status)
