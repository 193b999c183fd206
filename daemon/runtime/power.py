"""Power: pause on battery, and keep the machine awake while training.

`read_power` and `PowerWatch` turn the battery sensor into `power.on_battery` /
`power.plugged_in` events and a pause decision. `SleepInhibitor` holds off idle sleep
with a child process that can never outlive the daemon, even when the daemon is
SIGKILLed: on macOS `caffeinate -w <pid>` exits by itself when <pid> is gone; on Linux
`systemd-inhibit` is started with the parent-death signal set, so the kernel sends it
SIGTERM when we die (and systemd-inhibit passes that on to its own child).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable

import psutil

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
STOP_WAIT_S = 5.0
STARTUP_CHECK_S = 0.3  # how long start() watches for an inhibitor that fails at once
LINUX_INHIBIT_ARGS = ["--what=sleep:idle", "--who=mathlora-daemon", "--why=LoRA training",
                      "--mode=block", "sleep", "infinity"]

_DEFAULT = object()


@dataclass
class PowerState:
    """Whether the machine runs on battery and its charge; None when unknown (a desktop,
    Linux without a battery, a sensor that cannot be read)."""

    on_battery: bool | None
    percent: float | None


def read_power(sensors_battery: Callable[[], Any] | None | object = _DEFAULT) -> PowerState:
    """Given a psutil-like `sensors_battery` function (default psutil's, None = none
    available), return the PowerState; unknown fields are None, never an error."""
    if sensors_battery is _DEFAULT:
        # Resolved at call time: some psutil builds have no sensors_battery at all.
        sensors_battery = getattr(psutil, "sensors_battery", None)
    if sensors_battery is None:
        return PowerState(on_battery=None, percent=None)
    try:
        battery = sensors_battery()
    except (AttributeError, NotImplementedError, OSError, RuntimeError):
        return PowerState(on_battery=None, percent=None)
    if battery is None:
        return PowerState(on_battery=None, percent=None)
    plugged = getattr(battery, "power_plugged", None)
    percent = getattr(battery, "percent", None)
    return PowerState(on_battery=None if plugged is None else not plugged,
                      percent=None if percent is None else float(percent))


class PowerWatch:
    """Tracks battery transitions so each one is logged once.

    An unknown reading (None) changes nothing: a flaky sensor must not produce a
    plugged-in/on-battery pair.
    """

    def __init__(self) -> None:
        self.on_battery: bool | None = None

    def check(self, state: PowerState) -> list[tuple[str, dict]]:
        """Given the latest PowerState, return the events for a transition ([] when
        none). Starting on battery counts as a transition; starting on AC does not."""
        if state.on_battery is None or state.on_battery == self.on_battery:
            return []
        previous, self.on_battery = self.on_battery, state.on_battery
        if state.on_battery:
            return [("power.on_battery", {"percent": state.percent})]
        if previous is None:
            return []
        return [("power.plugged_in", {"percent": state.percent})]

    @staticmethod
    def should_pause(pause_on_battery: bool, state: PowerState) -> bool:
        """Given the config switch and a PowerState, return True when training should
        wait: only on a known battery state, never on an unknown one."""
        return bool(pause_on_battery) and state.on_battery is True


def _death_signal_preexec() -> Callable[[], None]:
    """Return a preexec_fn that makes the child receive SIGTERM when its parent dies.

    libc is looked up here, in the parent, so the forked child only makes one plain
    C call before exec (loading libraries after fork in a threaded parent can
    deadlock). The parent-death signal belongs to the *thread* that forks: call
    SleepInhibitor.start() from the main thread, not a short-lived worker.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        # The parent may have died between fork and prctl; then no signal would come.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class SleepInhibitor:
    """Keeps the machine from idle-sleeping while the daemon trains.

    Dependencies (`popen`, `which`, `platform`) are injectable for tests. `start()`
    either launches the inhibitor or records why it did not; it never raises for a
    missing tool, since training works without it.
    """

    def __init__(self, popen: Callable[..., Any] = subprocess.Popen,
                 which: Callable[[str], str | None] = shutil.which,
                 platform: str | None = None, startup_check_s: float = STARTUP_CHECK_S) -> None:
        self.popen = popen
        self.which = which
        self.platform = sys.platform if platform is None else platform
        self.startup_check_s = startup_check_s
        self.child: Any = None
        self.command: list[str] | None = None
        self.reason: str | None = None
        self.exit_code: int | None = None

    def _command(self, pid: int) -> tuple[list[str] | None, dict, str | None]:
        """Given the pid to outlive, return (argv, Popen kwargs, None) or
        (None, {}, why not)."""
        if self.platform == "darwin":
            exe = self.which("caffeinate")
            if exe is None:
                return None, {}, "caffeinate not found on PATH"
            return [exe, "-i", "-w", str(pid)], {}, None
        if self.platform.startswith("linux"):
            exe = self.which("systemd-inhibit")
            if exe is None:
                return None, {}, "systemd-inhibit not found on PATH (no systemd): sleep is not inhibited"
            kwargs = {"start_new_session": False, "preexec_fn": _death_signal_preexec()}
            return [exe, *LINUX_INHIBIT_ARGS], kwargs, None
        return None, {}, f"no sleep inhibitor for platform {self.platform}"

    def start(self, pid: int) -> None:
        """Given the daemon's pid, launch the inhibitor (no-op while one runs); on a
        missing tool or an inhibitor that exits at once, record the reason instead.

        On Linux the inhibitor is tied to *this* process (parent-death signal), which
        is the daemon itself; `pid` is then only recorded.
        """
        if self.active:
            return
        self.child, self.exit_code = None, None
        argv, kwargs, reason = self._command(pid)
        self.command, self.reason = argv, reason
        if argv is None:
            return
        try:
            child = self.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, close_fds=True, **kwargs)
        except OSError as exc:
            self.reason = f"could not start {argv[0]}: {exc}"
            return
        self.child = child
        if self.startup_check_s > 0:
            # e.g. systemd-inhibit present but no system bus (containers): it exits
            # with an error at once, and the log must not claim sleep is inhibited.
            try:
                code = child.wait(timeout=self.startup_check_s)
            except subprocess.TimeoutExpired:
                return
            self.child, self.exit_code = None, code
            self.reason = f"{os.path.basename(argv[0])} exited at once with code {code}"

    @property
    def active(self) -> bool:
        """Whether an inhibitor child is running now."""
        if self.child is None:
            return False
        code = self.child.poll()
        if code is None:
            return True
        self.exit_code = code
        return False

    @property
    def child_pid(self) -> int | None:
        return None if self.child is None else self.child.pid

    def stop(self) -> None:
        """Terminate the inhibitor (SIGTERM, up to 5 s, then SIGKILL) and reap it;
        safe to call any number of times."""
        child, self.child = self.child, None
        if child is None:
            return
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.exit_code = child.returncode
        self.reason = "stopped"

    def describe(self) -> dict:
        """Return the inhibitor's state for the log: command and pid when running,
        else the reason it is not."""
        out: dict = {"active": self.active, "command": self.command}
        if out["active"]:
            out["pid"] = self.child.pid
        else:
            out["reason"] = self.reason or (f"exited with code {self.exit_code}"
                                            if self.exit_code is not None else "not started")
        return out
