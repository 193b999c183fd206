"""Control: pause/resume/stop requests from the CLI, and watching files for changes.

The CLI writes `<run_dir>/state/control.json` atomically; the running daemon learns of it
through a `FileWatcher` (watchdog) and acts on each request id once. The same watcher
reports edits of the config file, which `reload_config` turns into applied safe changes
and rejected unsafe ones.

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
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from mathlora_checkpoints.fsio import atomic_write_text, ensure_private_dir
from mathlora_daemon.config import RELOADABLE, RELOADABLE_PREFIXES, Config, config_to_dict, is_reloadable, load_config
from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import RunDir

COMMANDS = ("pause", "resume", "stop")
REQUIRED_KEYS = {"command", "id"}
ALLOWED_KEYS = {"command", "id", "at", "pid"}
MAX_CONTROL_BYTES = 64 * 1024  # a real request is ~150 bytes; refuse to parse junk
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Fields that only steer the daemon (time, checkpoints, guards), never the training
# math: changing them mid-run keeps the exactness promise and the config fingerprint.
# Declared with each key in config.py.
SAFE_FIELDS = RELOADABLE
SAFE_PREFIXES = RELOADABLE_PREFIXES

WATCHED_EVENT_TYPES = {"created", "modified", "moved", "closed"}


def control_path(run_dir: Path) -> Path:
    """Given a run directory, return the path of its control file."""
    return RunDir(run_dir).control_file


def write_request(run_dir: Path, command: str) -> dict:
    """Given a run directory and a command, write a new request atomically (state dir
    0700, file 0600) and return it; raise InputError naming the command and the allowed
    ones when it is not known."""
    if command not in COMMANDS:
        raise InputError(f"unknown control command {command!r}; allowed: {', '.join(COMMANDS)}")
    request = {
        "command": command,
        "id": uuid.uuid4().hex,
        "at": datetime.now(timezone.utc).isoformat(),
        "pid": os.getpid(),
    }
    path = control_path(run_dir)
    ensure_private_dir(path.parent)
    atomic_write_text(path, json.dumps(request) + "\n")
    return request


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
    if "pid" in data and (isinstance(data["pid"], bool) or not isinstance(data["pid"], int)):
        return None, f"control request 'pid' must be an integer, got {data['pid']!r}"
    return data, None


def read_request(run_dir: Path) -> tuple[dict | None, str | None]:
    """Given a run directory, return (request, None) for a valid control request,
    (None, None) when there is no control file, or (None, reason) when the file is
    rejected (the daemon logs `control.rejected` and ignores it)."""
    path = control_path(run_dir)
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

    Call `prime()` before `start()` so a request left over from before the daemon
    started is recorded as seen and never acted upon.
    """

    def __init__(self, run_dir: Path, config_path: Path | None,
                 on_control: Callable[[], Any], on_config: Callable[[], Any],
                 observer_factory: Callable[[], Any] = Observer) -> None:
        self.run_dir = Path(run_dir)
        self.control_file = RunDir(self.run_dir).control_file.resolve()
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

    def prime(self) -> dict | None:
        """Record the current control request (valid or not) and config content as
        already seen, without delivering anything; return the current request."""
        request, reason = read_request(self.run_dir)
        with self._lock:
            if request is not None:
                self._last_id = request["id"]
            elif reason is not None:
                self._last_rejected = _content_hash(self.control_file)
            if self.config_file is not None:
                self._config_hash = _content_hash(self.config_file)
        return request

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
        request, reason = read_request(self.run_dir)
        with self._lock:
            if request is not None:
                if request["id"] == self._last_id:
                    return
                self._last_id = request["id"]
            elif reason is not None:
                digest = _content_hash(self.control_file)
                if digest == self._last_rejected:
                    return
                self._last_rejected = digest
            else:  # the file went away between the event and the read
                return
            self._pending.append((request, reason))
        self.on_control()

    def _config_changed(self) -> None:
        digest = _content_hash(self.config_file)
        with self._lock:
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

    def stop(self) -> None:
        """Stop watching and join the watchdog thread; safe to call twice."""
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


def reload_config(path: Path | None, overrides: list[str] | tuple[str, ...],
                  current: Config) -> tuple[Config, dict, list[str], str | None]:
    """Given the config file, the run's `--set` overrides and the config in use, load
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
    "COMMANDS", "SAFE_FIELDS", "SAFE_PREFIXES", "FileWatcher", "control_path", "is_safe_field",
    "parse_request", "read_request", "reload_config", "write_request",
]
