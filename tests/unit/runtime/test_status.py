"""`status` as a user sees it, in every state, and the heartbeat that feeds it.

Liveness is real: a child process takes the flock on `<run>/daemon.lock` the way the
daemon does; killing it with SIGKILL is a real crash."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mathlora_checkpoints.fsio import atomic_write_text
from mathlora_daemon.cli.watch import status_main
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.heartbeat import Heartbeat
from mathlora_daemon.runtime.status import read_status, render_status

from runs import ROOT, wait_for

LOCKER = r"""
import fcntl, os, sys
fd = os.open(os.path.join(sys.argv[1], "daemon.lock"), os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, f"{os.getpid()}\n".encode())
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin or kills us
"""




@pytest.fixture
def run_dir(tmp_path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.fixture
def hold_lock():
    """Return start(run_dir) -> Popen of a child holding the daemon lock (killed at teardown)."""
    children: list[subprocess.Popen] = []

    def start(run_dir: Path) -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, "-c", LOCKER, str(run_dir)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        children.append(child)
        assert child.stdout.readline().strip() == "locked"  # blocks until the flock is taken
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(5)


def write_status(run_dir: Path, **fields) -> dict:
    (run_dir / "state").mkdir(exist_ok=True)
    (run_dir / "state" / "status.json").write_text(json.dumps(fields))
    return fields


def full_fields(pid: int, now: float, state: str = "running") -> dict:
    return dict(pid=pid, run="dsmath", version="0.1.0", state=state, phase="training",
                step=3400, total_steps=27500, epoch=0, loss=0.847, recent_mean_loss=0.861,
                tok_per_s=1234.4, step_s=8.1, budget_used_s=8064.0, budget_total_s=57600.0,
                budget_left_s=49536.0, window="22:00-07:00",
                window_ends="2030-01-02T07:00:00+00:00",
                last_checkpoint_step=3400, last_checkpoint_at=_iso(now - 240),
                memory=dict(mem_active_gb=14.2, mem_peak_gb=15.1, rss_gb=15.8, sys_available_gb=9.3,
                            swap_used_gb=0.0),
                updated_unix=now - 3, updated_at=_iso(now - 3), world_size=1)


def _iso(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------- states


@pytest.mark.parametrize("exists", [True, False])
def test_empty_or_missing_run_dir_is_not_started(tmp_path, exists):
    run_dir = tmp_path / "run"
    if exists:
        run_dir.mkdir()
    status = read_status(RunDir(run_dir))
    assert status["state"] == "not_started"
    assert status["run_dir"] == str(run_dir)
    assert status["log_path"] == str(run_dir / "logs" / "daemon.jsonl")

    out = io.StringIO()
    assert status_main(RunDir(run_dir), False, out) == 0
    assert "not started" in out.getvalue()
    assert "None" not in out.getvalue()
    assert not (run_dir / "daemon.lock").exists()  # status never creates the lock


def test_running_when_a_live_process_holds_the_lock(run_dir, hold_lock):
    child = hold_lock(run_dir)
    now = time.time()
    write_status(run_dir, **full_fields(child.pid, now))

    status = read_status(RunDir(run_dir), now=now)
    assert status["state"] == "running"
    assert status["pid"] == child.pid
    assert status["heartbeat_age_s"] == pytest.approx(3.0, abs=0.2)
    assert "stale" not in status and "crashed_reason" not in status
    assert status["eta_s"] == pytest.approx((27500 - 3400) * 8.1, rel=1e-6)
    assert "eta_at" in status
    assert status["checkpoint_age_s"] == pytest.approx(240, abs=2)

    text = render_status(status)
    assert f"running (pid {child.pid}), phase training" in text
    assert "step 3400 / 27500 (12.4%), epoch 0" in text
    assert "0.847 (mean of the last 10 steps 0.861)" in text
    assert "1,234 tok/s, 8.1 s/step" in text
    assert "used 2 h 14 min, left 13 h 45 min of 16 h" in text
    assert "22:00-07:00, ends" in text
    assert "step 3400, 4 min ago" in text
    assert "active 14.2 GB, peak 15.1 GB, rss 15.8 GB, available 9.3 GB" in text
    assert "swap" not in text  # zero swap is noise
    assert str(run_dir / "logs" / "daemon.jsonl") in text
    assert "None" not in text


def test_held_lock_with_an_old_heartbeat_is_flagged_stale_not_crashed(run_dir, hold_lock):
    child = hold_lock(run_dir)
    now = time.time()
    write_status(run_dir, pid=child.pid, state="running", phase="training", updated_unix=now - 600)

    status = read_status(RunDir(run_dir), now=now, stale_after_s=120)
    assert status["state"] == "running"
    assert status["stale"] is True
    assert "NO HEARTBEAT FOR 10 min" in render_status(status)


def test_crashed_when_the_daemon_is_killed_without_a_final_state(run_dir, hold_lock):
    child = hold_lock(run_dir)
    now = time.time()
    write_status(run_dir, **full_fields(child.pid, now))
    assert read_status(RunDir(run_dir), now=now)["state"] == "running"

    child.send_signal(signal.SIGKILL)
    child.wait(5)  # reaped: the pid is really gone

    status = read_status(RunDir(run_dir), now=now + 60)
    assert status["state"] == "crashed"
    assert status["crashed_reason"] == f"process {child.pid} is gone; last heartbeat 1 min ago"
    assert status["step"] == 3400 and status["last_checkpoint_step"] == 3400  # last known fields kept
    assert "eta_at" not in status  # no promise of a finish time for a dead run
    text = render_status(status)
    assert text.startswith("state      crashed\n")
    assert f"process {child.pid} is gone" in text
    assert "None" not in text


def test_crashed_with_a_live_unrelated_pid_says_it_lost_the_lock(run_dir):
    # The dead daemon's pid was reused by some other process: the lock still decides.
    write_status(run_dir, pid=os.getpid(), state="paused", updated_unix=time.time())
    status = read_status(RunDir(run_dir))
    assert status["state"] == "crashed"
    assert f"process {os.getpid()} no longer holds the lock" in status["crashed_reason"]


@pytest.mark.parametrize("final", ["stopped", "finished", "budget_exhausted"])
def test_final_states_written_by_the_daemon_are_reported(run_dir, hold_lock, final):
    child = hold_lock(run_dir)
    child.stdin.close()  # a clean exit: the kernel drops the lock
    child.wait(5)
    now = time.time()
    write_status(run_dir, pid=child.pid, state=final, phase="done", step=27500, total_steps=27500,
                 step_s=8.0, reason="stopped by the user" if final == "stopped" else None,
                 updated_unix=now - 3600)

    status = read_status(RunDir(run_dir), now=now)
    assert status["state"] == final
    assert "crashed_reason" not in status and "stale" not in status
    text = render_status(status)
    assert text.startswith(f"state      {final.replace('_', ' ')}\n")
    assert "step 27500 / 27500 (100.0%)" in text
    assert "None" not in text
    if final == "stopped":
        assert "reason     stopped by the user" in text


def test_failed_from_the_crash_guard_record(run_dir):
    write_status(run_dir, pid=999999, state="running", step=10, updated_unix=time.time() - 30)
    failure = {"reason": "3 crashes in a row without progress", "kind": "crash_loop",
               "config_hash": "abc123", "at": "2025-01-01T00:00:00Z"}
    (run_dir / "state" / "failure.json").write_text(json.dumps(failure))

    status = read_status(RunDir(run_dir))
    assert status["state"] == "failed"
    assert status["reason"] == failure["reason"]
    assert status["failure"] == failure
    text = render_status(status)
    assert "state      failed\n" in text
    assert "why        3 crashes in a row without progress" in text


def test_a_live_daemon_overrides_an_old_failure_record(run_dir, hold_lock):
    child = hold_lock(run_dir)
    write_status(run_dir, pid=child.pid, state="waiting", phase="waiting", reason="outside window",
                 updated_unix=time.time())
    (run_dir / "state" / "failure.json").write_text(json.dumps({"reason": "old", "kind": "config"}))

    status = read_status(RunDir(run_dir))
    assert status["state"] == "waiting"
    assert status["reason"] == "outside window"


def test_new_daemon_before_its_first_heartbeat_is_running(run_dir, hold_lock):
    write_status(run_dir, pid=1234567, state="running", step=50, updated_unix=time.time() - 900)
    child = hold_lock(run_dir)

    status = read_status(RunDir(run_dir))
    assert status["state"] == "running"
    assert status["phase"] == "starting"
    assert status["pid"] == child.pid
    assert "stale" not in status  # the old heartbeat is not the new daemon's


def test_stopped_run_without_checkpoint_fields_is_described_from_checkpoints(run_dir):
    now = time.time()
    write_status(run_dir, pid=999999, state="stopped", updated_unix=now - 100)
    ck = run_dir / "checkpoints"
    (ck / "step-00000010").mkdir(parents=True)
    (ck / "step-00000010" / "MANIFEST.json").write_text(json.dumps({"step": 10, "created": now - 300}))
    (ck / "step-00000020").mkdir()  # no manifest: not a checkpoint
    (ck / ".tmp-step-00000030-1-ab").mkdir()

    status = read_status(RunDir(run_dir), now=now)
    assert status["last_checkpoint_step"] == 10
    assert status["checkpoint_age_s"] == pytest.approx(300, abs=1)
    assert "checkpoint step 10, 5 min ago" in render_status(status)


def test_render_sparse_status_never_prints_none():
    for status in ({"state": "crashed"}, {"state": "running", "pid": None, "phase": None, "loss": None,
                                          "memory": {"rss_gb": None}, "budget_total_s": 3600.0},
                   {"state": "paused", "reason": "on battery", "recent_mean_loss": 1.5}):
        text = render_status(status)
        assert "None" not in text and "null" not in text
    assert "budget     1 h" in render_status({"state": "running", "budget_total_s": 3600.0})


def test_status_json_output_parses(run_dir, hold_lock):
    child = hold_lock(run_dir)
    write_status(run_dir, **full_fields(child.pid, time.time()))
    out = io.StringIO()
    assert status_main(RunDir(run_dir), True, out) == 0
    data = json.loads(out.getvalue())
    assert data["state"] == "running" and data["pid"] == child.pid
    assert list(data) == sorted(data)


# --------------------------------------------------------------------------- heartbeat


def _status_file(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "state" / "status.json").read_text())
    except (OSError, ValueError):
        return None


def test_heartbeat_writes_periodically_and_stop_writes_final_state(run_dir):
    used = {"s": 0.0}

    def live():
        used["s"] += 1.0
        return {"budget_used_s": used["s"]}

    hb = Heartbeat(RunDir(run_dir), "dsmath", os.getpid(), total_budget_s=100.0)
    hb.update(state="running", phase="training", step=3)
    hb.start(interval_s=0.01, live_fields=live)
    try:
        first = wait_for(lambda: _status_file(run_dir), what="first heartbeat")
        wait_for(lambda: (_status_file(run_dir) or {}).get("updated_unix", 0) > first["updated_unix"]
                 and _status_file(run_dir)["budget_used_s"] > first["budget_used_s"],
                 what="a later heartbeat")
    finally:
        hb.update(state="finished", phase="done")
        hb.stop()

    data = _status_file(run_dir)
    assert data["state"] == "finished" and data["phase"] == "done"
    assert data["pid"] == os.getpid() and data["run"] == "dsmath" and data["world_size"] == 1
    assert data["budget_left_s"] == pytest.approx(100.0 - data["budget_used_s"])
    assert data["updated_at"].endswith("Z")
    assert stat.S_IMODE((run_dir / "state" / "status.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((run_dir / "state").stat().st_mode) == 0o700
    assert not [p for p in (run_dir / "state").iterdir() if p.name.startswith(".tmp-")]

    # What the heartbeat wrote is what status reads.
    status = read_status(RunDir(run_dir), probe=lambda _: (True, os.getpid()))
    assert status["state"] == "finished" and status["step"] == 3


def test_heartbeat_thread_survives_disk_full_and_a_bad_live_callable(run_dir):
    calls = {"write": 0, "live": 0}

    def flaky_writer(path, text):
        calls["write"] += 1
        if calls["write"] <= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        atomic_write_text(path, text)

    def flaky_live():
        calls["live"] += 1
        if calls["live"] == 5:
            raise ValueError("boom")
        return {"step": calls["live"]}

    hb = Heartbeat(RunDir(run_dir), "r", os.getpid(), 10.0, writer=flaky_writer)
    hb.start(interval_s=0.005, live_fields=flaky_live)
    try:
        wait_for(lambda: (_status_file(run_dir) or {}).get("step", 0) >= 7, what="writes after the failures")
        assert hb._thread.is_alive()
    finally:
        hb.stop()
    assert calls["write"] > 3


def test_heartbeat_writes_strict_json(run_dir):
    # A diverged loss (NaN) or a Path must not make status.json unreadable for jq.
    hb = Heartbeat(RunDir(run_dir), "r", os.getpid(), 10.0)
    hb.update(loss=float("nan"), adapter_dir=run_dir / "adapters")
    hb.write()
    text = (run_dir / "state" / "status.json").read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert data["loss"] is None and data["adapter_dir"] == str(run_dir / "adapters")
    assert "loss" not in render_status(read_status(RunDir(run_dir)))


def test_status_modules_do_not_import_mlx():
    code = ("import sys, mathlora_daemon.runtime.status, mathlora_daemon.runtime.logview; "
            "bad = [m for m in ('mlx', 'numpy', 'structlog') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_status_survives_a_concurrent_writer(run_dir, hold_lock):
    # status.json is replaced atomically: a reader racing the writer never sees a torn file.
    child = hold_lock(run_dir)
    hb = Heartbeat(RunDir(run_dir), "r", child.pid, 10.0)
    hb.start(interval_s=0.001)
    try:
        seen = set()
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            seen.add(read_status(RunDir(run_dir))["state"])
    finally:
        hb.stop()
    assert seen <= {"running", "not_started"}


# --- the morning report ---------------------------------------------------------------------

REPORT = {"adapters": "/runs/night/adapters", "steps": 400, "selected_step": 300,
          "selected_rule": "lowest validation loss", "first_loss": 1.2345, "recent_loss": 0.6789,
          "base_val_loss": 1.0, "best_val_loss": 0.75, "best_val_step": 300,
          "final_eval": {"n": 50, "base": {"accuracy": 0.1, "format_compliance": 0.5},
                         "adapters": {"accuracy": 0.3, "format_compliance": 0.96}}}


def test_the_morning_report_says_which_adapters_how_much_better_and_how_to_try_them():
    from mathlora_daemon.runtime.status import report_lines

    lines = report_lines(REPORT)
    assert lines == [
        "adapters   /runs/night/adapters (step 300 of the 400 trained, lowest validation loss)",
        "val loss   0.7500 at step 300 vs 1.0000 for the base model (-25.0%)",
        "train loss 1.2345 at step 1 -> 0.6789 (mean of the last 10 steps)",
        "eval       50 validation problems: accuracy 10.0% -> 30.0%, format 50.0% -> 96.0% (base -> adapters)",
        'try        mathlora-daemon generate --run-dir /runs/night --prompt "..."  '
        "(or: mathlora-daemon eval --run-dir /runs/night)",
    ]


def test_the_morning_report_warns_when_no_checkpoint_beat_the_base_model():
    from mathlora_daemon.runtime.status import report_lines

    worse = {**REPORT, "best_val_loss": 1.05, "selected_step": 400, "selected_rule": "last"}
    lines = report_lines(worse)
    assert lines[0].endswith("(step 400 of the 400 trained, the last)")
    assert lines[1].endswith("(+5.0%)") and lines[2].startswith("warning    no checkpoint beat the base model")
