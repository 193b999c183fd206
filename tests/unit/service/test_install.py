"""`install` / `uninstall` / the `status` service line, on macOS (launchd) and Linux
(systemd) paths, through the real code with a temporary home directory and a recording
command runner (nothing here loads anything into this machine's launchd or systemd).

Also: the generated plist round-trips through plistlib and passes a key whitelist and
type checks; the unit files parse with configparser; `--print` writes nothing; the CLI
end to end in a subprocess; and the real daemon's SIGTERM-to-exit time against the
ExitTimeOut / TimeoutStopSec the installer writes.
"""

from __future__ import annotations

import configparser
import io
import json
import os
import plistlib
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from mathlora_daemon.cli.service import install_main, uninstall_main
from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.status import read_status, render_status
from mathlora_daemon.service.install import (
    EXIT_TIMEOUT_S,
    PLIST_KEYS,
    Host,
    example_plist,
    install,
    launchd_plist,
    parse_at,
    plan_install,
    run_name,
    service_for,
    service_status,
    subprocess_runner,
    systemd_quote,
    uninstall,
)

from runs import ROOT
from runs import cli as run_cli

SECRET = "hf_THIS_MUST_NEVER_BE_WRITTEN_0123456789"
REQUIRED_PLIST_KEYS = set(PLIST_KEYS) - {"StartCalendarInterval"}


class FakeLaunchctl:
    """A recording runner that behaves like launchctl for one GUI domain: bootstrap of a
    loaded label fails (as the real one does, "5: Input/output error"), bootout of an
    unloaded one answers "3: No such process", print answers 113 when not loaded."""

    def __init__(self, answers: dict[str, tuple[int, str, str]] | None = None):
        self.calls: list[list[str]] = []
        self.loaded: set[str] = set()
        self.answers = answers or {}

    def __call__(self, argv: list[str]) -> tuple[int, str, str]:
        self.calls.append(list(argv))
        assert argv[0] == "launchctl", argv
        verb = argv[1]
        if verb in self.answers:
            return self.answers[verb]
        if verb == "bootout":
            if argv[2] not in self.loaded:
                return 3, "", "Boot-out failed: 3: No such process\n"
            self.loaded.discard(argv[2])
            return 0, "", ""
        if verb == "enable":
            return 0, "", ""
        if verb == "bootstrap":
            label = plistlib.loads(Path(argv[3]).read_bytes())["Label"]
            target = f"{argv[2]}/{label}"
            if target in self.loaded:
                return 5, "", "Bootstrap failed: 5: Input/output error\n"
            self.loaded.add(target)
            return 0, "", ""
        if verb == "print":
            if argv[2] in self.loaded:
                return 0, f"{argv[2]} = {{\n\tstate = running\n}}\n", ""
            return 113, "", f"Could not find service \"{argv[2]}\" in domain for port\n"
        raise AssertionError(f"unexpected launchctl call {argv}")


class FakeSystemctl:
    """A recording runner for `systemctl --user`: enable/disable make and remove the
    .wants symlinks the way the real one does; answers can be overridden per verb."""

    def __init__(self, unit_dir: Path, answers: dict[str, tuple[int, str, str]] | None = None):
        self.calls: list[list[str]] = []
        self.unit_dir = unit_dir
        self.answers = answers or {}

    def __call__(self, argv: list[str]) -> tuple[int, str, str]:
        self.calls.append(list(argv))
        assert argv[:2] == ["systemctl", "--user"], argv
        verb, rest = argv[2], [a for a in argv[3:] if a != "--now"]
        if verb in ("enable", "disable"):
            for unit in rest:
                wants = self.unit_dir / ("timers.target.wants" if unit.endswith(".timer") else "default.target.wants")
                if verb == "enable":
                    wants.mkdir(parents=True, exist_ok=True)
                    (wants / unit).unlink(missing_ok=True)
                    (wants / unit).symlink_to(self.unit_dir / unit)
                else:
                    (wants / unit).unlink(missing_ok=True)
                    if wants.is_dir() and not any(wants.iterdir()):
                        wants.rmdir()
        if verb in self.answers:
            return self.answers[verb]
        if verb == "is-enabled":
            wants = self.unit_dir / ("timers.target.wants" if rest[0].endswith(".timer") else "default.target.wants")
            return (0, "enabled\n", "") if (wants / rest[0]).is_symlink() else (1, "disabled\n", "")
        return 0, "", ""


@pytest.fixture
def venv_python(tmp_path) -> str:
    """A venv-like `bin/python` symlink: the service must name it, not its target."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    return str(python)


@pytest.fixture
def home(tmp_path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def run_dir(tmp_path) -> Path:
    path = tmp_path / "runs" / "dsmath"
    path.mkdir(parents=True)
    return path


def make_host(platform: str, home: Path, python: str, runner=None, environ=None) -> Host:
    def refuse(argv):
        raise AssertionError(f"no command expected, got {argv}")

    return Host(platform=platform, home=home, uid=501, python=python, run=runner or refuse,
                environ=environ if environ is not None else {})


def tree(root: Path) -> tuple[set[str], set[str]]:
    """Given a directory, return (files and symlinks, directories) below it, relative."""
    files, dirs = set(), set()
    for path in root.rglob("*"):
        rel = str(path.relative_to(root))
        (dirs if path.is_dir() and not path.is_symlink() else files).add(rel)
    return files, dirs


def read_unit(text: str) -> configparser.RawConfigParser:
    """Parse a unit file strictly: duplicate sections or keys fail, no interpolation,
    keys keep their case."""
    parser = configparser.RawConfigParser(strict=True, interpolation=None, delimiters=("=",),
                                          comment_prefixes=("#", ";"), empty_lines_in_values=False)
    parser.optionxform = str
    parser.read_string(text)
    return parser


def plist_of(host: Host, run_dir: Path, **kwargs) -> tuple[dict, str]:
    plan = plan_install(RunDir(run_dir), host, **kwargs)
    text = plan.files[plan.service.path]
    return plistlib.loads(text.encode()), text


# --------------------------------------------------------------------------- names and times


@pytest.mark.parametrize("name, expected", [
    ("dsmath", "dsmath"), ("my run_01", "my-run-01"), ("Ünïcode run", "n-code-run"),
    ("..hidden..", "hidden"), ("a.b-c", "a.b-c"), ("___", "run"),
])
def test_run_name_is_reduced_to_reverse_dns_characters(name, expected):
    assert run_name(Path("/x") / name) == expected
    assert re.fullmatch(r"[A-Za-z0-9.-]+", run_name(Path("/x") / name))


@pytest.mark.parametrize("text, expected", [("22:30", (22, 30)), ("00:00", (0, 0)), ("07:05", (7, 5)),
                                            ("23:59", (23, 59))])
def test_parse_at_accepts_hh_mm(text, expected):
    assert parse_at(text) == expected


@pytest.mark.parametrize("text", ["24:00", "7:30", "22:60", "22-30", "", "noon", "22:30:00", "2230"])
def test_parse_at_refuses_anything_else_naming_the_option_and_format(text):
    with pytest.raises(InputError) as info:
        parse_at(text)
    assert "--at" in str(info.value) and "HH:MM" in str(info.value)


# --------------------------------------------------------------------------- the plist


def check_plist(plist: dict, host: Host, run_dir: Path) -> None:
    """The key whitelist and type checks every generated plist must pass."""
    assert set(plist) <= set(PLIST_KEYS), set(plist) - set(PLIST_KEYS)
    assert REQUIRED_PLIST_KEYS <= set(plist)
    assert not {"OnDemand", "TimeOut", "NetworkState"} & set(plist)  # deprecated
    assert re.fullmatch(r"com\.mathlora\.daemon\.[A-Za-z0-9.-]+", plist["Label"])
    args = plist["ProgramArguments"]
    assert isinstance(args, list) and all(isinstance(a, str) for a in args)
    assert args[:6] == [host.python, "-m", "mathlora_daemon", "run", "--run-dir", str(run_dir.resolve())]
    assert os.path.isabs(args[0]) and os.path.isabs(args[5])
    for i, arg in enumerate(args):
        if arg == "--config":
            assert os.path.isabs(args[i + 1])
    assert plist["WorkingDirectory"] == str(run_dir.resolve())
    env = plist["EnvironmentVariables"]
    assert set(env) == {"PATH", "PYTHONUNBUFFERED"}
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
    assert env["PATH"].split(":")[0] == os.path.dirname(host.python)  # the venv's bin first
    assert {"/usr/local/bin", "/opt/homebrew/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"} <= set(
        env["PATH"].split(":"))
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False, "Crashed": True}
    assert all(type(v) is bool for v in plist["KeepAlive"].values())
    if "StartCalendarInterval" in plist:
        sci = plist["StartCalendarInterval"]
        assert set(sci) == {"Hour", "Minute"} and all(type(v) is int for v in sci.values())
        assert 0 <= sci["Hour"] <= 23 and 0 <= sci["Minute"] <= 59
    for key, value in (("ThrottleInterval", 60), ("ExitTimeOut", 60), ("Nice", 5)):
        assert type(plist[key]) is int and plist[key] == value
    assert plist["ProcessType"] == "Standard"
    assert plist["LowPriorityIO"] is True
    assert plist["LimitLoadToSessionType"] == "Aqua"
    logs = host.home / "Library" / "Logs" / "mathlora"
    name = plist["Label"].removeprefix("com.mathlora.daemon.")
    assert plist["StandardOutPath"] == str(logs / f"{name}.out.log")
    assert plist["StandardErrorPath"] == str(logs / f"{name}.err.log")


@pytest.mark.parametrize("at", [None, "22:30", "00:05"])
def test_plist_round_trips_and_passes_key_and_type_checks(home, run_dir, venv_python, at):
    host = make_host("darwin", home, venv_python)
    plist, text = plist_of(host, run_dir, at=at)
    check_plist(plist, host, run_dir)
    assert plistlib.dumps(plist, sort_keys=False).decode() == text  # round trip, byte for byte
    assert plistlib.loads(plistlib.dumps(plist)) == plist
    svc = service_for(RunDir(run_dir), host)
    assert plist == launchd_plist(svc, plist["ProgramArguments"], parse_at(at) if at else None)
    if at is None:
        assert "StartCalendarInterval" not in plist  # no window either: RunAtLoad alone starts it
    else:
        assert plist["StartCalendarInterval"] == dict(zip(("Hour", "Minute"), parse_at(at)))
    assert os.path.islink(plist["ProgramArguments"][0])  # the venv's python, not resolved to its target


def test_config_and_overrides_are_validated_and_passed_to_the_daemon(home, run_dir, venv_python, tmp_path):
    config = tmp_path / "elsewhere.toml"
    config.write_text('[daemon]\nwindow = "21:15-06:00"\n')
    host = make_host("darwin", home, venv_python)
    plist, _ = plist_of(host, run_dir, config=config, overrides=['lora.targets=["q_proj","k_proj"]'])
    check_plist(plist, host, run_dir)
    assert plist["ProgramArguments"][6:] == ["--config", str(config), "--set", 'lora.targets=["q_proj","k_proj"]']
    assert plist["StartCalendarInterval"] == {"Hour": 21, "Minute": 15}  # the window's start

    with pytest.raises(InputError, match="--config"):
        plan_install(RunDir(run_dir), host, config=tmp_path / "missing.toml")


def test_notification_urls_are_kept_out_of_the_service_file(home, run_dir, venv_python):
    """They hold tokens: a --set would be written into the plist or unit; the config
    file, user-only, is where they live."""
    host = make_host("darwin", home, venv_python)
    with pytest.raises(InputError, match="holds secrets") as caught:
        plan_install(RunDir(run_dir), host, overrides=['notify.urls=["pover://user@s3cr3t"]'])
    assert "s3cr3t" not in str(caught.value)
    (run_dir / "mathlora.toml").write_text('[notify]\nurls = ["pover://user@s3cr3t"]\n')
    plist, _ = plist_of(host, run_dir)
    assert "s3cr3t" not in json.dumps(plist)


def test_the_window_start_is_the_default_time_and_at_wins(home, run_dir, venv_python):
    (run_dir / "mathlora.toml").write_text('[daemon]\nwindow = "22:00-07:00"\n')
    host = make_host("darwin", home, venv_python)
    plan = plan_install(RunDir(run_dir), host)
    assert plan.at == (22, 0) and plan.at_source == "daemon.window"
    assert not plan.notes  # a window: RunAtLoad starts outside it exit 0 at once, nothing to warn about
    plan = plan_install(RunDir(run_dir), host, at="23:45")
    assert plan.at == (23, 45) and plan.at_source == "--at" and not plan.notes
    plan = plan_install(RunDir(run_dir), host, at="12:00")
    assert any("outside daemon.window" in note for note in plan.notes)


def test_without_a_window_the_user_is_told_that_launchd_also_starts_at_load(home, run_dir, venv_python):
    plan = plan_install(RunDir(run_dir), make_host("darwin", home, venv_python), at="22:30")
    assert any("every login" in note and "daemon.window" in note for note in plan.notes)


@pytest.mark.parametrize("platform", ["darwin", "linux"])
def test_no_secret_from_the_environment_reaches_any_file(home, run_dir, venv_python, platform, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", SECRET)
    host = make_host(platform, home, venv_python, environ=dict(os.environ))
    for at in (None, "22:30"):
        plan = plan_install(RunDir(run_dir), host, at=at)
        for text in plan.files.values():
            assert SECRET not in text and "HF_TOKEN" not in text


@pytest.mark.parametrize("platform", ["darwin", "linux"])
def test_a_bad_config_is_refused_before_anything_is_written(home, run_dir, venv_python, platform):
    (run_dir / "mathlora.toml").write_text("[train]\nlearnig_rate = 1e-4\n")
    out, err = io.StringIO(), io.StringIO()
    host = make_host(platform, home, venv_python)  # any command would fail the test
    with pytest.raises(InputError, match="learnig_rate"):
        install_main(RunDir(run_dir), None, None, [], False, None, host, out, err)
    with pytest.raises(InputError, match="daemon.budget_hours"):
        install_main(RunDir(run_dir), None, None, ["daemon.budget_hours=-1"], False, None, host, out, err)
    with pytest.raises(InputError, match="--at"):
        install_main(RunDir(run_dir), "25:00", None, [], False, None, host, out, err)
    assert tree(home) == (set(), set())


def test_the_example_in_launchd_is_what_the_code_generates():
    path = ROOT / "launchd" / "com.mathlora.daemon.dsmath.example.plist"
    assert path.read_text() == example_plist(), (
        "launchd/ is out of date; regenerate it with the command in launchd/README.md")
    plist = plistlib.loads(path.read_bytes())
    assert plist["Label"] == "com.mathlora.daemon.dsmath"
    assert plist["StartCalendarInterval"] == {"Hour": 22, "Minute": 30}


# --------------------------------------------------------------------------- launchd install / uninstall


def test_launchd_install_twice_then_uninstall(home, run_dir, venv_python):
    launchctl = FakeLaunchctl()
    host = make_host("darwin", home, venv_python, launchctl)
    before = tree(home)
    target = "gui/501/com.mathlora.daemon.dsmath"
    plist_path = home / "Library" / "LaunchAgents" / "com.mathlora.daemon.dsmath.plist"
    expected_calls = [["launchctl", "bootout", target], ["launchctl", "enable", target],
                      ["launchctl", "bootstrap", "gui/501", str(plist_path)]]

    out, err = io.StringIO(), io.StringIO()
    assert install_main(RunDir(run_dir), "22:30", None, [], False, None, host, out, err) == 0, err.getvalue()
    assert launchctl.calls == expected_calls
    first = plist_path.read_bytes()
    check_plist(plistlib.loads(first), host, run_dir)
    assert (home / "Library" / "Logs" / "mathlora").is_dir()
    assert oct(plist_path.stat().st_mode & 0o077) == "0o0"  # not group/world writable: launchd refuses those
    assert target in launchctl.loaded
    assert "com.mathlora.daemon.dsmath" in out.getvalue() and "22:30" in out.getvalue()

    # Idempotent: the same file and the same commands; the loaded agent is booted out first,
    # else the real launchctl refuses the bootstrap.
    launchctl.calls.clear()
    assert install_main(RunDir(run_dir), "22:30", None, [], False, None, host, io.StringIO(), err) == 0, err.getvalue()
    assert launchctl.calls == expected_calls
    assert plist_path.read_bytes() == first

    status = service_status(RunDir(run_dir), host)
    assert status == {"manager": "launchd", "label": "com.mathlora.daemon.dsmath", "installed": True,
                      "loaded": True, "path": str(plist_path)}

    # launchd writes the logs; they are the user's record and outlive the agent.
    log = home / "Library" / "Logs" / "mathlora" / "dsmath.err.log"
    log.write_text("training output\n")
    launchctl.calls.clear()
    out = io.StringIO()
    assert uninstall_main(RunDir(run_dir), host, out, io.StringIO()) == 0
    assert launchctl.calls == [["launchctl", "bootout", target]]
    assert not launchctl.loaded
    files, dirs = tree(home)
    assert files - before[0] == {"Library/Logs/mathlora/dsmath.err.log"}  # the plist is gone
    assert dirs - before[1] <= {"Library", "Library/LaunchAgents", "Library/Logs", "Library/Logs/mathlora"}
    assert "logs kept" in out.getvalue()
    assert service_status(RunDir(run_dir), host)["installed"] is False

    launchctl.calls.clear()  # uninstall again: nothing to do, still exit 0
    out = io.StringIO()
    assert uninstall_main(RunDir(run_dir), host, out, io.StringIO()) == 0
    assert "nothing was installed" in out.getvalue()
    assert launchctl.calls == [["launchctl", "bootout", target]]


@pytest.mark.parametrize("answer", [(3, "", "Boot-out failed: 3: No such process\n"),
                                    (113, "", "Could not find service \"com.mathlora.daemon.dsmath\" in domain\n"),
                                    (36, "", "Boot-out failed: 36: Operation now in progress\n")])
def test_bootout_of_an_agent_that_is_not_loaded_is_fine(home, run_dir, venv_python, answer):
    launchctl = FakeLaunchctl({"bootout": answer})
    host = make_host("darwin", home, venv_python, launchctl)
    plan = plan_install(RunDir(run_dir), host)
    # An unknown bootout error is remembered but only matters if bootstrap then fails.
    assert [c[1] for c in install(plan, host)] == ["bootout", "enable", "bootstrap"]


def test_bootstrap_waits_while_the_booted_out_daemon_is_still_checkpointing(home, run_dir, venv_python):
    launchctl = FakeLaunchctl()
    slept: list[float] = []
    host = make_host("darwin", home, venv_python, launchctl)
    host = replace(host, sleep=slept.append)
    install(plan_install(RunDir(run_dir), host), host)
    real = launchctl.__call__
    busy = iter([(5, "", "Bootstrap failed: 5: Input/output error\n")] * 2)

    def racing(argv):
        if argv[1] == "bootstrap":
            answer = next(busy, None)
            if answer:
                launchctl.calls.append(list(argv))
                return answer
        return real(argv)

    host = replace(host, run=racing)
    launchctl.calls.clear()
    assert [c[1] for c in install(plan_install(RunDir(run_dir), host), host)] == [
        "bootout", "enable", "bootstrap", "bootstrap", "bootstrap"]
    assert slept == [1.0, 1.0] and launchctl.loaded == {"gui/501/com.mathlora.daemon.dsmath"}


def test_a_failed_bootstrap_says_what_launchctl_said_and_leaves_nothing_installed(home, run_dir, venv_python):
    launchctl = FakeLaunchctl({"bootstrap": (5, "", "Bootstrap failed: 5: Input/output error\n")})
    host = make_host("darwin", home, venv_python, launchctl)
    host = replace(host, sleep=lambda s: pytest.fail("no wait: nothing was loaded before"))
    out, err = io.StringIO(), io.StringIO()
    assert install_main(RunDir(run_dir), None, None, [], False, None, host, out, err) == 1
    message = err.getvalue()
    assert "launchctl bootstrap gui/501" in message and "Bootstrap failed: 5: Input/output error" in message
    assert "Nothing is installed now" in message
    assert not (home / "Library" / "LaunchAgents" / "com.mathlora.daemon.dsmath.plist").exists()
    assert service_status(RunDir(run_dir), host)["installed"] is False


def test_uninstall_keeps_the_plist_when_launchd_cannot_unload_it(home, run_dir, venv_python):
    launchctl = FakeLaunchctl()
    host = make_host("darwin", home, venv_python, launchctl)
    install(plan_install(RunDir(run_dir), host), host)
    launchctl.answers["bootout"] = (5, "", "Boot-out failed: 5: Input/output error\n")
    err = io.StringIO()
    assert uninstall_main(RunDir(run_dir), host, io.StringIO(), err) == 1
    assert "Input/output error" in err.getvalue()
    assert service_for(RunDir(run_dir), host).path.exists()


def test_a_run_of_the_same_name_elsewhere_is_not_overwritten(home, run_dir, venv_python, tmp_path):
    launchctl = FakeLaunchctl()
    host = make_host("darwin", home, venv_python, launchctl)
    install(plan_install(RunDir(run_dir), host), host)
    other = tmp_path / "other" / "dsmath"
    other.mkdir(parents=True)
    with pytest.raises(InputError, match="already serves the run directory"):
        install(plan_install(RunDir(other), host), host)
    with pytest.raises(InputError, match="already serves the run directory"):
        uninstall(service_for(RunDir(other), host), host)
    status = service_status(RunDir(other), host)
    assert status["installed"] is False and status["other_run_dir"] == str(run_dir.resolve())
    assert "taken by" in render_status({"state": "not_started", "service": status})


def test_install_refuses_a_missing_run_dir_and_writes_nothing(home, tmp_path, venv_python):
    host = make_host("darwin", home, venv_python)
    with pytest.raises(InputError, match="no such directory"):
        install_main(RunDir(tmp_path / "nope"), None, None, [], False, None, host, io.StringIO(), io.StringIO())
    assert tree(home) == (set(), set())


# --------------------------------------------------------------------------- --print


@pytest.mark.parametrize("platform", ["darwin", "linux"])
def test_print_writes_nothing_and_runs_nothing(home, run_dir, venv_python, platform):
    host = make_host(platform, home, venv_python)  # any command fails the test
    before = tree(run_dir)
    out = io.StringIO()
    assert install_main(RunDir(run_dir), "22:30", None, [], True, None, host, out, io.StringIO()) == 0
    assert tree(home) == (set(), set()) and tree(run_dir) == before
    if platform == "darwin":
        check_plist(plistlib.loads(out.getvalue().encode()), host, run_dir)
    else:
        assert "[Service]" in out.getvalue() and "OnCalendar=*-*-* 22:30:00" in out.getvalue()


def test_system_override_prints_a_plist_on_linux_and_only_with_print(home, run_dir, venv_python):
    host = make_host("linux", home, venv_python)
    out = io.StringIO()
    assert install_main(RunDir(run_dir), "22:30", None, [], True, "launchd", host, out, io.StringIO()) == 0
    plist = plistlib.loads(out.getvalue().encode())
    check_plist(plist, make_host("darwin", home, venv_python), run_dir)
    with pytest.raises(InputError, match="--system launchd only goes with --print"):
        install_main(RunDir(run_dir), "22:30", None, [], False, "launchd", host, io.StringIO(), io.StringIO())
    assert tree(home) == (set(), set())


# --------------------------------------------------------------------------- systemd


def systemd_host(home, python, answers=None, environ=None):
    environ = environ or {}
    base = Path(environ["XDG_CONFIG_HOME"]) if "XDG_CONFIG_HOME" in environ else home / ".config"
    runner = FakeSystemctl(base / "systemd" / "user", answers)
    return make_host("linux", home, python, runner, environ), runner


def test_systemd_units_parse_and_hold_the_contract(home, run_dir, venv_python):
    host, _ = systemd_host(home, venv_python)
    plan = plan_install(RunDir(run_dir), host, at="22:30")
    unit_dir = home / ".config" / "systemd" / "user"
    assert list(plan.files) == [unit_dir / "mathlora-dsmath.service", unit_dir / "mathlora-dsmath.timer"]
    service = read_unit(plan.files[unit_dir / "mathlora-dsmath.service"])
    timer = read_unit(plan.files[unit_dir / "mathlora-dsmath.timer"])
    assert service.sections() == ["Unit", "Service", "Install"]
    s = dict(service["Service"])
    assert s["Type"] == "simple"
    assert s["ExecStart"] == f"{venv_python} -m mathlora_daemon run --run-dir {run_dir.resolve()}"
    assert s["WorkingDirectory"] == str(run_dir.resolve())
    env = s["Environment"].split(" ")
    assert "PYTHONUNBUFFERED=1" in env
    assert env[0].startswith(f"PATH={os.path.dirname(venv_python)}:")
    assert s["Restart"] == "on-failure" and s["RestartSec"] == "60"
    assert s["RestartPreventExitStatus"] == "78"
    assert s["TimeoutStopSec"] == str(EXIT_TIMEOUT_S) and s["KillSignal"] == "SIGTERM"
    assert s["Nice"] == "5"
    assert service["Install"]["WantedBy"] == "default.target"
    assert timer.sections() == ["Unit", "Timer", "Install"]
    assert dict(timer["Timer"]) == {"OnCalendar": "*-*-* 22:30:00", "Persistent": "true",
                                    "Unit": "mathlora-dsmath.service"}
    assert timer["Install"]["WantedBy"] == "timers.target"

    plan = plan_install(RunDir(run_dir), host)  # no time, no window: the service alone, started at login
    assert list(plan.files) == [unit_dir / "mathlora-dsmath.service"]


def test_a_distributed_job_is_installed_as_launch_with_its_hosts(home, run_dir, venv_python, tmp_path):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text('{"hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]}')
    launch = ["--hostfile", str(hostfile), "-n", "2"]
    plist, _ = plist_of(make_host("darwin", home, venv_python), run_dir, at="22:30", launch=launch)
    assert plist["ProgramArguments"] == [venv_python, "-m", "mathlora_daemon", "launch", *launch, "--run-dir",
                                         str(run_dir.resolve())]
    assert set(plist) <= set(PLIST_KEYS)

    host, _ = systemd_host(home, venv_python)
    plan = plan_install(RunDir(run_dir), host, launch=launch)
    s = dict(read_unit(plan.files[plan.service.path])["Service"])
    assert s["ExecStart"] == (f"{venv_python} -m mathlora_daemon launch --hostfile {hostfile} -n 2 --run-dir "
                              f"{run_dir.resolve()}")
    assert s["KillMode"] == "mixed"  # SIGTERM to `launch` alone, which hands it to rank 0
    single = dict(read_unit(plan_install(RunDir(run_dir), host).files[plan.service.path])["Service"])
    assert "KillMode" not in single


def test_install_cli_refuses_a_missing_hostfile(run_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "mathlora_daemon", "install", "--print", "--run-dir", str(run_dir),
                           "--hostfile", str(tmp_path / "nope.json")], capture_output=True, text=True,
                          env={**os.environ, "HOME": str(tmp_path)}, stdin=subprocess.DEVNULL, timeout=60)
    assert done.returncode == 78 and "--hostfile" in done.stderr and "nope.json: no such file" in done.stderr


def test_systemd_install_twice_then_uninstall(home, run_dir, venv_python):
    host, systemctl = systemd_host(home, venv_python)
    before = tree(home)
    expected = [["systemctl", "--user", "daemon-reload"],
                ["systemctl", "--user", "enable", "--now", "mathlora-dsmath.timer"]]
    out, err = io.StringIO(), io.StringIO()
    assert install_main(RunDir(run_dir), "22:30", None, [], False, None, host, out, err) == 0, err.getvalue()
    assert systemctl.calls == expected
    unit_dir = home / ".config" / "systemd" / "user"
    first = {p.name: p.read_bytes() for p in unit_dir.glob("mathlora-*")}
    assert set(first) == {"mathlora-dsmath.service", "mathlora-dsmath.timer"}
    assert "mathlora-dsmath.timer" in out.getvalue()
    assert "journalctl --user -u mathlora-dsmath.service" in out.getvalue()

    systemctl.calls.clear()
    assert install_main(RunDir(run_dir), "22:30", None, [], False, None, host, io.StringIO(), err) == 0, err.getvalue()
    assert systemctl.calls == expected
    assert {p.name: p.read_bytes() for p in unit_dir.glob("mathlora-*")} == first

    assert service_status(RunDir(run_dir), host) == {
        "manager": "systemd", "label": "mathlora-dsmath", "installed": True, "loaded": True,
        "path": str(unit_dir / "mathlora-dsmath.service"), "unit": "mathlora-dsmath.timer"}

    systemctl.calls.clear()
    assert uninstall_main(RunDir(run_dir), host, io.StringIO(), io.StringIO()) == 0
    assert systemctl.calls == [
        ["systemctl", "--user", "disable", "--now", "mathlora-dsmath.timer", "mathlora-dsmath.service"],
        ["systemctl", "--user", "daemon-reload"]]
    files, dirs = tree(home)
    assert files == before[0]  # no unit, no .wants link left
    assert dirs - before[1] <= {".config", ".config/systemd", ".config/systemd/user"}

    systemctl.calls.clear()  # nothing installed: nothing to ask systemctl
    out = io.StringIO()
    assert uninstall_main(RunDir(run_dir), host, out, io.StringIO()) == 0
    assert systemctl.calls == [] and "nothing was installed" in out.getvalue()


def test_systemd_without_a_time_enables_the_service_and_drops_an_old_timer(home, run_dir, venv_python):
    host, systemctl = systemd_host(home, venv_python)
    install(plan_install(RunDir(run_dir), host, at="22:30"), host)
    systemctl.calls.clear()
    install(plan_install(RunDir(run_dir), host), host)
    assert systemctl.calls == [["systemctl", "--user", "disable", "--now", "mathlora-dsmath.timer"],
                               ["systemctl", "--user", "daemon-reload"],
                               ["systemctl", "--user", "enable", "--now", "mathlora-dsmath.service"]]
    unit_dir = home / ".config" / "systemd" / "user"
    assert not (unit_dir / "mathlora-dsmath.timer").exists()
    assert service_status(RunDir(run_dir), host)["unit"] == "mathlora-dsmath.service"

    systemctl.calls.clear()  # and back: the timer takes over from the login start
    install(plan_install(RunDir(run_dir), host, at="21:00"), host)
    assert systemctl.calls == [["systemctl", "--user", "disable", "mathlora-dsmath.service"],
                               ["systemctl", "--user", "daemon-reload"],
                               ["systemctl", "--user", "enable", "--now", "mathlora-dsmath.timer"]]


def test_systemd_failure_is_reported_and_rolled_back(home, run_dir, venv_python):
    host, systemctl = systemd_host(home, venv_python,
                                   {"enable": (1, "", "Failed to connect to bus: No medium found\n")})
    err = io.StringIO()
    assert install_main(RunDir(run_dir), "22:30", None, [], False, None, host, io.StringIO(), err) == 1
    assert "Failed to connect to bus" in err.getvalue() and "Nothing is installed now" in err.getvalue()
    assert systemctl.calls[-1] == ["systemctl", "--user", "disable", "mathlora-dsmath.service",
                                   "mathlora-dsmath.timer"]
    assert tree(home)[0] == set()  # no unit file, no enable symlink


def test_systemd_honours_xdg_config_home(home, run_dir, venv_python, tmp_path):
    host, _ = systemd_host(home, venv_python, environ={"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    install(plan_install(RunDir(run_dir), host), host)
    assert (tmp_path / "xdg" / "systemd" / "user" / "mathlora-dsmath.service").is_file()


@pytest.mark.parametrize("word, expected", [
    ("/usr/bin/python3", "/usr/bin/python3"),
    ("/Users/me/my runs/x", '"/Users/me/my runs/x"'),
    ("100%", '"100%%"'),
    ("a$HOME", '"a$$HOME"'),
    ('say "hi"\\', '"say \\"hi\\"\\\\"'),
    ('lora.targets=["q_proj","k_proj"]', '"lora.targets=[\\"q_proj\\",\\"k_proj\\"]"'),
])
def test_systemd_quoting(word, expected):
    assert systemd_quote(word) == expected


def test_systemd_does_not_expand_dollars_in_the_executable_and_refuses_quotes_there():
    assert systemd_quote("/opt/a $x/python", executable=True) == '"/opt/a $x/python"'
    assert systemd_quote("/opt/100%/python", executable=True) == '"/opt/100%%/python"'
    for odd in ('/opt/"q"/python', "/opt/it's/python", "/opt/back\\slash/python"):
        with pytest.raises(InputError, match="quotes or backslashes"):
            systemd_quote(odd, executable=True)
        assert systemd_quote(odd).startswith('"')  # as an argument it is fine


def test_a_newline_in_a_path_is_refused_for_systemd(home, tmp_path, venv_python):
    odd = tmp_path / "bad\nname"
    odd.mkdir()
    with pytest.raises(InputError, match="control characters"):
        plan_install(RunDir(odd), make_host("linux", home, venv_python))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_accepts_the_units_and_finds_python_through_awkward_quoting(home, tmp_path):
    # A python under a directory with a space, a percent sign, a dollar and a quote: if the
    # quoting were wrong, systemd would look for another executable and say so.
    venv = tmp_path / "my venv 100% $x" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(sys.executable)
    run = tmp_path / 'runs with 100% space, $HOME and "quotes"' / "dsmath"
    run.mkdir(parents=True)
    plan = plan_install(RunDir(run), make_host("linux", home, str(venv / "python")), at="22:30",
                        overrides=['lora.targets=["q_proj","k_proj"]'])
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    paths = []
    for path, text in plan.files.items():
        (unit_dir / path.name).write_text(text)
        paths.append(str(unit_dir / path.name))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", *paths], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    problems = [line for line in (done.stdout + done.stderr).splitlines() if "mathlora-dsmath" in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr
    bogus = plan.files[plan.service.path].replace(systemd_quote(str(venv / "python"), executable=True),
                                                  str(venv / "python"))
    (unit_dir / "mathlora-dsmath.service").write_text(bogus)  # unquoted: systemd must notice
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", paths[0]], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 or "not executable" in done.stderr + done.stdout


# --------------------------------------------------------------------------- status


def test_status_probes_only_when_installed_and_survives_missing_tools(home, run_dir, venv_python):
    host = make_host("darwin", home, venv_python)  # no command may run: nothing is installed
    info = service_status(RunDir(run_dir), host)
    assert info["installed"] is False and info["loaded"] is None
    text = render_status(read_status(RunDir(run_dir), service_probe=lambda d: service_status(d, host)))
    assert "service    launchd agent com.mathlora.daemon.dsmath: not installed (mathlora-daemon install)" in text

    launchctl = FakeLaunchctl()
    host = make_host("darwin", home, venv_python, launchctl)
    install(plan_install(RunDir(run_dir), host), host)
    text = render_status(read_status(RunDir(run_dir), service_probe=lambda d: service_status(d, host)))
    assert "launchd agent com.mathlora.daemon.dsmath: installed, loaded" in text
    launchctl.loaded.clear()
    assert service_status(RunDir(run_dir), host)["loaded"] is False
    launchctl.answers["print"] = (127, "", "launchctl: command not found")
    info = service_status(RunDir(run_dir), host)
    assert info["installed"] is True and info["loaded"] is None
    assert "installed, loaded: unknown" in render_status({"state": "stopped", "service": info})

    def broken(argv):
        raise RuntimeError("boom")
    assert service_status(RunDir(run_dir), make_host("darwin", home, venv_python, broken)) is None
    assert "service" not in read_status(RunDir(run_dir), service_probe=None)


def test_status_without_a_user_bus_says_unknown(home, run_dir, venv_python):
    host, systemctl = systemd_host(home, venv_python)
    install(plan_install(RunDir(run_dir), host), host)
    systemctl.answers["is-enabled"] = (1, "", "Failed to connect to bus: No medium found\n")
    info = service_status(RunDir(run_dir), host)
    assert info["installed"] is True and info["loaded"] is None
    assert "systemd unit mathlora-dsmath: installed, enabled: unknown" in render_status(
        {"state": "running", "service": info})


def test_default_runner_reports_missing_programs_and_timeouts():
    run = subprocess_runner(0.5)
    assert run(["mathlora-no-such-program-xyz"])[0] == 127
    assert run([sys.executable, "-c", "import time; time.sleep(5)"])[0] == 124
    assert run([sys.executable, "-c", "import sys; print('o'); sys.exit(3)"]) == (3, "o\n", "")


# --------------------------------------------------------------------------- the CLI, end to end


def cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    return run_cli(*args, env={"HOME": str(home), "HF_TOKEN": SECRET, "XDG_CONFIG_HOME": None})


def test_cli_install_print_end_to_end(home, run_dir):
    done = cli("install", "--print", "--run-dir", str(run_dir), "--at", "22:30", home=home)
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout
    if sys.platform == "darwin":
        assert plistlib.loads(done.stdout.encode())["StartCalendarInterval"] == {"Hour": 22, "Minute": 30}
    else:
        sections = re.split(r"^# (/.*)\n", done.stdout, flags=re.MULTILINE)[1:]
        units = dict(zip(sections[::2], sections[1::2]))
        unit_dir = home / ".config" / "systemd" / "user"
        assert set(units) == {str(unit_dir / "mathlora-dsmath.service"), str(unit_dir / "mathlora-dsmath.timer")}
        for text in units.values():
            read_unit(text)
        # The venv's console script by its absolute path (Login Items and ps show its name).
        script = os.path.join(os.path.dirname(sys.executable), "mathlora-daemon")
        assert "ExecStart=" + " ".join([script, "run", "--run-dir", str(run_dir)]) in done.stdout

    done = cli("install", "--print", "--system", "launchd", "--run-dir", str(run_dir), home=home)
    assert done.returncode == 0, done.stderr
    plist = plistlib.loads(done.stdout.encode())
    assert plist["ProgramArguments"][0] == os.path.join(os.path.dirname(sys.executable), "mathlora-daemon")
    assert plist["Label"] == "com.mathlora.daemon.dsmath"
    assert "every login" in done.stderr  # no window, no --at: the user is told when it starts

    done = cli("install", "--print", "--run-dir", str(run_dir), "--at", "7pm", home=home)
    assert done.returncode == 78
    assert "--at '7pm': expected HH:MM" in done.stderr
    assert tree(home) == (set(), set())  # --print and a refused install write nothing

    done = cli("status", "--run-dir", str(run_dir), home=home)
    assert done.returncode == 0 and "not installed" in done.stdout

    if sys.platform != "darwin":  # on a Mac this would ask the real launchctl to boot out a real label
        done = cli("uninstall", "--run-dir", str(run_dir), home=home)
        assert done.returncode == 0 and "nothing was installed" in done.stdout, done.stderr


def test_install_status_and_uninstall_never_import_mlx():
    code = ("import sys, mathlora_daemon.cli, mathlora_daemon.service.install, mathlora_daemon.runtime.status; "
            "sys.exit(', '.join(m for m in ('mlx', 'mlx_lm', 'numpy', 'structlog') if m in sys.modules) or None)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------- SIGTERM vs ExitTimeOut


def test_sigterm_to_exit_stays_below_the_exit_timeout_written(template_dir, tmp_path, home, venv_python):
    from runs import copy, events, finish, start, step_logged, wait_for

    run = copy(template_dir, tmp_path / "run")
    plan = plan_install(RunDir(run), make_host("darwin", home, venv_python))
    exit_timeout = plistlib.loads(plan.files[plan.service.path].encode())["ExitTimeOut"]
    linux = plan_install(RunDir(run), make_host("linux", home, venv_python))
    stop_timeout = int(read_unit(linux.files[linux.service.path])["Service"]["TimeoutStopSec"])
    assert exit_timeout == stop_timeout == EXIT_TIMEOUT_S

    proc = start(run, "--set", "train.epochs=200")  # long enough never to end by itself
    wait_for(step_logged(run, 3), proc, "step 3")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    finish(proc, expect=0)
    wall = time.monotonic() - sent
    stop = events(run, "daemon.stop")[-1]
    assert stop["reason"] == "signal SIGTERM" and stop["exit_code"] == 0
    print(f"\nSIGTERM to exit: daemon signal_to_exit_s={stop['signal_to_exit_s']} s, "
          f"wall {wall:.3f} s; ExitTimeOut {exit_timeout} s")
    assert 0 <= stop["signal_to_exit_s"] <= wall < exit_timeout
