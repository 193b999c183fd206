"""Signals: SIGTERM/SIGINT/SIGQUIT ask for a graceful stop, SIGHUP for a config reload.

Handlers only set events; the training loop acts on them at the next step boundary (or
between two micro-batches, abandoning the unfinished step), so a stop always ends with a
checkpoint at an optimizer-step boundary. A second SIGINT (Ctrl-C twice at a terminal)
stops at once with KeyboardInterrupt.

Work that is not training and may take minutes (a validation pass, the final eval) runs
inside `Flags.interruptible()`: there a stop signal, or a stop/pause request from the
control file, raises `Interrupted` at once, so launchd's and systemd's 60 s stop timeout
is never spent waiting for an evaluation; the caller saves without it and says so.
"""

from __future__ import annotations

import _thread
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

# The graceful-stop signals: launchd and systemd send SIGTERM, a terminal SIGINT (Ctrl-C)
# or SIGQUIT (Ctrl-\\); each ends with a checkpoint, never a lost segment.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
# Raised in the main thread (simulated, nothing is sent) when a control request asks to
# stop or pause during an interruptible section.
_WAKE_SIGNAL = signal.SIGUSR1


_LATE_STOPS_IGNORED = False
_EARLY: dict = {}  # a stop signal that came before the loop's handlers: {"name", "at"}


def catch_early_stops() -> None:
    """First thing a `run` process does: a stop signal arriving while it imports, takes
    the lock and loads is kept (not a death by signal, nor a traceback) and honoured as
    soon as `install` takes over: the daemon then exits 0 without training."""
    def early(signum, _frame):
        _EARLY.setdefault("name", signal.Signals(signum).name)
        _EARLY.setdefault("at", time.monotonic())

    for sig in STOP_SIGNALS:
        signal.signal(sig, early)


def early_stop() -> str | None:
    """The stop signal that arrived before the daemon's handlers, if any."""
    return _EARLY.get("name")


def ignore_late_stops() -> None:
    """For a process that ends when training ends (the `run` command): once training has
    stopped and the handlers are removed, a late SIGTERM/SIGINT/SIGQUIT is ignored instead
    of turning a clean exit 0 into a death by signal or a 130 while it writes its end."""
    global _LATE_STOPS_IGNORED
    _LATE_STOPS_IGNORED = True


class Interrupted(BaseException):
    """An interruptible section (a validation pass, the final eval, GRPO's rollouts) was
    cut short by a stop signal or a stop/pause request; the caller goes on without its
    result. A BaseException, like KeyboardInterrupt: library code that catches every
    Exception (math-verify's parser does) must not swallow it."""


@dataclass
class Flags:
    """Requests raised by signals, the control file and the file watcher."""

    stop: threading.Event = field(default_factory=threading.Event)
    reload: threading.Event = field(default_factory=threading.Event)
    control: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)  # interrupts in-process waits
    stop_reason: str = ""
    signal_at: float | None = None  # monotonic time of the stop signal, to measure signal-to-exit
    in_section: bool = False  # inside interruptible(): a stop raises Interrupted there
    halt_requested: str | None = None  # a stop/pause request not yet applied at a boundary
    interrupted_by: str | None = None  # what cut the last section short

    def request_stop(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
        self.stop.set()
        self.wake.set()

    def request_reload(self) -> None:
        self.reload.set()
        self.wake.set()

    def request_control(self, command: str | None = None) -> None:
        """A control request arrived (watchdog's thread). A stop or pause cuts an
        interruptible section short: the request is applied at the boundary after it."""
        self.control.set()
        self.wake.set()
        if command in ("stop", "pause"):
            self.halt_requested = command
            if self.in_section:
                self.interrupted_by = f"`{command}` request"
                _thread.interrupt_main(_WAKE_SIGNAL)

    @contextmanager
    def interruptible(self):
        """Run the body so that a stop (signal, or a stop/pause request) raises
        Interrupted inside it; raise Interrupted at once when a stop is already asked."""
        if self.stop.is_set() or self.halt_requested:
            self.interrupted_by = self.stop_reason if self.stop.is_set() else f"`{self.halt_requested}` request"
            raise Interrupted(self.interrupted_by)
        self.in_section = True
        try:
            yield
        finally:
            self.in_section = False


def install(flags: Flags, on_signal=None) -> callable:
    """Given the flags, install the handlers and return a function restoring the old ones.
    `on_signal(name)` is called from the handler (the loop logs `signal.received`)."""
    handled = STOP_SIGNALS + (signal.SIGHUP, _WAKE_SIGNAL)
    previous = {sig: signal.getsignal(sig) for sig in handled}

    def stop(signum, _frame):
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and flags.stop.is_set() and flags.stop_reason == "signal SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait
        if flags.signal_at is None:
            flags.signal_at = time.monotonic()
        flags.request_stop(f"signal {name}")
        if on_signal:
            on_signal(name)
        if flags.in_section:
            flags.in_section = False  # once: the caller's own clean-up must not be cut again
            flags.interrupted_by = f"signal {name}"
            raise Interrupted(flags.interrupted_by)

    def wake(_signum, _frame):
        if flags.in_section:
            flags.in_section = False
            raise Interrupted(flags.interrupted_by or "control request")

    def reload(signum, _frame):
        flags.request_reload()
        if on_signal:
            on_signal("SIGHUP")

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    signal.signal(signal.SIGHUP, reload)
    signal.signal(_WAKE_SIGNAL, wake)
    if _EARLY:  # a stop that came while the process started: honour it now
        flags.signal_at = _EARLY["at"]
        flags.request_stop(f"signal {_EARLY['name']}")
        if on_signal:
            on_signal(_EARLY["name"])
        _EARLY.clear()

    def restore() -> None:
        for sig, handler in previous.items():
            late = _LATE_STOPS_IGNORED and sig in STOP_SIGNALS
            signal.signal(sig, signal.SIG_IGN if late else handler)

    return restore
