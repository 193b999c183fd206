"""Tests for daemon.lock: one daemon per run directory, checked with a real second
process holding the flock, and the kernel releasing it when that process is killed."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys

import pytest

from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.lock import LockHeld, RunLock, acquire_lock, probe_lock

from runs import ROOT

# The child takes the lock, says so, and holds it until a line arrives on stdin.
HOLDER = """
import sys
from pathlib import Path
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.lock import acquire_lock

lock = acquire_lock(RunDir(Path(sys.argv[1])), retries=0)
print("locked", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a child process holding tmp_path's lock; yield the Popen (killed at the end)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert child.stdout.readline().strip() == "locked"  # synchronises: no sleeping
        yield child
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
        child.stdin.close()
        child.stdout.close()


def test_second_daemon_refused_then_free_after_holder_is_killed(tmp_path, holder):
    lock_file = tmp_path / "daemon.lock"
    assert lock_file.read_text() == f"{holder.pid}\n"
    assert lock_file.stat().st_mode & 0o777 == 0o600
    before = lock_file.read_bytes()

    with pytest.raises(LockHeld) as info:
        acquire_lock(RunDir(tmp_path), retries=0.1)
    assert info.value.pid == holder.pid
    assert info.value.path == lock_file
    assert str(info.value) == f"another daemon (pid {holder.pid}) holds {lock_file}"
    assert lock_file.read_bytes() == before  # the holder's pid is not truncated away
    assert sorted(p.name for p in tmp_path.iterdir()) == ["daemon.lock"]

    assert probe_lock(RunDir(tmp_path)) == (True, holder.pid)
    assert lock_file.read_bytes() == before

    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)  # reaped: its descriptors are closed, the kernel dropped the flock

    assert probe_lock(RunDir(tmp_path)) == (False, holder.pid)  # stale pid, nobody holds it
    with acquire_lock(RunDir(tmp_path), retries=0) as lock:
        assert isinstance(lock, RunLock) and lock.held
        assert lock_file.read_text() == f"{os.getpid()}\n"
        assert probe_lock(RunDir(tmp_path)) == (True, os.getpid())
    assert not lock.held
    assert probe_lock(RunDir(tmp_path)) == (False, os.getpid())


def test_holder_release_frees_the_lock(tmp_path, holder):
    holder.stdin.write("go\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "released"
    lock = acquire_lock(RunDir(tmp_path), retries=0)
    try:
        assert (tmp_path / "daemon.lock").read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()
    lock.release()  # twice is harmless


def test_same_process_second_acquire_is_refused(tmp_path):
    with acquire_lock(RunDir(tmp_path), retries=0):
        with pytest.raises(LockHeld) as info:
            acquire_lock(RunDir(tmp_path), retries=0)
        assert info.value.pid == os.getpid()
    acquire_lock(RunDir(tmp_path), retries=0).release()


def test_acquire_waits_out_a_momentary_shared_probe(tmp_path):
    (tmp_path / "daemon.lock").write_text("4242\n")
    probe_fd = os.open(tmp_path / "daemon.lock", os.O_RDONLY)
    fcntl.flock(probe_fd, fcntl.LOCK_SH)  # what `status` does for an instant
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # the probe ends during our first wait
        sleeps.append(seconds)
        os.close(probe_fd)

    now = iter([0.0, 0.0, 0.05])
    with acquire_lock(RunDir(tmp_path), retries=2.0, monotonic=lambda: next(now), sleep=sleep):
        assert (tmp_path / "daemon.lock").read_text() == f"{os.getpid()}\n"
    assert len(sleeps) == 1


def test_acquire_gives_up_after_retries(tmp_path):
    with acquire_lock(RunDir(tmp_path), retries=0):
        clock = iter([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
        sleeps: list[float] = []
        with pytest.raises(LockHeld):
            acquire_lock(RunDir(tmp_path), retries=2.0, monotonic=lambda: next(clock), sleep=sleeps.append)
        assert len(sleeps) == 3  # deadline 0.0 + 2.0; waited at 0.5, 1.0, 1.5; gave up at 2.0


def test_probe_never_creates_the_file(tmp_path):
    assert probe_lock(RunDir(tmp_path)) == (False, None)
    assert not (tmp_path / "daemon.lock").exists()


def test_garbage_in_lock_file_gives_unknown_pid(tmp_path):
    (tmp_path / "daemon.lock").write_text("not a pid\n")
    assert probe_lock(RunDir(tmp_path)) == (False, None)
    fd = os.open(tmp_path / "daemon.lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert probe_lock(RunDir(tmp_path)) == (True, None)
        with pytest.raises(LockHeld, match=r"another daemon \(unknown pid\) holds"):
            acquire_lock(RunDir(tmp_path), retries=0)
    finally:
        os.close(fd)


def test_missing_run_dir_is_not_created(tmp_path):
    with pytest.raises(FileNotFoundError):
        acquire_lock(RunDir(tmp_path / "nope"), retries=0)
    assert not (tmp_path / "nope").exists()
