"""The daemon's JSON log, read back: filtered, readable, followed (the data of the ``logs``
command, whose front-end is cli/watch.py).

The log is ``<run>/logs/daemon.jsonl`` (one JSON object per line with ``ts``, ``level``,
``event``, ``run``), rotated by size into ``daemon.jsonl.1`` (newest) ... ``.5``
(oldest). ``logs`` prints the last N matching lines across all of them, oldest first,
either as ``HH:MM:SS level event key=value ...`` (local time) or raw (``--json``), and
with ``follow`` keeps printing new lines like ``tail -F``: it survives rotation and waits
for a log that does not exist yet.

Filters: ``level`` is a minimum (debug < info < warning < error < critical); ``event``
is an exact name or a dotted prefix ("checkpoint" matches "checkpoint.saved", "train"
matches "train.step" but not "training"). A line that is not a JSON object cannot match
a filter, so it is shown (raw) only when no filter is given; when a filter leaves such
damaged lines out, one note on stderr per file says how many ("skipped 2 damaged
line(s) in .../daemon.jsonl"), so a torn line (a full disk, a power loss) is never
dropped silently.

No MLX, numpy or structlog import here: reading the log must not load the trainer.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.humanize import local_clock

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_LEVEL_ALIASES = {"warn": "warning", "fatal": "critical", "exception": "error"}
_HIDDEN_KEYS = ("ts", "level", "event", "run")
_BLOCK = 64 * 1024


@dataclass(frozen=True)
class LineFilter:
    """Which lines to show: a minimum level rank (None: any) and an event name or
    dotted prefix (None: any)."""

    min_level: int | None = None
    event: str | None = None

    @property
    def active(self) -> bool:
        return self.min_level is not None or self.event is not None

    def matches(self, record: dict | None) -> bool:
        """Given a parsed line (None when it is not a JSON object), return whether to show it."""
        if record is None:
            return not self.active
        if self.min_level is not None:
            rank = level_rank(record.get("level"))
            if rank is None or rank < self.min_level:
                return False
        if self.event is not None:
            event = record.get("event")
            if not isinstance(event, str) or not event_matches(event, self.event):
                return False
        return True


def level_rank(level: Any) -> int | None:
    """Given a level name (any case; warn/fatal/exception accepted), return its rank, or
    None when it is not a level."""
    if not isinstance(level, str):
        return None
    name = level.strip().lower()
    return LEVELS.get(_LEVEL_ALIASES.get(name, name))


def event_matches(event: str, wanted: str) -> bool:
    """Given an event name and the wanted name or prefix, return whether it matches at
    a dot boundary ("train" matches "train.step", not "training")."""
    if wanted.endswith("."):
        return event.startswith(wanted)
    return event == wanted or event.startswith(wanted + ".")


def parse_line(text: str) -> dict | None:
    """Given one log line, return its JSON object, or None when it is not one."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def damaged_note(path: Path | str, count: int) -> str:
    """Given a log file and how many of its lines were not JSON objects and left out,
    return the note that says so (`logs`'s; `plot` counts such lines in Curve.bad_lines)."""
    return (f"skipped {count} damaged line(s) in {path} (not JSON objects: a write cut short by a full "
            "disk or a power loss; `logs` without filters shows them raw)")


def render_line(text: str, record: dict | None) -> str:
    """Given a raw line and its parsed object (None: shown raw), return the human form
    ``HH:MM:SS level event key=value ...`` with keys sorted and ts/level/event/run left out."""
    if record is None:
        return text
    level, event = record.get("level"), record.get("event")
    parts = [local_clock(record.get("ts")), f"{level if isinstance(level, str) else '-':<7}",
             "-" if event is None else str(event)]
    parts += [f"{key}={_value(record[key])}" for key in sorted(record, key=str) if key not in _HIDDEN_KEYS]
    return " ".join(parts)


def log_files(run: RunDir) -> tuple[Path, list[Path]]:
    """Given a run directory, return (the current log path, the rotated files that exist,
    oldest first: ``daemon.jsonl.5`` ... ``daemon.jsonl.1``)."""
    current = run.log_file
    rotated = []
    try:
        for entry in os.scandir(current.parent):
            suffix = entry.name[len(current.name) + 1:]
            if entry.name.startswith(current.name + ".") and suffix.isdigit() and entry.is_file():
                rotated.append((int(suffix), Path(entry.path)))
    except OSError:
        pass
    return current, [path for _, path in sorted(rotated, reverse=True)]


def select_lines(batch: list[bytes], line_filter: LineFilter) -> tuple[list[tuple[str, dict | None]], int]:
    """Given raw log lines and a filter, return (the (text, parsed object) of each
    non-blank line that matches, in order; how many damaged lines, not JSON objects, the
    filter left out)."""
    shown, skipped = [], 0
    for raw in batch:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        if not text.strip():
            continue
        record = parse_line(text)
        if line_filter.matches(record):
            shown.append((text, record))
        elif record is None:
            skipped += 1
    return shown, skipped


class LogTail:
    """A run's log as ``logs`` reads it: the last lines that match a filter, then (to
    follow it) the complete lines appended since, across rotation and truncation, like
    ``tail -F``. ``open`` before reading, ``close`` when done."""

    def __init__(self, run: RunDir):
        self.run = run
        self.path = run.log_file  # the current log: where the follower reads
        self._follower = _Follower(self.path)

    def open(self) -> None:
        """Open the current log if it exists, positioned after its last complete line."""
        self._follower.open_current()

    def last(self, want: int, line_filter: LineFilter, skipped: dict[Path, int] | None = None) -> list[bytes] | None:
        """The last ``want`` matching lines, oldest first, across the rotated files; None
        when there is no log at all. Damaged lines left out are counted per file into
        ``skipped``."""
        return _last_matching(self.run, self._follower, want, line_filter, skipped)

    def poll(self) -> list[bytes]:
        """The complete lines appended since the last read, following rotation."""
        return self._follower.poll()

    def close(self) -> None:
        self._follower.close()


# --------------------------------------------------------------------------- reading


def _last_matching(run: RunDir, follower: _Follower, want: int, line_filter: LineFilter,
                   skipped: dict[Path, int] | None = None) -> list[bytes] | None:
    """Given the follower (its open current file, positioned after the last complete
    line), return the last ``want`` lines that match, oldest first; None when there is no
    log file at all. Damaged lines (not JSON objects) that the filter left out among
    those read are counted per file into ``skipped``."""
    _, rotated = log_files(run)
    # A rotation between opening the current file and listing makes it also appear as
    # daemon.jsonl.1: skip rotated files that are the very file we hold open.
    rotated = [p for p in rotated if not follower.is_same_file(p)]
    if follower.fh is None and not rotated:
        return None
    found: deque[bytes] = deque()
    sources: list[tuple[BinaryIO | None, Path, int | None]] = []
    if follower.fh is not None:
        sources.append((follower.fh, follower.path, follower.pos))
    sources += [(None, path, None) for path in reversed(rotated)]  # newest first
    skipped = {} if skipped is None else skipped
    for fh, path, end in sources:
        if len(found) >= want:
            break
        own = None
        try:
            if fh is None:
                own = fh = open(path, "rb")
            for raw in _reverse_lines(fh, end):
                text = raw.decode("utf-8", errors="replace").rstrip("\r")
                if not text.strip():
                    continue
                record = parse_line(text)
                if line_filter.matches(record):
                    found.appendleft(raw)
                    if len(found) >= want:
                        break
                elif record is None:
                    skipped[path] = skipped.get(path, 0) + 1
        except OSError:  # a rotated file removed while we read: show what we have
            continue
        finally:
            if own is not None:
                own.close()
    return list(found)


def _reverse_lines(fh: BinaryIO, end: int | None) -> Iterator[bytes]:
    """Given an open binary file and where to stop (None: its size), yield its lines
    from the last to the first without their newlines, reading backwards in blocks
    (the newest lines of a 10 MB log cost one block)."""
    pos = os.fstat(fh.fileno()).st_size if end is None else end
    carry = b""
    first = True
    while pos > 0:
        size = min(_BLOCK, pos)
        pos -= size
        fh.seek(pos)
        chunk = fh.read(size) + carry
        pieces = chunk.split(b"\n")
        carry = pieces[0]
        tail = pieces[1:]
        if first and tail and tail[-1] == b"":
            tail = tail[:-1]  # the file's final newline ends a line; it does not start one
        first = False
        yield from reversed(tail)
    if carry:
        yield carry


class _Follower:
    """``tail -F`` on one path: reads appended complete lines, drains the old file and
    reopens when it is rotated (another inode at the path) or truncated (shrank), and
    waits while the path does not exist."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fh: BinaryIO | None = None
        self.ino: tuple[int, int] | None = None
        self.pos = 0        # offset just after the last complete line handed out
        self.partial = b""  # bytes after that: a line still being written

    def open_current(self) -> None:
        """Open the path if it exists, positioned after its last complete line (the
        lines before are the tail's business)."""
        if not self._open():
            return
        size = os.fstat(self.fh.fileno()).st_size
        # Find the last newline, scanning back block by block for very long lines.
        start = size
        while start > 0:
            begin = max(0, start - _BLOCK)
            self.fh.seek(begin)
            idx = self.fh.read(start - begin).rfind(b"\n")
            if idx >= 0:
                self.pos = begin + idx + 1
                break
            start = begin
        else:
            self.pos = 0
        self.fh.seek(self.pos)

    def is_same_file(self, path: Path) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        return self.ino == (st.st_dev, st.st_ino)

    def poll(self) -> list[bytes]:
        """Return the complete lines appended since the last poll, following rotation."""
        if self.fh is None:
            if not self._open():
                return []
        lines = self._read_new()
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return lines  # rotated away, the new file not created yet: keep the old one
        except OSError:
            return lines
        if (st.st_dev, st.st_ino) != self.ino:
            # Rotated: the writer may have added lines to the old file between our read
            # and the rename; drain them, including an unterminated last line.
            lines += self._read_new()
            if self.partial:
                lines.append(self.partial)
            self.close()
            if self._open():
                lines += self._read_new()
        elif st.st_size < self.pos:
            # Truncated in place (copytruncate): start over from the beginning.
            self.fh.seek(0)
            self.pos, self.partial = 0, b""
            lines += self._read_new()
        return lines

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
        self.fh, self.ino, self.pos, self.partial = None, None, 0, b""

    def _open(self) -> bool:
        try:
            self.fh = open(self.path, "rb")
        except FileNotFoundError:
            return False
        except OSError:
            return False
        st = os.fstat(self.fh.fileno())
        self.ino = (st.st_dev, st.st_ino)
        self.pos, self.partial = 0, b""
        return True

    def _read_new(self) -> list[bytes]:
        self.fh.seek(self.pos + len(self.partial))
        data = self.fh.read()
        if not data:
            return []
        data = self.partial + data
        pieces = data.split(b"\n")
        self.partial = pieces.pop()
        self.pos += len(data) - len(self.partial)
        return pieces


# --------------------------------------------------------------------------- formatting


def _value(value: Any) -> str:
    """Given a field value, return it compactly: plain words bare, other strings quoted,
    floats to 6 significant digits, lists and dicts as compact JSON."""
    if isinstance(value, str):
        if value and all(c.isalnum() or c in "._-/:+@%" for c in value):
            return value
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True, default=str)
