"""Stand-ins injected into the real code by unit tests: a log that records events, a
heartbeat that keeps its fields in memory, and clocks that move only when told to."""

from __future__ import annotations

import threading


class RecordingLog:
    """A structlog-like logger that records (level, event, fields) for every call;
    `wait_for` blocks (with a deadline) until an event is logged by another thread."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []
        self.seen = threading.Condition()

    def _add(self, level: str, event: str, **fields) -> None:
        with self.seen:
            self.events.append((level, event, fields))
            self.seen.notify_all()

    def info(self, event, **fields):
        self._add("info", event, **fields)

    def warning(self, event, **fields):
        self._add("warning", event, **fields)

    def error(self, event, **fields):
        self._add("error", event, **fields)

    def debug(self, event, **fields):
        self._add("debug", event, **fields)

    def bind(self, **_fields) -> "RecordingLog":
        return self

    def names(self) -> list[str]:
        return [event for _, event, _ in self.events]

    def fields(self, event: str) -> dict:
        matches = [f for _, e, f in self.events if e == event]
        assert len(matches) == 1, f"expected one {event!r} event, got {self.names()}"
        return matches[0]

    def all(self, event: str) -> list[dict]:
        return [f for _, e, f in self.events if e == event]

    def wait_for(self, name: str, timeout_s: float = 30.0) -> None:
        with self.seen:
            assert self.seen.wait_for(lambda: name in self.names(), timeout=timeout_s), self.names()


class RecordingHeartbeat:
    """The heartbeat's interface, kept in memory."""

    def __init__(self):
        self.fields: dict = {}
        self.writes = 0

    def update(self, **fields):
        self.fields.update(fields)

    def write(self):
        self.writes += 1
        return dict(self.fields)

    def start(self, *args, **kwargs):
        pass

    def stop(self, *args, **kwargs):
        pass


class FakeClock:
    """Monotonic and wall clocks that only move when told to."""

    def __init__(self):
        self.mono = 1000.0
        self.wall = 1_700_000_000.0

    def awake(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def sleep_system(self, seconds: float) -> None:  # a closed lid: wall time moves, monotonic does not
        self.wall += seconds
