"""The daemon's heartbeat: ``state/status.json``, rewritten while it runs.

The running daemon keeps a :class:`Heartbeat`; a background thread rewrites
``<run_dir>/state/status.json`` (atomic replace, 0600, ``state/`` 0700) every few
seconds, so liveness and the budget spent are on disk even while one long step runs.
The fields are listed in runtime/status.py, which reads them for ``status``.

No MLX, numpy or structlog import here.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mathlora_checkpoints.fsio import DIR_MODE, atomic_write_text, ensure_private_dir
from mathlora_daemon import __version__
from mathlora_daemon.rundir import RunDir


class Heartbeat:
    """The daemon's live status, kept in memory and persisted to ``state/status.json``.

    ``update(**fields)`` may be called from any thread; ``start()`` runs a daemon thread
    that writes every ``interval_s``; ``stop()`` ends it and writes a final time. A write
    that fails with OSError (disk full, directory removed) never reaches the caller of
    ``start``: the thread keeps the error in ``last_error`` and tries again next time.
    """

    def __init__(self, run: RunDir, run_name: str, pid: int, total_budget_s: float,
                 clock: Callable[[], float] = time.time,
                 writer: Callable[[Path, str], None] = atomic_write_text):
        self.run = run
        self.path = run.status_file
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
            "log_path": str(run.log_file),
            "started_at": utc_iso(clock()),
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
            total, used = json_number(data.get("budget_total_s")), json_number(data.get("budget_used_s"))
            if total is not None and used is not None and "budget_left_s" not in data:
                data["budget_left_s"] = max(0.0, total - used)
            now = self.clock()
            data["updated_at"] = utc_iso(now)
            data["updated_unix"] = float(now)
            ensure_private_dir(self.path.parent)
            if self.writes == 0:
                # mkdir's mode applies only when it creates the directory; tighten an
                # existing one once (status.json tells what the run is doing).
                os.chmod(self.path.parent, DIR_MODE)
            self.writer(self.path, json.dumps(jsonable(data), sort_keys=True, indent=2,
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



# --------------------------------------------------------------------------- helpers


def json_number(value: Any) -> float | None:
    """Given a JSON value, return it as a finite float, else None (bools are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def json_int(value: Any) -> int | None:
    number = json_number(value)
    return int(number) if number is not None and number == int(number) else None


def jsonable(value: Any) -> Any:
    """Given a status value, return plain JSON: Path -> str, numpy scalars -> Python
    (without importing numpy), NaN/inf -> None (strict JSON for jq), other -> str."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def utc_iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
