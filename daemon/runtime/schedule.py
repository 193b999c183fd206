"""The daily training window: ``[daemon] window = "HH:MM-HH:MM"`` (may wrap past midnight).

Holds ``Window``, ``parse_window`` and the three questions the daemon and ``status`` ask:
am I inside it (``inside``), when does it close (``window_end``), when does it open next
(``next_start``). The start is inclusive, the end exclusive; an empty string means "any
time" and is represented by ``None`` everywhere.

Times are wall-clock times of day: the functions work on naive local datetimes (or aware
ones, whose own tzinfo is kept) by plain date arithmetic, so "22:00" means 22:00 on the
clock on every day, DST changes included. On the spring-forward day a result can name a
local time that does not exist (e.g. 02:30 in a 02:00-03:00 window); ``.timestamp()``
maps it to a real instant.

No MLX import here: ``status`` imports this module and must be fast.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

# The same grammar daemon.config accepts for daemon.window: 24-hour, two digits each.
_WINDOW_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")
_ONE_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Window:
    """A daily window from ``start`` (inclusive) to ``end`` (exclusive); it wraps past
    midnight when end < start (22:00-07:00)."""

    start: dt.time
    end: dt.time

    @property
    def wraps(self) -> bool:
        return self.end < self.start

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


def parse_window(text: str) -> Window | None:
    """Given the config's window text, return the Window, or None for "" (any time);
    raise ValueError naming the text and the expected form when it is malformed or its
    start equals its end."""
    if text == "":
        return None
    match = _WINDOW_RE.match(text)
    if not match:
        raise ValueError(f"window {text!r} is not \"HH:MM-HH:MM\" on a 24-hour clock "
                         "(e.g. \"22:00-07:00\"); use \"\" for any time")
    sh, sm, eh, em = (int(g) for g in match.groups())
    window = Window(dt.time(sh, sm), dt.time(eh, em))
    if window.start == window.end:
        raise ValueError(f"window {text!r} starts and ends at the same time; use \"\" for any time")
    return window


def inside(window: Window | None, now: dt.datetime) -> bool:
    """Given a window (None = any time) and the local time, return whether training may
    run now (start inclusive, end exclusive)."""
    if window is None:
        return True
    t = now.time()
    if window.wraps:
        return t >= window.start or t < window.end
    return window.start <= t < window.end


def window_end(window: Window | None, now: dt.datetime) -> dt.datetime | None:
    """Given a window and the local time, return when the current window closes, or the
    next one when outside it; None for no window (it never closes).

    That is the first occurrence of the end time strictly after ``now``: the end is
    exclusive, so at exactly the end time the window is closed and the next one counts.
    """
    if window is None:
        return None
    return _next_occurrence(window.end, now)


def next_start(window: Window | None, now: dt.datetime) -> dt.datetime | None:
    """Given a window and the local time, return the next moment strictly after ``now``
    at which the window opens; None for no window (always open).

    Outside the window that is when training may resume; inside it, it is the following
    day's opening (check ``inside`` first for an ETA).
    """
    if window is None:
        return None
    return _next_occurrence(window.start, now)


def _next_occurrence(at: dt.time, now: dt.datetime) -> dt.datetime:
    """Given a time of day and a datetime, return the first datetime after ``now`` whose
    clock reads ``at`` (same tzinfo as ``now``)."""
    candidate = dt.datetime.combine(now.date(), at, tzinfo=now.tzinfo)
    return candidate if candidate > now else candidate + _ONE_DAY
