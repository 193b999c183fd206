"""Control: pause/resume/stop requests from the CLI, and watching files for changes.

The CLI writes `<run_dir>/state/control.json` atomically, addressed to the daemon that
holds the lock (`to_pid`); the running daemon learns of it through a `FileWatcher`
(watchdog, plus a cheap re-read at step boundaries, so a missed event or a deleted
`state/` loses nothing), acknowledges it in `state/control-ack.json` at once, and acts on
each request id once at the next step boundary. The CLI answers "accepted" only after
that acknowledgement (`send_request`). A request addressed to this daemon that is already
there when it starts watching (written between its lock and its watcher) is delivered;
one addressed to an earlier daemon is stale and never acted on. The same watcher reports
edits of the config file, which `reload_config` turns into applied safe changes and
rejected unsafe ones.

This module must stay light: `pause`, `resume` and `stop` import it, so no MLX here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from mathlora_checkpoints.fsio import atomic_write_text, ensure_private_dir
from mathlora_daemon.config import RELOADABLE, Config, config_to_dict, is_reloadable, load_config
from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import RunDir

COMMANDS = ("pause", "resume", "stop")
REQUIRED_KEYS = {"command", "id"}
ALLOWED_KEYS = {"command", "id", "at", "pid", "to_pid"}
ACK_TIMEOUT_S = 10.0  # how long the CLI waits for the daemon's acknowledgement
MAX_CONTROL_BYTES = 64 * 1024  # a real request is ~150 bytes; refuse to parse junk
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Fields that only steer the daemon (time, checkpoints, guards), never the training
# math: changing them mid-run keeps the exactness promise and the config fingerprint.
# Declared with each key in config.py.
SAFE_FIELDS = RELOADABLE

WATCHED_EVENT_TYPES = {"created", "modified", "moved", "closed"}


def write_request(run: RunDir, command: str, to_pid: int | None = None, request_id: str | None = None) -> dict:
    """Given a run directory, a command and the pid of the daemon it is for, write a
    request atomically (state dir 0700, file 0600) and return it; raise InputError naming
    the command and the allowed ones when it is not known."""
    if command not in COMMANDS:
        raise InputError(f"unknown control command {command!r}; allowed: {', '.join(COMMANDS)}")
    request = {
        "command": command,
        "id": request_id or uuid.uuid4().hex,
        "at": datetime.now(timezone.utc).isoformat(),
        "pid": os.getpid(),
    }
    if to_pid is not None:
        request["to_pid"] = int(to_pid)
    path = run.control_file
    ensure_private_dir(path.parent)
    atomic_write_text(path, json.dumps(request) + "\n")
    return request


def read_ack(run: RunDir) -> dict | None:
    """The daemon's last acknowledgement {"id", "command", "pid", "at"}, or None."""
    try:
        data = json.loads(run.control_ack_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("id"), str) else None


def send_request(run: RunDir, command: str, probe, timeout_s: float = ACK_TIMEOUT_S,
                 clock=time.monotonic, pause=time.sleep) -> tuple[str, dict, int | None]:
    """Given a run directory, a command and the lock probe (runtime/lock.py probe_lock),
    write the request for the daemon holding the lock and wait for its acknowledgement.
    Return (outcome, request, pid): "accepted" (the daemon took it), "no_daemon" (none
    runs, or it exited before reading it: nothing was acted on), or "unacknowledged"
    (no answer within `timeout_s`: suspended or hung; the request stays and is acted on
    when the daemon reads it). A daemon that is replaced meanwhile (a restart) gets the
    request re-addressed, with the same id."""
    running, pid = probe(run)
    if not running:
        return "no_daemon", {"command": command, "id": ""}, None
    request = write_request(run, command, to_pid=pid)
    deadline = clock() + timeout_s
    while True:
        ack = read_ack(run)
        if ack is not None and ack.get("id") == request["id"]:
            return "accepted", request, ack.get("pid", pid)
        running, holder = probe(run)
        if not running:
            ack = read_ack(run)  # it may have acknowledged, then exited at once (a stop)
            if ack is not None and ack.get("id") == request["id"]:
                return "accepted", request, ack.get("pid", pid)
            return "no_daemon", request, pid
        if holder is not None and holder != pid:
            pid = holder
            request = write_request(run, command, to_pid=pid, request_id=request["id"])
        if clock() >= deadline:
            return "unacknowledged", request, pid
        pause(0.02)


def parse_request(raw: bytes) -> tuple[dict | None, str | None]:
    """Given the control file's bytes, return (request, None) for a valid request or
    (None, why it is rejected)."""
    if len(raw) > MAX_CONTROL_BYTES:
        return None, f"control file is {len(raw)} bytes, more than {MAX_CONTROL_BYTES}"
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"control file is not valid JSON: {exc}"
    if not isinstance(data, dict):
        return None, f"control file must hold a JSON object, got {type(data).__name__}"
    missing = REQUIRED_KEYS - data.keys()
    if missing:
        return None, f"control request lacks {', '.join(sorted(missing))}"
    extra = data.keys() - ALLOWED_KEYS
    if extra:
        return None, f"control request has unknown keys {', '.join(sorted(extra))}; allowed: {', '.join(sorted(ALLOWED_KEYS))}"
    command = data["command"]
    if command not in COMMANDS:
        return None, f"unknown control command {command!r}; allowed: {', '.join(COMMANDS)}"
    if not isinstance(data["id"], str) or not _ID_RE.match(data["id"]):
        return None, f"control request id {data['id']!r} is not 1-64 letters, digits, '-' or '_'"
    if "at" in data and not isinstance(data["at"], str):
        return None, f"control request 'at' must be a string, got {data['at']!r}"
    for name in ("pid", "to_pid"):
        if name in data and (isinstance(data[name], bool) or not isinstance(data[name], int)):
            return None, f"control request '{name}' must be an integer, got {data[name]!r}"
    return data, None


def read_request(run: RunDir) -> tuple[dict | None, str | None]:
    """Given a run directory, return (request, None) for a valid control request,
    (None, None) when there is no control file, or (None, reason) when the file is
    rejected (the daemon logs `control.rejected` and ignores it)."""
    path = run.control_file
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONTROL_BYTES + 1)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"
    return parse_request(raw)


def _content_hash(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: FileWatcher) -> None:
        super().__init__()
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in WATCHED_EVENT_TYPES:
            return
        # An atomic replace arrives as a move of the temporary file onto the target.
        raw = event.dest_path if event.event_type == "moved" else event.src_path
        self.watcher._on_path(Path(os.fsdecode(raw)).resolve())


class FileWatcher:
    """Watches the control file and the config file, and calls back on real changes.

    `on_control()` is called once for each new control request id and once for each
    new rejected file content; fetch what arrived with `take_control()`. `on_config()`
    is called when the config file's content changes (not on mere touches). Both
    callbacks run on watchdog's thread: they must only set a flag or an Event and let
    the main loop do the work.

    Call `prime()` before `start()`: a request addressed to this daemon (`to_pid`, its
    pid) that is already there is delivered; any other is recorded as seen and never
    acted upon. Every delivered request is acknowledged in `state/control-ack.json`.
    `poll()` re-reads the control file (and re-creates and re-watches a deleted `state/`):
    the daemon calls it at step boundaries, so no request depends on one file event.
    """

    def __init__(self, run: RunDir, config_path: Path | None,
                 on_control: Callable[..., Any], on_config: Callable[[], Any],
                 observer_factory: Callable[[], Any] = Observer, pid: int | None = None) -> None:
        self.run = run
        self.pid = os.getpid() if pid is None else pid
        self.ack_file = run.control_ack_file
        self.control_file = run.control_file.resolve()
        self.state_dir = self.control_file.parent
        self.config_file = Path(config_path).resolve() if config_path is not None else None
        self.on_control = on_control
        self.on_config = on_config
        self.observer_factory = observer_factory
        self.observer: Any = None
        self._lock = threading.Lock()
        self._last_id: str | None = None
        self._last_rejected: str | None = None  # hash of the last rejected content
        self._config_hash: str | None = None
        self._pending: list[tuple[dict | None, str | None]] = []
        self._watched_fd: int | None = None  # state/ as watched, held open (see _watching_state)

    def prime(self) -> dict | None:
        """Record the config content and a stale control request (valid or not, not
        addressed to this daemon) as already seen; deliver a request addressed to this
        daemon. Return the current request."""
        request, reason = read_request(self.run)
        with self._lock:
            if self.config_file is not None:
                self._config_hash = _content_hash(self.config_file)
            if request is None and reason is not None:
                self._last_rejected = _content_hash(self.control_file)
        if request is not None:
            if self._for_me(request):
                self._control_changed()
            else:
                with self._lock:
                    self._last_id = request["id"]
        return request

    def _for_me(self, request: dict) -> bool:
        # A request without an address comes from an older CLI: act on it only once
        # watching (it cannot be told from a stale one at start-up).
        return request.get("to_pid") == self.pid

    def _acknowledge(self, request: dict) -> None:
        try:
            ensure_private_dir(self.ack_file.parent)
            atomic_write_text(self.ack_file, json.dumps({
                "id": request["id"], "command": request["command"], "pid": self.pid,
                "at": datetime.now(timezone.utc).isoformat()}) + "\n")
        except OSError:
            pass  # a full disk: the CLI says "not acknowledged", the request is still acted on

    def poll(self) -> None:
        """Re-read the control file now (deliver a new request missed by the watcher),
        and re-create and re-watch `state/` when it was removed or replaced."""
        if self.observer is not None and not self._watching_state():
            self._rewatch()
        self._control_changed()

    def _watching_state(self) -> bool:
        """Whether the directory being watched is still `state/`: a removed directory
        keeps its inode while we hold it open, with no links left (so an inode number
        reused by the new `state/` cannot fool this)."""
        if self._watched_fd is None:
            return False
        try:
            held, now = os.fstat(self._watched_fd), self.state_dir.stat()
        except OSError:
            return False
        return held.st_nlink > 0 and (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)

    def _rewatch(self) -> None:
        try:
            self.stop()
            self.start()
        except OSError:
            pass  # the next poll tries again

    def take_control(self) -> list[tuple[dict | None, str | None]]:
        """Return and forget the control deliveries since the last call, oldest first:
        (request, None) to act on or (None, reason) to log as `control.rejected`."""
        with self._lock:
            pending, self._pending = self._pending, []
        return pending

    def _on_path(self, path: Path) -> None:
        if path == self.control_file:
            self._control_changed()
        elif self.config_file is not None and path == self.config_file:
            self._config_changed()

    def _control_changed(self) -> None:
        # Read, compare and acknowledge under one lock: watchdog's thread and the main
        # loop's poll() both come here. A read done outside it could be handed the lock
        # after a newer request was delivered, and deliver its older request a second
        # time (the file only ever moves forward, so serialized reads never go back).
        with self._lock:
            request, reason = read_request(self.run)
            if request is not None:
                if request["id"] == self._last_id:
                    return
                if "to_pid" in request and not self._for_me(request):
                    return  # for another daemon (an earlier one, or a CLI race): not ours to act on
                self._last_id = request["id"]
            elif reason is not None:
                digest = _content_hash(self.control_file)
                if digest == self._last_rejected:
                    return
                self._last_rejected = digest
            else:  # the file went away between the event and the read
                return
            self._pending.append((request, reason))
            if request is not None:
                self._acknowledge(request)
        self.on_control(request["command"] if request is not None else None)

    def _config_changed(self) -> None:
        with self._lock:  # as above: a stale hash must not replace a newer one
            digest = _content_hash(self.config_file)
            if digest is None or digest == self._config_hash:
                return
            self._config_hash = digest
        self.on_config()

    def start(self) -> None:
        """Create the state directory if needed and start watching (no-op when
        already started)."""
        if self.observer is not None:
            return
        ensure_private_dir(self.state_dir)
        self._close_watched()
        self._watched_fd = os.open(self.state_dir, os.O_RDONLY)
        handler = _Handler(self)
        observer = self.observer_factory()
        dirs = {self.state_dir}
        if self.config_file is not None:
            dirs.add(self.config_file.parent)
        for directory in sorted(dirs):
            # Watch the directory, not the file: atomic replaces swap the inode.
            observer.schedule(handler, str(directory), recursive=False)
        observer.start()
        self.observer = observer

    def _close_watched(self) -> None:
        fd, self._watched_fd = self._watched_fd, None
        if fd is not None:
            os.close(fd)

    def stop(self) -> None:
        """Stop watching and join the watchdog thread; safe to call twice."""
        self._close_watched()
        observer, self.observer = self.observer, None
        if observer is not None:
            # watchdog's inotify thread logs an ERROR ("queue_events() called when the
            # thread is inactive") when a file event races its own shutdown: harmless
            # (we are done watching), but it would be the last line a user sees.
            logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)
            observer.stop()
            observer.join()


def is_safe_field(name: str) -> bool:
    """Given a dotted config key, return whether it may change while running."""
    return is_reloadable(name)


def _flatten(cfg: Config) -> dict[str, Any]:
    return {f"{section}.{key}": value
            for section, body in config_to_dict(cfg).items() for key, value in body.items()}


def reload_config(path: Path | None, overrides: list[str] | tuple[str, ...], current: Config,
                  view: Callable[[Config], Config] | None = None) -> tuple[Config, dict, list[str], str | None]:
    """Given the config file, the run's `--set` overrides, the config in use and how the
    run sees a config (`view`: a stage of "sft+grpo"; None: as it is), load
    the file again and return (config to use, {field: [old, new]} applied, [unsafe
    changed fields not applied], None); on an invalid, missing or empty file return
    (current, {}, [], error message) and apply nothing (`config.rejected`).

    Only SAFE_FIELDS are applied, on top of `current` (which is not modified).
    """
    if path is None or not Path(path).is_file():
        # load_config treats a missing file as "all defaults": mid-run that would
        # silently reset the safe fields, e.g. while an editor swaps the file.
        return current, {}, [], f"{path}: config file is missing; keeping the current config"
    try:
        empty = not Path(path).read_bytes().strip()
    except OSError:
        empty = False  # load_config reports the read error with its own message
    if empty:
        # An editor saving in place truncates first; the write follows in a moment.
        return current, {}, [], f"{path}: config file is empty; keeping the current config"
    try:
        new = load_config(path, overrides)
    except InputError as exc:
        return current, {}, [], str(exc)
    if view is not None:
        new = view(new)
    old_flat, new_flat = _flatten(current), _flatten(new)
    changed = [key for key in new_flat if new_flat[key] != old_flat.get(key)]
    applied = {key: [old_flat.get(key), new_flat[key]] for key in changed if is_safe_field(key)}
    rejected = [key for key in changed if not is_safe_field(key)]
    result = copy.deepcopy(current)
    for key in applied:
        section, _, name = key.partition(".")
        setattr(getattr(result, section), name, copy.deepcopy(new_flat[key]))
    return result, applied, rejected, None


__all__ = [
    "COMMANDS", "SAFE_FIELDS", "FileWatcher", "is_safe_field",
    "parse_request", "read_ack", "read_request", "reload_config", "send_request", "write_request",
]
