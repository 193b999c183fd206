"""Single-instance lock on a run directory: ``<run_dir>/daemon.lock`` (docs/DESIGN.md, "Run directory").

The daemon holds an exclusive ``flock`` on the file for its whole life and writes its pid
into it; the kernel drops the lock when the process dies however it dies (SIGKILL, power
loss of the process, crash), so a stale file never blocks a later start. ``status``
probes the lock with a momentary shared lock, which is why acquiring retries briefly.

The file is never removed: unlinking it on release would let a third process create and
lock a new file while a second one still holds the old, unlinked one.

No MLX import here: ``status`` imports this module and must be fast.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mathlora_daemon.rundir import RunDir

LOCK_MODE = 0o600
_RETRY_INTERVAL_S = 0.05
_MAX_PID_BYTES = 64


class LockHeld(Exception):
    """Another live process holds the run directory's lock.

    ``pid`` is the pid written in the lock file (None when it is empty or unreadable, e.g.
    the holder is between locking and writing), ``path`` the lock file.
    """

    def __init__(self, pid: int | None, path: Path):
        self.pid = pid
        self.path = Path(path)
        who = f"pid {pid}" if pid is not None else "unknown pid"
        super().__init__(f"another daemon ({who}) holds {self.path}")


@dataclass
class RunLock:
    """An acquired lock: the open file descriptor carrying the flock, and its path.

    Use ``release()`` or ``with acquire_lock(run) as lock:``. Releasing twice is fine.
    """

    fd: int | None
    path: Path

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        """Unlock and close the descriptor; the file and its pid stay (see module docstring)."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def acquire_lock(run: RunDir, retries: float = 2.0, *,
                 monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> RunLock:
    """Given an existing run directory, take its exclusive lock, write our pid into the
    lock file and return the RunLock; raise LockHeld (with the holder's pid from the file)
    when another process still holds it after ``retries`` seconds, FileNotFoundError when
    the run directory does not exist.

    Only ``daemon.lock`` is created or written, and only once the lock is ours: a held
    lock's file (and the holder's pid in it) is left untouched.
    """
    path = run.lock_file
    # O_NOFOLLOW: a symlink planted at daemon.lock must not make us truncate its target.
    fd = os.open(str(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, LOCK_MODE)
    try:
        deadline = monotonic() + max(0.0, retries)
        while not _try_flock(fd, fcntl.LOCK_EX):
            # `status` holds a shared lock for a moment only; a daemon holds it for hours.
            if monotonic() >= deadline:
                raise LockHeld(_read_pid(fd), path)
            sleep(_RETRY_INTERVAL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)  # closing also drops the flock if we had taken it
        raise
    return RunLock(fd=fd, path=path)


def probe_lock(run: RunDir) -> tuple[bool, int | None]:
    """Given a run directory, return (held by a live process, pid written in the lock
    file or None); a missing lock file gives (False, None) and is never created.

    When not held, the pid is the last daemon's (now gone). When held, the pid may be
    None for the instant between the holder's flock and its pid write.
    """
    path = run.lock_file
    try:
        fd = os.open(str(path), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False, None
    try:
        if not _try_flock(fd, fcntl.LOCK_SH):
            return True, _read_pid(fd)
        try:
            return False, _read_pid(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _try_flock(fd: int, mode: int) -> bool:
    """Given a descriptor and LOCK_EX or LOCK_SH, return True when the lock was taken
    without blocking, False when another open file holds a conflicting one."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _read_pid(fd: int) -> int | None:
    """Given the lock file's descriptor, return the positive pid written in it, else None."""
    try:
        text = os.pread(fd, _MAX_PID_BYTES, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None
