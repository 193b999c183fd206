"""Power: battery readings, transition events, pausing, and the sleep inhibitor
(including a real check that the Linux inhibitor dies with a SIGKILLed daemon)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from mathlora_daemon.runtime.power import LINUX_INHIBIT_ARGS, PowerState, PowerWatch, SleepInhibitor, read_power

from runs import ROOT, wait_for

DEADLINE_S = 10.0


def battery(percent, plugged):
    return lambda: SimpleNamespace(percent=percent, secsleft=-1, power_plugged=plugged)


def test_read_power_from_fake_sensor():
    assert read_power(battery(80, True)) == PowerState(on_battery=False, percent=80.0)
    assert read_power(battery(42.5, False)) == PowerState(on_battery=True, percent=42.5)
    assert read_power(battery(42.5, None)) == PowerState(on_battery=None, percent=42.5)
    assert read_power(lambda: None) == PowerState(None, None)  # a desktop: no battery
    assert read_power(None) == PowerState(None, None)  # psutil without sensors_battery

    def broken():
        raise AttributeError("no sensors here")

    assert read_power(broken) == PowerState(None, None)


def test_read_power_real_does_not_raise():
    state = read_power()
    assert state.on_battery in (True, False, None)


def test_read_power_when_psutil_lacks_sensors_battery(monkeypatch):
    monkeypatch.delattr(psutil, "sensors_battery", raising=False)
    assert read_power() == PowerState(None, None)


def test_transitions_emit_once():
    watch = PowerWatch()
    assert watch.check(PowerState(False, 90.0)) == []  # starting on AC is not news
    assert watch.check(PowerState(False, 91.0)) == []
    assert watch.check(PowerState(True, 89.0)) == [("power.on_battery", {"percent": 89.0})]
    assert watch.check(PowerState(True, 88.0)) == []
    assert watch.check(PowerState(None, None)) == []  # an unreadable sensor changes nothing
    assert watch.check(PowerState(False, 88.0)) == [("power.plugged_in", {"percent": 88.0})]
    assert watch.check(PowerState(False, 95.0)) == []


def test_starting_on_battery_is_reported():
    assert PowerWatch().check(PowerState(True, 50.0)) == [("power.on_battery", {"percent": 50.0})]


def test_should_pause():
    assert PowerWatch.should_pause(True, PowerState(True, 50.0))
    assert not PowerWatch.should_pause(False, PowerState(True, 50.0))
    assert not PowerWatch.should_pause(True, PowerState(False, 50.0))
    assert not PowerWatch.should_pause(True, PowerState(None, None))


class FakeChild:
    def __init__(self, argv) -> None:
        self.argv = argv
        self.pid = 99999
        self.returncode = None
        self.signals: list[str] = []

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.argv, timeout)
        return self.returncode

    def terminate(self):
        self.signals.append("TERM")
        self.returncode = -15


class FakePopen:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], dict]] = []
        self.children: list[FakeChild] = []

    def __call__(self, argv, **kwargs):
        self.calls.append((argv, kwargs))
        self.children.append(FakeChild(argv))
        return self.children[-1]


def test_darwin_builds_caffeinate_command():
    popen = FakePopen()
    which = {"caffeinate": "/usr/bin/caffeinate"}.get
    inh = SleepInhibitor(popen=popen, which=which, platform="darwin")
    inh.start(4242)
    assert [argv for argv, _ in popen.calls] == [["/usr/bin/caffeinate", "-i", "-w", "4242"]]
    assert "preexec_fn" not in popen.calls[0][1]  # caffeinate -w needs no help to die with us
    assert inh.active and inh.describe() == {"active": True, "command": popen.calls[0][0], "pid": 99999}
    inh.start(4242)  # already running: no second child
    assert len(popen.calls) == 1
    inh.stop()
    inh.stop()  # idempotent
    assert popen.children[0].signals == ["TERM"]
    assert not inh.active and inh.describe()["reason"] == "stopped"


def test_linux_without_systemd_inhibit_does_nothing():
    popen = FakePopen()
    inh = SleepInhibitor(popen=popen, which=lambda name: None, platform="linux")
    inh.start(os.getpid())
    assert popen.calls == [] and not inh.active
    described = inh.describe()
    assert described["active"] is False and "systemd-inhibit not found" in described["reason"]
    inh.stop()


def test_unsupported_platform_reports_reason():
    popen = FakePopen()
    inh = SleepInhibitor(popen=popen, which=lambda n: "/x/" + n, platform="win32")
    inh.start(1)
    assert popen.calls == [] and "win32" in inh.describe()["reason"]


def test_linux_command_and_death_signal_wiring():
    popen = FakePopen()
    inh = SleepInhibitor(popen=popen, which={"systemd-inhibit": "/usr/bin/systemd-inhibit"}.get,
                         platform="linux")
    inh.start(os.getpid())
    argv, kwargs = popen.calls[0]
    assert argv == ["/usr/bin/systemd-inhibit", *LINUX_INHIBIT_ARGS]
    assert "--what=sleep:idle" in argv and "--mode=block" in argv
    assert kwargs["start_new_session"] is False and callable(kwargs["preexec_fn"])
    inh.stop()


def fake_inhibitor_script(tmp_path: Path) -> Path:
    script = tmp_path / "systemd-inhibit"
    script.write_text("#!/bin/sh\nexec sleep 1000\n")
    script.chmod(0o700)
    return script


def gone(pid: int, create_time: float) -> bool:
    """Whether `pid` no longer runs; a zombie nobody has reaped yet counts as gone, and so
    does a reused pid."""
    try:
        proc = psutil.Process(pid)
        return proc.create_time() != create_time or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, create_time: float) -> bool:
    return wait_for(lambda: gone(pid, create_time), what=f"pid {pid} to end", timeout_s=DEADLINE_S)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_linux_inhibitor_dies_with_sigkilled_daemon(tmp_path):
    script = fake_inhibitor_script(tmp_path)
    code = textwrap.dedent(f"""
        import os, sys
        from mathlora_daemon.runtime.power import SleepInhibitor
        inh = SleepInhibitor(which=lambda name: {str(script)!r}, platform="linux")
        inh.start(os.getpid())
        print(inh.child_pid, flush=True)
        sys.stdin.read()  # block until the test kills us
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    daemon = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              cwd=ROOT, env=env, text=True)
    child_pid = None
    try:
        line = daemon.stdout.readline()
        assert line.strip().isdigit(), f"intermediate process printed {line!r}"
        child_pid = int(line)
        child = psutil.Process(child_pid)
        assert child.ppid() == daemon.pid and "sleep" in child.name()
        created = child.create_time()

        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=DEADLINE_S)
        assert wait_gone(child_pid, created), "the inhibitor outlived the SIGKILLed daemon"
    finally:
        daemon.kill()
        daemon.wait()
        if child_pid is not None and psutil.pid_exists(child_pid):
            try:
                os.kill(child_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses a Linux inhibitor stand-in")
def test_stop_terminates_a_real_child(tmp_path):
    script = fake_inhibitor_script(tmp_path)
    inh = SleepInhibitor(which=lambda name: str(script), platform="linux")
    inh.start(os.getpid())
    try:
        assert inh.active
        pid = inh.child_pid
        described = inh.describe()
        assert described["pid"] == pid and described["command"][0] == str(script)
        created = psutil.Process(pid).create_time()
        inh.stop()
        assert not inh.active and inh.child_pid is None
        assert wait_gone(pid, created)
        inh.stop()
    finally:
        if inh.child is not None:
            inh.child.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses a Linux inhibitor stand-in")
def test_inhibitor_that_fails_at_once_is_reported(tmp_path):
    script = tmp_path / "systemd-inhibit"
    script.write_text("#!/bin/sh\necho 'Failed to connect to bus' >&2\nexit 1\n")
    script.chmod(0o700)
    inh = SleepInhibitor(which=lambda name: str(script), platform="linux", startup_check_s=DEADLINE_S)
    inh.start(os.getpid())
    assert not inh.active
    assert "exited at once with code 1" in inh.describe()["reason"]
