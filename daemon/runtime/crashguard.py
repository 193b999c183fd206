"""Crash-loop guard: stop launchd restarting a daemon that can never get going.

launchd (KeepAlive {SuccessfulExit: false}) restarts the daemon after every non-zero exit,
78 included (docs/DESIGN.md, "Exit codes"). A daemon that crashes before its first optimizer
step, or fails on a configuration error, would be restarted forever. This module keeps:

``<run_dir>/state/starts.json``   the current start: pid, time, step, crashed starts in a
                                  row before it, whether it made progress, how it exited
``<run_dir>/state/failure.json``  a terminal failure ("crash_loop" or "config") with the
                                  config hash it happened under

and ``decide`` tells a new start to record ``failed`` and exit 0 at once while the same
configuration would fail the same way. The caller holds ``daemon.lock`` (one writer).

Sequence in the daemon::

    crashes = begin_start(run, os.getpid(), time.time(), step_at_start=step)
    reason = decide(run, crashes, cfg.daemon.max_crash_restarts, hash_)
    if reason:
        if read_failure(run) is None:  # a new crash loop; a repeated failure is on file
            record_failure(run, reason, "crash_loop", hash_, time.time())
        record_clean_exit(run, 0); exit 0
    ... a configuration error (InputError) -> record_failure(..., "config", hash_, ...),
        record_clean_exit(run, 78); exit 78
    ... first optimizer step done -> record_progress(run)
    ... before exiting with 0, 75 or 78 -> record_clean_exit(run, code)

No MLX import here: ``status`` imports this module and must be fast.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from mathlora_checkpoints.fsio import atomic_write_text, ensure_private_dir
from mathlora_checkpoints.store import read_json_object
from mathlora_daemon.rundir import RunDir

# Exits the daemon chose itself (docs/DESIGN.md, "Exit codes"); anything else is a crash.
CLEAN_EXIT_CODES = frozenset({0, 75, 78, 130})  # 130: a person pressed Ctrl-C twice, not a crash
# A temporary failure is "clean" but, repeated without a step, it is a loop all the same.
TEMPFAIL_EXIT_CODE = 75
FAILURE_KINDS = ("crash_loop", "config")


@dataclass
class StartRecord:
    """One start of the daemon, as kept in ``state/starts.json``.

    ``crashes_in_a_row``: crashed starts in a row (without progress) before this one.
    ``progressed``: this start completed an optimizer step. ``exit_code``: what it exited
    with, when it exited through ``record_clean_exit``; None while running or after a crash.
    """

    crashes_in_a_row: int
    step_at_start: int | None
    clean_exit: bool
    pid: int
    started_at: float
    progressed: bool = False
    exit_code: int | None = None

    def counts_as_crash(self) -> bool:
        """Return whether this (finished) start adds to the crash loop: it made no
        progress and either died without a clean exit or exited 75."""
        if self.progressed:
            return False
        return not self.clean_exit or self.exit_code == TEMPFAIL_EXIT_CODE


def read_start_record(run: RunDir) -> StartRecord | None:
    """Given a run directory, return the last start's record; None when there is none or
    it is unreadable (a damaged record counts as no history, never as a crash)."""
    data = read_json_object(run.starts_file)
    if data is None:
        return None
    try:
        record = StartRecord(
            crashes_in_a_row=_int(data["crashes_in_a_row"]),
            step_at_start=None if data.get("step_at_start") is None else _int(data["step_at_start"]),
            clean_exit=_bool(data["clean_exit"]),
            pid=_int(data["pid"]),
            started_at=float(data["started_at"]),
            progressed=_bool(data.get("progressed", False)),
            exit_code=None if data.get("exit_code") is None else _int(data["exit_code"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
    return record if record.crashes_in_a_row >= 0 else None


def begin_start(run: RunDir, pid: int, now: float, step_at_start: int | None = None) -> int:
    """Given the run directory, this process's pid, the wall time and (when known) the
    step it resumes from, record this start (not yet exited, no progress) and return the
    number of crashed starts in a row before it; raise OSError when the record cannot
    be written.

    The previous start counts as a crash when it made no progress and did not exit
    cleanly, or exited 75 (see ``StartRecord.counts_as_crash``).
    """
    previous = read_start_record(run)
    crashes = previous.crashes_in_a_row + 1 if previous is not None and previous.counts_as_crash() else 0
    _write_record(run, StartRecord(crashes_in_a_row=crashes, step_at_start=step_at_start,
                                       clean_exit=False, pid=pid, started_at=now))
    return crashes


def record_progress(run: RunDir) -> None:
    """Given the run directory, mark the current start as having completed an optimizer
    step (the crash count goes back to 0); no-op without a current record."""
    _update_record(run, progressed=True, crashes_in_a_row=0)


def record_clean_exit(run: RunDir, exit_code: int) -> None:
    """Given the run directory and the code the daemon is about to exit with, record it;
    no-op without a current record.

    0, 75 and 78 mark the start as ended cleanly (75 without progress still counts
    towards the crash loop); any other code is recorded but stays a crash.
    """
    _update_record(run, clean_exit=exit_code in CLEAN_EXIT_CODES, exit_code=int(exit_code))


def record_failure(run: RunDir, reason: str, kind: str, config_hash: str | None, now: float) -> None:
    """Given the run directory, a user-facing reason, the kind ("crash_loop" or "config"),
    the config hash it happened under and the wall time, write ``state/failure.json``
    atomically; raise ValueError for an unknown kind."""
    if kind not in FAILURE_KINDS:
        raise ValueError(f"failure kind must be one of {FAILURE_KINDS}, got {kind!r}")
    payload = {"reason": reason, "kind": kind, "config_hash": config_hash, "at": now}
    path = run.failure_file
    ensure_private_dir(path.parent)
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_failure(run: RunDir) -> dict | None:
    """Given the run directory, return the recorded failure {"reason", "kind",
    "config_hash", "at"}, or None when there is none or it is unreadable."""
    data = read_json_object(run.failure_file)
    if data is None or data.get("kind") not in FAILURE_KINDS or not isinstance(data.get("reason"), str):
        return None
    return data


def clear_failure(run: RunDir) -> None:
    """Given the run directory, remove the recorded failure (no error when there is none)."""
    run.failure_file.unlink(missing_ok=True)


def config_hash(config_text: str | None, overrides: list[str]) -> str:
    """Given the config file's text (None when there is no file) and the --set overrides
    in order, return a hex SHA-256 that changes when either changes."""
    # JSON keeps "no file" (null) apart from an empty file, and the overrides' order
    # (a later --set of the same key wins).
    canonical = json.dumps({"config": config_text, "overrides": list(overrides)}, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def decide(run: RunDir, crashes_before: int, limit: int, config_hash: str) -> str | None:
    """Given the run directory, ``begin_start``'s crash count, the configured limit and
    this start's config hash, return the reason this start must record ``failed`` and
    exit 0 at once, or None to go on.

    A recorded failure under the same config hash repeats (the config error, or the
    crash loop, would happen again). A recorded failure under a different hash is
    cleared, and the crash count with it: the user changed something, so the new
    configuration gets a full ``limit`` of tries.

    When a failure is already recorded the returned reason quotes it: record a new
    failure only when ``read_failure`` gives None (see the module docstring).
    """
    failure = read_failure(run)
    if failure is not None:
        if failure.get("config_hash") == config_hash:
            when = _local_time(failure.get("at"))
            if failure["kind"] == "config":
                return f"the configuration error recorded at {when} is unchanged: {failure['reason']}"
            return f"the crash loop recorded at {when} has an unchanged configuration: {failure['reason']}"
        clear_failure(run)
        _update_record(run, crashes_in_a_row=0)
        return None
    if crashes_before >= limit:
        return f"crashed {crashes_before} times in a row without completing a step"
    return None


def _update_record(run: RunDir, **changes) -> None:
    record = read_start_record(run)
    if record is None:
        return  # no begin_start in this run dir: nothing to mark, and nothing to invent
    for name, value in changes.items():
        setattr(record, name, value)
    _write_record(run, record)


def _write_record(run: RunDir, record: StartRecord) -> None:
    path = run.starts_file
    ensure_private_dir(path.parent)
    atomic_write_text(path, json.dumps(asdict(record), indent=2, sort_keys=True) + "\n")


def _int(value) -> int:
    # bool is an int in Python; in these files it is always a damaged record.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _bool(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true/false, got {value!r}")
    return value


def _local_time(at) -> str:
    """Given epoch seconds from failure.json, return a local ISO time for messages."""
    try:
        return dt.datetime.fromtimestamp(float(at)).isoformat(sep=" ", timespec="seconds")
    except (TypeError, ValueError, OverflowError, OSError):
        return "an unknown time"


# --- a run directory the daemon cannot write ------------------------------------------------
#
# The guard above keeps its records in the run directory. When that directory cannot be
# written (a read-only mount, another owner), the record goes to the user's state
# directory instead, keyed by the run directory's path, so launchd's next start can see
# it and end the loop with exit 0 like any other terminal failure.

def outside_failure_path(run: RunDir, environ: dict | None = None) -> Path:
    """Given the run directory, return where its unwritable-run-dir failure is recorded:
    $XDG_STATE_HOME (else ~/.local/state)/mathlora-daemon/unwritable-<path hash>.json."""
    import os

    env = os.environ if environ is None else environ
    home = Path(env.get("HOME") or Path.home())
    base = Path(env.get("XDG_STATE_HOME") or home / ".local" / "state")  # not a run directory
    key = hashlib.sha256(str(run.root.resolve()).encode("utf-8")).hexdigest()[:16]
    return base / "mathlora-daemon" / f"unwritable-{key}.json"


def record_outside_failure(run: RunDir, reason: str, now: float) -> Path | None:
    """Record that the run directory cannot be written; return where, or None when even
    the state directory cannot be written (nothing more can be done)."""
    path = outside_failure_path(run)
    try:
        ensure_private_dir(path.parent)
        atomic_write_text(path, json.dumps({"run_dir": str(run.root.resolve()), "reason": reason, "at": now},
                                           indent=2) + "\n")
    except OSError:
        return None
    return path


def read_outside_failure(run: RunDir) -> dict | None:
    """Return the recorded unwritable-run-dir failure {"run_dir", "reason", "at"}, or None."""
    try:
        data = json.loads(outside_failure_path(run).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("reason"), str) else None


def clear_outside_failure(run: RunDir) -> None:
    try:
        outside_failure_path(run).unlink(missing_ok=True)
    except OSError:
        pass


def repeated_outside_failure(run: RunDir, reason: str) -> str | None:
    """Given the run directory and this start's unwritable reason, return a message when
    the same failure is already on record (launchd's restart: exit 0), else None."""
    failure = read_outside_failure(run)
    if failure is None or failure["reason"] != reason:
        return None
    return f"the same error was recorded at {_local_time(failure.get('at'))}: {reason}"
