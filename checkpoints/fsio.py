"""Durable file-system primitives: private modes, fsync, atomic replace.

Everything the project writes that must survive a crash or power loss goes through
here: a file is written to a temporary sibling, fsynced, renamed over the target, and
the parent directory is fsynced so the rename itself is durable.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700
TMP_PREFIX = ".tmp-"


def ensure_private_dir(path: Path) -> Path:
    """Given a directory path, create it (and parents) user-only and return it."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    return path


def fsync_dir(path: Path) -> None:
    """Given a directory, flush its entries (new names, renames) to disk."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Given a file written by someone else (numpy, safetensors), flush it to disk."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durable(path: Path, data: bytes) -> None:
    """Given a path that does not need atomic replacement (inside a temporary
    directory), write data user-only and fsync it."""
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_via(path: Path, write) -> None:
    """Given a target path and `write(tmp_path)`, a writer that creates a whole file (ours,
    numpy's, mlx's, matplotlib's), replace the target atomically and durably: the file is
    written to a temporary sibling whose name still ends with the target's (some writers
    insist on the suffix), made user-only, fsynced, renamed over the target, and the
    directory fsynced. Readers see the old file or the new one, never a torn mix; on any
    error the temporary file is removed and the old file is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)  # third-party writers leave the umask's mode
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def pid_exists(pid: int) -> bool:
    """Given a process id, return whether a process of that id exists (another user's
    counts: signal 0 is refused, not answered with "no such process")."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temporaries(directory: Path, pid_alive=pid_exists) -> list[Path]:
    """Given a directory written through atomic_write_via (the final adapters/), remove
    the temporary files ``.tmp-<pid>-<name>`` whose writer is gone (killed mid-write,
    they would stay forever) and return the removed paths, by name. A live writer's
    temporary is kept, and so is every other name (the user's files). Call it before
    this process writes there: a temporary carrying this very process's id is then a
    leftover of an earlier process that had the same id (a container restarts its
    daemon as pid 1), and is removed. `pid_alive(pid)` is injectable for tests."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    removed = []
    for entry in entries:
        pid, sep, rest = entry.name[len(TMP_PREFIX):].partition("-")
        ours = entry.name.startswith(TMP_PREFIX) and sep and rest and pid.isascii() and pid.isdigit()
        if not ours or not entry.is_file(follow_symlinks=False):
            continue
        if int(pid) != os.getpid() and pid_alive(int(pid)):
            continue
        path = Path(entry.path)
        path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        fsync_dir(Path(directory))
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Given a target path and its new content, replace it atomically and durably."""
    atomic_write_via(path, lambda tmp: write_bytes_durable(tmp, data))


def atomic_write_text(path: Path, text: str) -> None:
    """Given a target path and text, replace it atomically (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def seal_tree(directory: Path) -> None:
    """Given a directory tree built by any writers, make it user-only and flush every file
    and directory to disk, so the rename that publishes it cannot expose unwritten data
    after a power loss."""
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), DIR_MODE)
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, FILE_MODE)
            fsync_file(Path(path))
        fsync_dir(Path(root))
    os.chmod(directory, DIR_MODE)


def publish_dir(tmp_dir: Path, final_dir: Path) -> bool:
    """Given a fully written and fsynced temporary directory, rename it into place.

    Return True when it was published, False when `final_dir` already existed (another
    writer won; the temporary copy is removed). The parent is fsynced either way.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    fsync_dir(tmp_dir)
    try:
        os.rename(tmp_dir, final_dir)
    except OSError:
        if final_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
            fsync_dir(final_dir.parent)
            return False
        raise
    fsync_dir(final_dir.parent)
    return True


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Given a file, return the hex SHA-256 of its bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
