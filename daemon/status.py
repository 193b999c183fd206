"""The daemon's heartbeat (``state/status.json``) and the ``status`` command.

The running daemon keeps a :class:`Heartbeat`; a background thread rewrites
``<run_dir>/state/status.json`` (atomic replace, 0600, ``state/`` 0700) every few
seconds, so liveness and the budget spent are on disk even while one long step runs.
``status`` reads that file, ``state/failure.json`` and the ``daemon.lock`` probe and says
what the run is doing, including whether a daemon died without saying goodbye.

Fields the daemon puts in status.json (every one optional to a reader):

=====================  ===========================================================
pid, run, version      the daemon's process id, the run's name, the package version
state                  running | paused | waiting | stopped | finished |
                       budget_exhausted | failed
phase                  loading | preparing | training | checkpointing | paused |
                       waiting | done
reason                 why paused / waiting / stopped / failed (free text)
step, total_steps      global optimizer step and the planned total
epoch                  current epoch (0-based)
loss                   the last step's loss; recent_mean_loss: mean of recent steps
tok_per_s, step_s      recent throughput: tokens per second, seconds per step
budget_used_s          training seconds spent across all restarts;
budget_total_s,        the budget and what is left of it (left is derived from
budget_left_s          total - used when the daemon does not set it)
window, window_ends    the schedule window ("22:00-07:00") and its end (ISO, local)
last_checkpoint_step,  the newest checkpoint's step and when it was saved (UTC ISO)
last_checkpoint_at
memory                 {mem_active_gb, mem_peak_gb, rss_gb, sys_available_gb,
                       swap_used_gb}
log_path               the JSON log (``<run>/logs/daemon.jsonl``)
started_at             when this daemon process started (UTC ISO)
world_size             ranks training together (1: one process; mlx.launch: more)
updated_at,            when the file was written (UTC ISO, and Unix seconds); set
updated_unix           by :meth:`Heartbeat.write`
=====================  ===========================================================

``read_status`` adds the derived state (``not_started`` and ``crashed`` exist only
there), ``heartbeat_age_s``, ``stale``, ``crashed_reason``, ``eta_s``, ``eta_at``,
``checkpoint_age_s``, ``log_path``, ``run_dir`` and ``service`` (the launchd agent or
systemd unit of this run: ``{manager, label, installed, loaded, path}``, from
``daemon.install.service_status``; loaded is None when it cannot be told).

No MLX, numpy or structlog import here: ``status`` must answer in well under a second.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import psutil

from checkpoints.fsio import DIR_MODE, atomic_write_text, ensure_private_dir
from checkpoints.store import MANIFEST_NAME, parse_step_dir
from daemon import __version__
from daemon.logview import LOG_FILE
from daemon.install import service_status
from daemon.lock import probe_lock

STATUS_FILE = Path("state") / "status.json"
FAILURE_FILE = Path("state") / "failure.json"
CHECKPOINTS_DIR = "checkpoints"

LIVE_STATES = ("running", "paused", "waiting")
TERMINAL_STATES = ("stopped", "finished", "budget_exhausted", "failed")
STALE_AFTER_S = 120.0


# --------------------------------------------------------------------------- heartbeat


class Heartbeat:
    """The daemon's live status, kept in memory and persisted to ``state/status.json``.

    ``update(**fields)`` may be called from any thread; ``start()`` runs a daemon thread
    that writes every ``interval_s``; ``stop()`` ends it and writes a final time. A write
    that fails with OSError (disk full, directory removed) never reaches the caller of
    ``start``: the thread keeps the error in ``last_error`` and tries again next time.
    """

    def __init__(self, run_dir: Path, run_name: str, pid: int, total_budget_s: float,
                 clock: Callable[[], float] = time.time,
                 writer: Callable[[Path, str], None] = atomic_write_text):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STATUS_FILE
        self.clock = clock
        self.writer = writer
        self.last_error: BaseException | None = None
        self.writes = 0
        self._fields: dict[str, Any] = {
            "pid": pid,
            "run": run_name,
            "version": __version__,
            "state": "running",
            "phase": "loading",
            "budget_total_s": float(total_budget_s),
            "log_path": str(self.run_dir / LOG_FILE),
            "started_at": _utc_iso(clock()),
            "world_size": 1,
        }
        self._lock = threading.Lock()        # guards _fields
        self._write_lock = threading.Lock()  # one writer at a time: the temp file name is per-pid
        self._live_fields: Callable[[], dict] | None = None
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, **fields: Any) -> None:
        """Given fields, merge them into the current status (thread-safe)."""
        with self._lock:
            self._fields.update(fields)

    def snapshot(self) -> dict[str, Any]:
        """Return a copy of the current in-memory status."""
        with self._lock:
            return dict(self._fields)

    def write(self) -> dict[str, Any]:
        """Write the current status (with ``live_fields()`` merged in, ``budget_left_s``
        derived and ``updated_at``/``updated_unix`` stamped) atomically; return what was
        written. Raise OSError when the file cannot be written."""
        live = self._live_fields
        if live is not None:
            extra = live()  # outside our lock: the callable may take the caller's locks
            if extra:
                self.update(**extra)
        with self._write_lock:
            data = self.snapshot()
            total, used = _number(data.get("budget_total_s")), _number(data.get("budget_used_s"))
            if total is not None and used is not None and "budget_left_s" not in data:
                data["budget_left_s"] = max(0.0, total - used)
            now = self.clock()
            data["updated_at"] = _utc_iso(now)
            data["updated_unix"] = float(now)
            ensure_private_dir(self.path.parent)
            if self.writes == 0:
                # mkdir's mode applies only when it creates the directory; tighten an
                # existing one once (status.json tells what the run is doing).
                os.chmod(self.path.parent, DIR_MODE)
            self.writer(self.path, json.dumps(_jsonable(data), sort_keys=True, indent=2,
                                              allow_nan=False) + "\n")
            self.writes += 1
            return data

    def start(self, interval_s: float = 10.0,
              live_fields: Callable[[], dict] | None = None) -> None:
        """Given a write interval and an optional callable returning fresh fields
        (``budget_used_s``, memory...) merged at every write, start the background
        writer; it writes at once, then every ``interval_s``. Raise RuntimeError when
        already started."""
        if self._thread is not None:
            raise RuntimeError("heartbeat already started")
        self._live_fields = live_fields
        self._stop_event.clear()
        self._thread = threading.Thread(target=self._loop, args=(float(interval_s),),
                                        name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the background writer (if any) and write once more; a failing final write
        is kept in ``last_error``, not raised (stop runs on the way out)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop_event.set()
            thread.join(timeout_s)
        self._safe_write()

    def _loop(self, interval_s: float) -> None:
        while True:
            self._safe_write()
            if self._stop_event.wait(interval_s):
                return

    def _safe_write(self) -> None:
        try:
            self.write()
            self.last_error = None
        except Exception as exc:  # noqa: BLE001 - the heartbeat must never kill the daemon
            # OSError is the expected one (disk full); a bad live_fields callable or an
            # unserializable field must not stop the heartbeat either.
            self.last_error = exc


# --------------------------------------------------------------------------- reading



class NullHeartbeat:
    """The heartbeat of a rank other than 0 in a distributed job: rank 0 alone writes
    status.json (with the world size), so these calls do nothing."""

    def update(self, **fields: Any) -> None:
        pass

    def start(self, *args, **kwargs) -> None:
        pass

    def stop(self, *args, **kwargs) -> None:
        pass

    def write(self) -> dict[str, Any]:
        return {}


def read_status(run_dir: Path, now: float | None = None,
                probe: Callable[[Path], tuple[bool, int | None]] = probe_lock,
                pid_alive: Callable[[int], bool] = psutil.pid_exists,
                stale_after_s: float = STALE_AFTER_S,
                service_probe: Callable[[Path], dict | None] | None = service_status) -> dict[str, Any]:
    """Given a run directory, return the ``status`` answer: the heartbeat's fields with
    the derived ``state`` and the derived fields listed in the module docstring. Never
    raises for a missing or damaged run directory (an empty one is ``not_started``).

    The lock is the authority on liveness: held -> the heartbeat's state (flagged
    ``stale`` when its heartbeat is older than ``stale_after_s``); free -> a recorded
    failure, else the final state the daemon wrote, else ``crashed``.
    """
    run_dir = Path(run_dir)
    now = time.time() if now is None else float(now)

    # Probe, read, probe again: a daemon starting or exiting between the two reads
    # would otherwise be reported as crashed (lock free, file says running).
    for _ in range(3):
        lock_before = _safe_probe(probe, run_dir)
        heartbeat = _read_json_object(run_dir / STATUS_FILE)
        failure = _read_json_object(run_dir / FAILURE_FILE)
        lock_after = _safe_probe(probe, run_dir)
        if lock_before == lock_after:
            break
    held, lock_pid = lock_after

    status: dict[str, Any] = dict(heartbeat or {})
    file_state = status.get("state") if isinstance(status.get("state"), str) else None
    file_pid = _int(status.get("pid"))
    updated = _number(status.get("updated_unix"))
    age = max(0.0, now - updated) if updated is not None else None
    if age is not None:
        status["heartbeat_age_s"] = round(age, 1)
    stale = age is not None and age > stale_after_s

    if held is None:
        # The lock cannot be probed (odd file system, permissions): fall back to the pid
        # and the heartbeat's freshness.
        held = file_pid is not None and _alive(pid_alive, file_pid) and not stale
        lock_pid = file_pid if held else None

    if held:
        ours = heartbeat is not None and (lock_pid is None or lock_pid == file_pid)
        if ours:
            status["state"] = file_state or "running"
            if stale:
                status["stale"] = True  # alive but silent: a hung daemon
        else:
            # A new daemon holds the lock and has not written its first heartbeat yet;
            # the rest of the file is the previous daemon's last word (still the progress).
            status["state"] = "running"
            status["phase"] = "starting"
            status.pop("reason", None)
        if lock_pid is not None:
            status["pid"] = lock_pid
    elif failure is not None:
        status["state"] = "failed"
        status["reason"] = str(failure.get("reason") or "recorded failure")
        status["failure"] = failure
    elif heartbeat is None:
        status["state"] = "not_started"
    elif file_state in TERMINAL_STATES:
        status["state"] = file_state
    else:
        # The file says the daemon is alive, but nobody holds the lock: it died without
        # writing a final state (SIGKILL, power loss, crash).
        status["state"] = "crashed"
        status["crashed_reason"] = _crashed_reason(file_pid, age, pid_alive)

    _add_checkpoint(status, run_dir, now)
    _add_eta(status, now)
    total, used = _number(status.get("budget_total_s")), _number(status.get("budget_used_s"))
    if total is not None and used is not None and _number(status.get("budget_left_s")) is None:
        status["budget_left_s"] = max(0.0, total - used)
    if not isinstance(status.get("log_path"), str):
        status["log_path"] = str(run_dir / LOG_FILE)
    status["run_dir"] = str(run_dir)
    # Whether launchd/systemd will (re)start this run; a probe only when its file exists.
    service = service_probe(run_dir) if service_probe is not None else None
    if service is not None:
        status["service"] = service
    return status


def _safe_probe(probe, run_dir: Path) -> tuple[bool | None, int | None]:
    try:
        held, pid = probe(run_dir)
    except OSError:
        return None, None
    return bool(held), pid


def _alive(pid_alive, pid: int) -> bool:
    if pid <= 0:  # pid 0 would mean "our process group" to kill(); never a daemon
        return False
    try:
        return bool(pid_alive(pid))
    except Exception:  # noqa: BLE001 - a liveness probe that fails says nothing
        return False


def _crashed_reason(pid: int | None, age: float | None, pid_alive) -> str:
    who = f"process {pid}" if pid is not None else "the daemon"
    if pid is not None and _alive(pid_alive, pid):
        # The pid exists but does not hold the lock: reused by another process, or a
        # daemon that lost its lock file.
        what = f"{who} no longer holds the lock"
    else:
        what = f"{who} is gone"
    when = f"last heartbeat {_duration(age)} ago" if age is not None else "no heartbeat time"
    return f"{what}; {when}"


def _add_checkpoint(status: dict, run_dir: Path, now: float) -> None:
    if _int(status.get("last_checkpoint_step")) is None:
        newest = newest_checkpoint(run_dir / CHECKPOINTS_DIR)
        if newest is not None:
            status["last_checkpoint_step"] = newest[0]
            if newest[1] is not None:
                status["last_checkpoint_at"] = _utc_iso(newest[1])
    at = _parse_iso(status.get("last_checkpoint_at"))
    if at is not None:
        status["checkpoint_age_s"] = round(max(0.0, now - at), 1)


def newest_checkpoint(root: Path) -> tuple[int, float | None] | None:
    """Given the checkpoints directory, return (step, created Unix time or None) of the
    highest ``step-<8 digits>`` directory that has a MANIFEST.json, or None. Cheap: no
    hashes are checked (restore verifies)."""
    try:
        names = [entry.name for entry in os.scandir(root)]
    except OSError:
        return None
    steps = sorted((s, n) for n in names if (s := parse_step_dir(n)) is not None)
    for step, name in reversed(steps):
        manifest = Path(root) / name / MANIFEST_NAME
        if not manifest.is_file():
            continue  # no manifest: not a checkpoint (DESIGN.md)
        created = _number((_read_json_object(manifest) or {}).get("created"))
        if created is None:
            try:
                created = manifest.stat().st_mtime
            except OSError:
                created = None
        return step, created
    return None


def _add_eta(status: dict, now: float) -> None:
    # tok/s alone cannot give an ETA (tokens per step vary); seconds per step can.
    step, total, step_s = _int(status.get("step")), _int(status.get("total_steps")), _number(status.get("step_s"))
    if status.get("state") == "finished" or None in (step, total, step_s) or step_s <= 0:
        return
    eta = max(0, total - step) * step_s
    status["eta_s"] = round(eta, 1)
    if status.get("state") == "running" and not status.get("stale"):
        status["eta_at"] = _local_iso(now + eta)


# --------------------------------------------------------------------------- rendering


def render_status(status: dict[str, Any]) -> str:
    """Given a ``read_status`` answer, return a short human table (one ``label value``
    per line; missing fields are left out, never shown as None)."""
    rows: list[tuple[str, str]] = []
    state = str(status.get("state") or "unknown")
    pid, phase = _int(status.get("pid")), status.get("phase")

    head = state.replace("_", " ")
    if state in LIVE_STATES:
        if pid is not None:
            head += f" (pid {pid})"
        if phase:
            head += f", phase {phase}"
    if status.get("stale"):
        head += f", NO HEARTBEAT FOR {_duration(_number(status.get('heartbeat_age_s')))} (hung?)"
    rows.append(("state", head))

    if state == "crashed" and status.get("crashed_reason"):
        rows.append(("why", str(status["crashed_reason"])))
    elif status.get("reason"):
        rows.append(("why" if state == "failed" else "reason", str(status["reason"])))
    if state == "not_started":
        rows.append(("run dir", str(status.get("run_dir", ""))))

    step, total, epoch = _int(status.get("step")), _int(status.get("total_steps")), _int(status.get("epoch"))
    if step is not None:
        text = f"step {step}"
        if total:
            text += f" / {total} ({100.0 * step / total:.1f}%)"
        if epoch is not None:
            text += f", epoch {epoch}"
        rows.append(("progress", text))

    loss, mean = _number(status.get("loss")), _number(status.get("recent_mean_loss"))
    if loss is not None or mean is not None:
        parts = [f"{loss:.3f}"] if loss is not None else []
        if mean is not None:
            parts.append(f"(mean of recent steps {mean:.3f})" if parts else f"mean of recent steps {mean:.3f}")
        rows.append(("loss", " ".join(parts)))

    world = _int(status.get("world_size"))
    if world is not None and state != "not_started":
        rows.append(("world", "1 process" if world == 1 else
                     f"{world} ranks (mlx.launch; rank 0 reports, speed is the whole job's)"))

    tok_s, step_s = _number(status.get("tok_per_s")), _number(status.get("step_s"))
    speed = []
    if tok_s is not None:
        speed.append(f"{tok_s:,.0f} tok/s")
    if step_s is not None:
        speed.append(f"{step_s:.1f} s/step" if step_s >= 1 else f"{step_s:.2f} s/step")
    if speed:
        rows.append(("speed", ", ".join(speed)))

    used, left, total_b = (_number(status.get(k)) for k in ("budget_used_s", "budget_left_s", "budget_total_s"))
    budget = []
    if used is not None:
        budget.append(f"used {used / 3600:.2f} h")
    if left is not None:
        budget.append(f"left {left / 3600:.2f} h")
    if budget or total_b is not None:
        text = ", ".join(budget)
        if total_b is not None:
            text = f"{text} of {total_b / 3600:.2f} h" if text else f"{total_b / 3600:.2f} h"
        rows.append(("budget", text))

    window, window_ends = status.get("window"), _parse_iso(status.get("window_ends"))
    if window or window_ends is not None:
        parts = [str(window)] if window else []
        if window_ends is not None:
            parts.append(f"ends {_clock_time(window_ends, _number(status.get('updated_unix')))}")
        rows.append(("window", ", ".join(parts)))

    eta_s, eta_at = _number(status.get("eta_s")), _parse_iso(status.get("eta_at"))
    if eta_s is not None:
        if eta_at is not None:
            text = f"{_clock_time(eta_at, eta_at - eta_s)} (in {_duration(eta_s)})"
        else:
            text = f"{_duration(eta_s)} of training left"
        if left is not None and eta_s > left:
            text += "; the budget runs out first"
        rows.append(("eta", text))

    ck_step, ck_age = _int(status.get("last_checkpoint_step")), _number(status.get("checkpoint_age_s"))
    if ck_step is not None:
        text = f"step {ck_step}"
        if ck_age is not None:
            text += f", {_duration(ck_age)} ago"
        rows.append(("checkpoint", text))

    memory = status.get("memory") if isinstance(status.get("memory"), dict) else {}
    mem = []
    for key, label in (("mem_active_gb", "active"), ("mem_peak_gb", "peak"), ("rss_gb", "rss"),
                       ("sys_available_gb", "available"), ("swap_used_gb", "swap")):
        value = _number(memory.get(key))
        if value is not None and not (key == "swap_used_gb" and value == 0):
            mem.append(f"{label} {value:.1f} GB")
    if mem:
        rows.append(("memory", ", ".join(mem)))

    hb_age = _number(status.get("heartbeat_age_s"))
    if hb_age is not None and state in LIVE_STATES:
        rows.append(("heartbeat", f"{_duration(hb_age)} ago"))
    if status.get("log_path") and state != "not_started":
        rows.append(("log", str(status["log_path"])))
    if isinstance(status.get("service"), dict):
        rows.append(("service", _service_text(status["service"])))
    return "\n".join(f"{label:<10} {value}".rstrip() for label, value in rows) + "\n"


def _service_text(service: dict) -> str:
    """Given the ``service`` field, return e.g. ``launchd agent com.mathlora.daemon.x:
    installed, loaded``."""
    manager = service.get("manager")
    what = f"{manager} {'agent' if manager == 'launchd' else 'unit'} {service.get('label', '')}".rstrip()
    if service.get("other_run_dir"):
        return f"{what}: not installed for this run (taken by {service['other_run_dir']})"
    if not service.get("installed"):
        return f"{what}: not installed (mathlora-daemon install)"
    word = "loaded" if manager == "launchd" else "enabled"
    loaded = service.get("loaded")
    state = word if loaded is True else f"not {word}" if loaded is False else f"{word}: unknown (no answer)"
    return f"{what}: installed, {state}"


def status_main(run_dir: Path, as_json: bool = False, out: TextIO | None = None) -> int:
    """Given a run directory, print its status as JSON (``as_json``) or as the human
    table to ``out`` (default stdout) and return 0: status always answers, even for a
    missing or empty directory ("not started")."""
    out = sys.stdout if out is None else out
    status = read_status(Path(run_dir))
    if as_json:
        out.write(json.dumps(_jsonable(status), sort_keys=True, indent=2) + "\n")
    else:
        out.write(render_status(status))
    out.flush()
    return 0


# --------------------------------------------------------------------------- helpers


def _read_json_object(path: Path) -> dict | None:
    """Given a path, return the JSON object in it; None when missing, unreadable,
    damaged or not an object (status must describe a damaged run, not crash on it)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _number(value: Any) -> float | None:
    """Given a JSON value, return it as a finite float, else None (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _int(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number == int(number) else None


def _jsonable(value: Any) -> Any:
    """Given a status value, return plain JSON: Path -> str, numpy scalars -> Python
    (without importing numpy), NaN/inf -> None (strict JSON for jq), other -> str."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def _utc_iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _local_iso(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _parse_iso(value: Any) -> float | None:
    """Given an ISO-8601 string (``Z`` or an offset; naive means local), return Unix
    seconds, else None. Python 3.10's fromisoformat does not accept ``Z``."""
    if not isinstance(value, str) or not value:
        return None
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _clock_time(t: float, reference: float | None) -> str:
    """Given a Unix time, return local ``HH:MM``, with the weekday when it is not on the
    reference time's day."""
    moment = datetime.fromtimestamp(t)
    if reference is not None and datetime.fromtimestamp(reference).date() != moment.date():
        return moment.strftime("%a %H:%M")
    return moment.strftime("%H:%M")


def _duration(seconds: float | None) -> str:
    """Given seconds, return a short human duration: ``45 s``, ``4 min``, ``6.2 h``, ``3.1 days``."""
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
