"""Times and durations as people read them: local wall-clock time and "2 h 14 min".

The one home for the human forms `status`, `logs`, `checkpoints list` and the progress
bar print; `--json` output keeps raw numbers (Unix seconds, UTC ISO) for scripts.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any


def duration(seconds: float | None) -> str:
    """Given seconds, return ``45 s``, ``14 min``, ``2 h 14 min`` or ``3 days 4 h``."""
    if seconds is None:
        return "?"
    total = int(round(max(0.0, float(seconds))))
    if total < 60:
        return f"{total} s"
    minutes, _ = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} days {hours} h" if hours else f"{days} days"


def local_time(t: float | None, reference: float | None = None) -> str:
    """Given Unix seconds, return local ``HH:MM`` when on the reference's day (``Tue
    17:45`` within a week of it, ``2026-12-01 17:45`` otherwise); no reference: the date too."""
    if t is None:
        return "?"
    moment = datetime.fromtimestamp(float(t))
    if reference is not None:
        ref = datetime.fromtimestamp(float(reference))
        if ref.date() == moment.date():
            return moment.strftime("%H:%M")
        if abs((ref - moment).days) < 6:
            return moment.strftime("%a %H:%M")
    return moment.strftime("%Y-%m-%d %H:%M")


def ago(t: float | None, now: float) -> str:
    """Given Unix seconds and now, return ``17:45 (2 h 14 min ago)``."""
    if t is None:
        return "?"
    delta = now - float(t)
    when = local_time(t, now)
    return f"{when} ({duration(delta)} ago)" if delta >= 0 else f"{when} (in {duration(-delta)})"


def local_clock(ts: Any) -> str:
    """Given a log line's ``ts`` (UTC ISO, ``Z`` or offset), return local ``HH:MM:SS``
    (the text itself when it is not ISO; ``--:--:--`` when there is none)."""
    if isinstance(ts, str) and ts:
        text = ts[:-1] + "+00:00" if ts.endswith(("Z", "z")) else ts
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return ts
        if moment.tzinfo is not None:
            moment = moment.astimezone()
        return moment.strftime("%H:%M:%S")
    return "--:--:--"
