"""Signals: SIGTERM/SIGINT ask for a graceful stop, SIGHUP asks for a config reload.

Handlers only set events; the training loop acts on them at the next step boundary (or
between two micro-batches, abandoning the unfinished step), so a stop always ends with a
checkpoint at an optimizer-step boundary. A second SIGINT (Ctrl-C twice at a terminal)
stops at once with KeyboardInterrupt.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Flags:
    """Requests raised by signals, the control file and the file watcher."""

    stop: threading.Event = field(default_factory=threading.Event)
    reload: threading.Event = field(default_factory=threading.Event)
    control: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)  # interrupts in-process waits
    stop_reason: str = ""
    signal_at: float | None = None  # monotonic time of the stop signal, to measure signal-to-exit

    def request_stop(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
        self.stop.set()
        self.wake.set()

    def request_reload(self) -> None:
        self.reload.set()
        self.wake.set()

    def request_control(self) -> None:
        self.control.set()
        self.wake.set()


def install(flags: Flags, on_signal=None) -> callable:
    """Given the flags, install the handlers and return a function restoring the old ones.
    `on_signal(name)` is called from the handler (the loop logs `signal.received`)."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def stop(signum, _frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and flags.stop.is_set() and flags.stop_reason == "signal SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait
        if flags.signal_at is None:
            flags.signal_at = time.monotonic()
        flags.request_stop(f"signal {name}")
        if on_signal:
            on_signal(name)

    def reload(signum, _frame):
        flags.request_reload()
        if on_signal:
            on_signal("SIGHUP")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
