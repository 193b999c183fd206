"""`install` / `uninstall`: run the daemon under the user's service manager (the commands'
front-end, what they print and their exit codes, is cli/service.py).

macOS: a per-user LaunchAgent (Metal needs the user's GUI session, so never a system
LaunchDaemon) in ``~/Library/LaunchAgents/com.mathlora.daemon.<run-name>.plist``, loaded
with ``launchctl bootout`` + ``enable`` + ``bootstrap gui/<uid>``. Linux: a systemd user
service (and a timer when a start time is known) in ``~/.config/systemd/user/``, loaded with
``systemctl --user daemon-reload`` + ``enable --now``.

Restarts follow the exit-code contract (docs/DESIGN.md, "Exit codes"): launchd's ``KeepAlive =
{SuccessfulExit: false, Crashed: true}`` and systemd's ``Restart=on-failure`` +
``RestartPreventExitStatus=78`` restart after 75 and crashes, never after 0 (done,
stopped, outside the window, budget spent, recorded failure).

The plist is built here from a dict (:func:`launchd_plist`) and written with ``plistlib``:
that dict is the one source of truth. ``launchd/`` at the top of the repository holds
the same plist rendered for an example run plus a README explaining every key; a test
regenerates it and fails when the two differ. (``launchd/`` is not an import package, so
an installed wheel could not read a template from there.)

Everything that touches the machine is injected through :class:`Host` (the command
runner, uid, home directory, platform, environment and python executable), so the tests
run the real code on macOS and Linux paths with a temporary home and a recording runner.
No MLX import: install, uninstall and status must answer at once. Nothing from the
environment but ``XDG_CONFIG_HOME`` is read, and nothing secret (HF_TOKEN ...) is written.
"""

from __future__ import annotations

import configparser
import datetime as dt
import os
import plistlib
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from mathlora_checkpoints.fsio import atomic_write_text
from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import RunDir

Runner = Callable[[list[str]], tuple[int, str, str]]

LABEL_PREFIX = "com.mathlora.daemon."
UNIT_PREFIX = "mathlora-"
EXIT_TIMEOUT_S = 60    # launchd ExitTimeOut / systemd TimeoutStopSec: SIGTERM, then SIGKILL after this
THROTTLE_S = 60        # launchd ThrottleInterval / systemd RestartSec: at most one start a minute
NICE = 5
INSTALL_TIMEOUT_S = 180  # bootout / disable --now wait for the daemon's checkpoint (up to EXIT_TIMEOUT_S)
PROBE_TIMEOUT_S = 2.0    # `status` must stay fast
MAC_PATH = ("/usr/local/bin", "/opt/homebrew/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")
LINUX_PATH = ("/usr/local/bin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/sbin", "/sbin")
# Every key the generated plist may hold (the tests whitelist exactly these).
PLIST_KEYS = ("Label", "ProgramArguments", "WorkingDirectory", "EnvironmentVariables", "RunAtLoad", "KeepAlive",
              "StartCalendarInterval", "ThrottleInterval", "ExitTimeOut", "ProcessType", "Nice", "LowPriorityIO",
              "LimitLoadToSessionType", "StandardOutPath", "StandardErrorPath")
MANAGERS = ("launchd", "systemd")

_AT_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_NOT_LOADED_RE = re.compile(r"no such process|could not find|not loaded|not find service", re.IGNORECASE)
_SYSTEMD_SAFE_RE = re.compile(r"^[A-Za-z0-9_@+=:,./-]+$")


class ServiceError(Exception):
    """launchctl or systemctl refused (exit 1); the message says what it said."""

    exit_code = 1


@dataclass(frozen=True)
class Host:
    """The machine as this module sees it (injected so tests control every input)."""

    platform: str                  # sys.platform: "darwin" or "linux"
    home: Path
    uid: int
    python: str                    # the interpreter (absolute, symlinks kept); its bin/ goes first on PATH
    run: Runner                    # argv -> (exit code, stdout, stderr); never raises
    environ: Mapping[str, str] = field(default_factory=dict)  # read for XDG_CONFIG_HOME only
    sleep: Callable[[float], None] = time.sleep
    # The `mathlora-daemon` console script the service starts, by absolute path (Login
    # Items then names it, not "python3"); None: `python -m mathlora_daemon` instead.
    script: str | None = None


def subprocess_runner(timeout_s: float) -> Runner:
    """Given a timeout, return a Runner backed by subprocess: a missing program answers
    127 and a timeout 124, like a shell, so callers handle one kind of failure."""

    def run(argv: list[str]) -> tuple[int, str, str]:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                                  stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            return 127, "", f"{argv[0]}: command not found"
        except subprocess.TimeoutExpired:
            return 124, "", f"{argv[0]}: no answer within {timeout_s:g} s"
        except OSError as exc:
            return 126, "", f"{argv[0]}: {exc}"
        return done.returncode, done.stdout, done.stderr

    return run


def real_host(timeout_s: float = INSTALL_TIMEOUT_S) -> Host:
    """Return this machine as a Host. The python path is made absolute but symlinks are
    kept: resolving a venv's ``bin/python`` would name the base interpreter, which does
    not see the venv's packages."""
    python = os.path.abspath(sys.executable)
    script = os.path.join(os.path.dirname(python), "mathlora-daemon")
    return Host(platform=sys.platform, home=Path.home(), uid=os.getuid(), python=python,
                run=subprocess_runner(timeout_s), environ=dict(os.environ),
                script=script if os.access(script, os.X_OK) else None)


# --------------------------------------------------------------------------- naming


def manager_for(platform: str) -> str:
    """Given sys.platform, return "launchd" or "systemd"; raise InputError elsewhere."""
    if platform == "darwin":
        return "launchd"
    if platform.startswith("linux"):
        return "systemd"
    raise InputError(f"install supports macOS (launchd) and Linux (systemd user services), not {platform!r}")


def run_name(run_dir: Path) -> str:
    """Given a run directory, return its basename reduced to [A-Za-z0-9.-] (launchd labels
    are reverse-DNS; systemd unit names allow these too); "run" when nothing is left."""
    name = re.sub(r"[^A-Za-z0-9.-]+", "-", Path(run_dir).name)
    name = re.sub(r"-{2,}", "-", name).strip(".-")
    return name or "run"


@dataclass(frozen=True)
class Service:
    """Where one run's service lives. Pure paths: building one touches nothing."""

    manager: str        # "launchd" | "systemd"
    name: str           # the sanitized run name
    run_dir: Path       # absolute
    unit_dir: Path      # ~/Library/LaunchAgents or ~/.config/systemd/user
    log_dir: Path | None  # launchd only (systemd sends output to the journal)
    uid: int

    @property
    def label(self) -> str:
        """The launchd Label, or the systemd unit stem."""
        return LABEL_PREFIX + self.name if self.manager == "launchd" else UNIT_PREFIX + self.name

    @property
    def path(self) -> Path:
        """The main file: the plist, or the .service unit."""
        return self.unit_dir / (f"{self.label}.plist" if self.manager == "launchd" else f"{self.label}.service")

    @property
    def timer_path(self) -> Path:
        return self.unit_dir / f"{self.label}.timer"

    @property
    def target(self) -> str:
        """launchd's service target, ``gui/<uid>/<label>``."""
        return f"gui/{self.uid}/{self.label}"

    def files(self) -> list[Path]:
        """Every file install may write for this run."""
        return [self.path] if self.manager == "launchd" else [self.path, self.timer_path]


def service_for(run: RunDir, host: Host, manager: str | None = None) -> Service:
    """Given a run directory, the host and optionally a manager, return the Service."""
    manager = manager or manager_for(host.platform)
    run_dir = Path(os.path.abspath(run.root.expanduser()))
    if Path(run_dir).exists():
        run_dir = run_dir.resolve()  # the same directory by any path is the same service
    if manager == "launchd":
        return Service(manager, run_name(run_dir), run_dir, host.home / "Library" / "LaunchAgents",
                       host.home / "Library" / "Logs" / "mathlora", host.uid)
    config_home = host.environ.get("XDG_CONFIG_HOME") or ""
    base = Path(config_home) if os.path.isabs(config_home) else host.home / ".config"
    return Service(manager, run_name(run_dir), run_dir, base / "systemd" / "user", None, host.uid)


# --------------------------------------------------------------------------- the start time


def parse_at(text: str) -> tuple[int, int]:
    """Given ``--at`` text, return (hour, minute); raise InputError naming the option and
    the allowed format when it is not HH:MM on a 24-hour clock."""
    match = _AT_RE.match(text.strip())
    if not match:
        raise InputError(f"--at {text!r}: expected HH:MM on a 24-hour clock, e.g. --at 22:30 or --at 07:05")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class Plan:
    """What install writes for one run: the files' text and when the service starts."""

    service: Service
    at: tuple[int, int] | None       # daily start time, or None (start at load / login only)
    at_source: str | None            # "--at" or "daemon.window"
    files: dict[Path, str]           # path -> content, in write order
    notes: list[str]                 # warnings for the user (stderr)


def plan_install(run: RunDir, host: Host, at: str | None = None, config: Path | None = None,
                 overrides: list[str] | tuple[str, ...] = (), manager: str | None = None,
                 launch: list[str] | tuple[str, ...] = ()) -> Plan:
    """Given the install options, return the Plan; raise InputError (exit 78) for a bad
    ``--at``, a bad config (read with ``load_config`` so nothing is written for it), a
    missing ``--config`` or a path systemd cannot hold. Reads, never writes.

    `launch` (e.g. ``["--hostfile", "/abs/hosts.json"]``) makes the service run the
    distributed job through ``mathlora-daemon launch`` with those options, this machine
    being rank 0."""
    from mathlora_daemon.config import KEYS, load_config, parse_override
    from mathlora_daemon.runtime.schedule import inside, parse_window

    svc = service_for(run, host, manager)
    start = parse_at(at) if at is not None else None
    if config is not None:
        config = Path(os.path.abspath(Path(config).expanduser()))
        if not config.is_file():
            raise InputError(f"--config {config}: no such file")
    # the run's config by the service's absolute path (what the service will read)
    cfg = load_config(config if config is not None else replace(run, root=svc.run_dir).config, list(overrides))
    for text in overrides:  # a --set is written into the plist or unit, readable by anyone who lists it
        name = parse_override(text)[0]
        if KEYS[name].metadata["secret"]:
            raise InputError(f"--set {name}=...: {name} holds secrets (tokens in its URLs) and `install` would write "
                             f"it into the service file; put it in the config file instead ([{name.split('.')[0]}] "
                             "in mathlora.toml, readable by you only)")
    window = parse_window(cfg.daemon.window)
    notes: list[str] = []
    source = "--at" if start is not None else None
    if start is None and window is not None:
        start, source = (window.start.hour, window.start.minute), "daemon.window"
    if at is not None and window is not None:
        if not inside(window, dt.datetime.combine(dt.date.today(), dt.time(*start))):
            notes.append(f"--at {at} is outside daemon.window {cfg.daemon.window}: the daemon will exit 0 at once "
                         "then; pick a time inside the window")
    if svc.manager == "launchd" and window is None:
        # KeepAlive's SuccessfulExit implies RunAtLoad: launchd starts the job when it is
        # loaded (now, and at every login) whatever StartCalendarInterval says.
        if start:
            what = f"no daemon.window is set, so launchd starts training now and at every login, not only at {at}"
        else:
            what = "neither --at nor daemon.window is set, so launchd starts training now and at every login"
        notes.append(f"{what}; set daemon.window (e.g. \"22:00-07:00\") in mathlora.toml to train only at night")
    args = program_arguments(host, svc.run_dir, config, overrides, launch)
    if svc.manager == "launchd":
        files = {svc.path: plist_text(launchd_plist(svc, args, start))}
    else:
        files = {svc.path: systemd_service(svc, args, supervised=bool(launch))}
        if start is not None:
            files[svc.timer_path] = systemd_timer(svc, start)
    return Plan(svc, start, source, files, notes)


def program_arguments(host: Host, run_dir: Path, config: Path | None, overrides,
                      launch: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Given the host, run directory, config, overrides and (for a distributed job) the
    `launch` options, return the argv the service runs: the console script by its
    absolute path, else the interpreter with `-m mathlora_daemon`; raise InputError when
    the path is not absolute (launchd and systemd have no working directory or PATH to
    resolve it with)."""
    program = [host.script] if host.script else [host.python, "-m", "mathlora_daemon"]
    if not program[0] or not os.path.isabs(program[0]):
        raise InputError(f"the program {program[0]!r} is not an absolute path; run install from the venv "
                         "(e.g. .venv/bin/mathlora-daemon install)")
    args = [*program, "launch", *launch] if launch else [*program, "run"]
    args += ["--run-dir", str(run_dir)]
    if config is not None:
        args += ["--config", str(config)]
    for text in overrides:
        args += ["--set", text]
    return args


def _path_env(python: str, defaults: tuple[str, ...]) -> str:
    # The venv's bin first, so anything the daemon runs by name comes from the same venv.
    parts = [os.path.dirname(python), *defaults]
    return ":".join(dict.fromkeys(p for p in parts if p))


# --------------------------------------------------------------------------- launchd


def launchd_plist(svc: Service, args: list[str], at: tuple[int, int] | None) -> dict:
    """Given the service, the argv and the daily start time, return the LaunchAgent as a
    dict (the template; :func:`plist_text` renders it). Only these keys, none deprecated
    (no OnDemand, TimeOut, NetworkState), no secrets: the environment is PATH and
    PYTHONUNBUFFERED, nothing copied from the caller's."""
    plist: dict = {
        "Label": svc.label,
        "ProgramArguments": list(args),
        "WorkingDirectory": str(svc.run_dir),
        "EnvironmentVariables": {"PATH": _path_env(args[0], MAC_PATH), "PYTHONUNBUFFERED": "1"},
        # SuccessfulExit implies RunAtLoad anyway; saying it keeps the file honest.
        "RunAtLoad": True,
        # The exit-code contract decides restarts: non-zero (75, 78, crash) and signals restart;
        # 0 (done, stopped, outside the window, budget spent, recorded failure) does not.
        "KeepAlive": {"SuccessfulExit": False, "Crashed": True},
    }
    if at is not None:
        # launchd runs a start missed while the Mac slept once it wakes.
        plist["StartCalendarInterval"] = {"Hour": at[0], "Minute": at[1]}
    plist.update({
        "ThrottleInterval": THROTTLE_S,
        "ExitTimeOut": EXIT_TIMEOUT_S,    # SIGTERM -> checkpoint -> exit 0 takes seconds; SIGKILL after this
        "ProcessType": "Standard",        # Background would throttle CPU and I/O
        "Nice": NICE,
        "LowPriorityIO": True,
        "LimitLoadToSessionType": "Aqua",  # Metal needs the logged-in GUI session
        "StandardOutPath": str(svc.log_dir / f"{svc.name}.out.log"),
        "StandardErrorPath": str(svc.log_dir / f"{svc.name}.err.log"),
    })
    return plist


def plist_text(plist: dict) -> str:
    """Given the plist dict, return its XML (keys in the order written, for reading)."""
    return plistlib.dumps(plist, fmt=plistlib.FMT_XML, sort_keys=False).decode("utf-8")


# --------------------------------------------------------------------------- systemd


def systemd_quote(word: str, executable: bool = False) -> str:
    """Given one word of an ExecStart= line, return it quoted for systemd: bare when
    plain, else in double quotes with backslash and quote escaped; ``%`` (specifiers) is
    doubled, and ``$`` (variable expansion) too except in the executable, which systemd
    does not expand. Raise InputError for control characters, which a unit file line
    cannot hold, and for an executable with quotes or backslashes, which systemd refuses."""
    _check_line(word)
    if executable and re.search(r"[\"'\\]", word):
        raise InputError(f"{word}: systemd refuses an executable path with quotes or backslashes "
                         "(\"Executable name contains special characters\"); use a venv under a plainer path")
    if not _SYSTEMD_SAFE_RE.match(word):
        word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    word = word.replace("%", "%%")
    return word if executable else word.replace("$", "$$")


def _env_assignment(name: str, value: str) -> str:
    # Environment= unquotes and expands specifiers, but not $VARS.
    text = f"{name}={value}"
    _check_line(text)
    if not _SYSTEMD_SAFE_RE.match(text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text.replace("%", "%%")


def _check_line(text: str) -> None:
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InputError(f"{text!r}: control characters (a newline ...) cannot go into a systemd unit; "
                         "rename the run directory")


def systemd_service(svc: Service, args: list[str], supervised: bool = False) -> str:
    """Given the service and the argv, return the .service unit's text. `supervised`
    (a `launch` job): the stop signal goes to `launch` alone (KillMode=mixed), which
    passes it to rank 0; the ranks then stop together and the rest of the unit is
    killed only after TimeoutStopSec."""
    where = str(svc.run_dir)
    _check_line(where)
    env = " ".join([_env_assignment("PATH", _path_env(args[0], LINUX_PATH)), _env_assignment("PYTHONUNBUFFERED", "1")])
    return "\n".join([
        "# Written by `mathlora-daemon install`; remove with `mathlora-daemon uninstall`.",
        "[Unit]",
        f"Description=mathlora-daemon LoRA training in {where.replace('%', '%%')}",
        "",
        "[Service]",
        "Type=simple",
        "ExecStart=" + " ".join(systemd_quote(a, executable=i == 0) for i, a in enumerate(args)),
        f"WorkingDirectory={where.replace('%', '%%')}",
        f"Environment={env}",
        # The exit-code contract: 75 and crashes restart, 0 ends, 78 (config) never restarts.
        "Restart=on-failure",
        f"RestartSec={THROTTLE_S}",
        "RestartPreventExitStatus=78",
        "KillSignal=SIGTERM",
        *(["KillMode=mixed"] if supervised else []),
        f"TimeoutStopSec={EXIT_TIMEOUT_S}",
        f"Nice={NICE}",
        # Lowest best-effort I/O, not the idle class: idle can starve the checkpoint a
        # SIGTERM asks for under load, and TimeoutStopSec would then kill it.
        "IOSchedulingClass=best-effort",
        "IOSchedulingPriority=7",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ])


def systemd_timer(svc: Service, at: tuple[int, int]) -> str:
    """Given the service and the daily start time, return the .timer unit's text."""
    return "\n".join([
        "# Written by `mathlora-daemon install`; remove with `mathlora-daemon uninstall`.",
        "[Unit]",
        f"Description=Start mathlora-daemon training daily at {at[0]:02d}:{at[1]:02d}",
        "",
        "[Timer]",
        f"OnCalendar=*-*-* {at[0]:02d}:{at[1]:02d}:00",
        "Persistent=true",  # a start missed while the machine was off or asleep runs at boot/wake
        f"Unit={svc.path.name}",
        "",
        "[Install]",
        "WantedBy=timers.target",
        "",
    ])


# --------------------------------------------------------------------------- reading back


def installed_run_dir(svc: Service) -> Path | None:
    """Given a service, return the run directory its installed file names; None when the
    file is missing or cannot be read (then it is treated as this run's)."""
    try:
        if svc.manager == "launchd":
            with open(svc.path, "rb") as fh:
                where = plistlib.load(fh).get("WorkingDirectory")
        else:
            parser = configparser.RawConfigParser(strict=False, interpolation=None)
            parser.optionxform = str
            parser.read_string(svc.path.read_text(encoding="utf-8"))
            where = parser.get("Service", "WorkingDirectory", fallback=None)
            where = where.replace("%%", "%") if where else None
    except Exception:  # noqa: BLE001 - a damaged file (bad XML, not a dict ...) names no owner
        return None
    return Path(where) if isinstance(where, str) and where else None


def _check_owner(svc: Service) -> None:
    other = installed_run_dir(svc)
    if other is not None and other != svc.run_dir:
        raise InputError(f"{svc.path} already serves the run directory {other} (same name "
                         f"{svc.name!r}); uninstall it first (mathlora-daemon uninstall --run-dir {shlex.quote(str(other))}) "
                         "or give this run directory another name")


# --------------------------------------------------------------------------- install / uninstall


def _cmdline(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def _said(rc: int, out: str, err: str) -> str:
    text = (err.strip() or out.strip() or "no message").splitlines()
    return f"exit {rc}: {' / '.join(line.strip() for line in text if line.strip())}"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def install(plan: Plan, host: Host) -> list[list[str]]:
    """Given a Plan, write its files, load the service and return the commands run;
    idempotent (install twice = the same files and commands). Raise InputError when the
    label belongs to another run directory, ServiceError when launchctl/systemctl
    refuses: the files just written are removed again, so a failed install leaves
    nothing installed and can simply be retried."""
    svc = plan.service
    if not svc.run_dir.is_dir():
        raise InputError(f"--run-dir {svc.run_dir}: no such directory")
    _check_owner(svc)
    if svc.manager == "launchd":
        return _install_launchd(plan, host)
    return _install_systemd(plan, host)


def _bootout(svc: Service, host: Host) -> tuple[list[str], bool, str | None]:
    """Unload the agent; return the command, whether it was loaded, and None when it is
    now not loaded, else what launchctl said. Not being loaded is fine ("3: No such
    process", 113 "Could not find service")."""
    argv = ["launchctl", "bootout", svc.target]
    rc, out, err = host.run(argv)
    if rc == 0:
        return argv, True, None
    if rc in (3, 113) or _NOT_LOADED_RE.search(err + out):
        return argv, False, None
    return argv, False, _said(rc, out, err)


def _install_launchd(plan: Plan, host: Host) -> list[list[str]]:
    svc = plan.service
    svc.log_dir.mkdir(parents=True, exist_ok=True)
    for path, text in plan.files.items():
        _write(path, text)
    ran: list[list[str]] = []
    argv, was_loaded, bootout_problem = _bootout(svc, host)  # bootstrap refuses a label that is loaded
    ran.append(argv)
    # `enable` clears a `launchctl disable` override (what `load -w` did), which would
    # make bootstrap fail; it cannot hurt when there is none.
    argv = ["launchctl", "enable", svc.target]
    ran.append(argv)
    enable_problem = None if host.run(argv)[0] == 0 else f"`{_cmdline(argv)}` also failed"
    argv = ["launchctl", "bootstrap", f"gui/{svc.uid}", str(svc.path)]
    waited = 0.0
    while True:
        ran.append(argv)
        rc, out, err = host.run(argv)
        # bootout can return while the old daemon is still checkpointing; until launchd lets
        # go of the label, bootstrap answers "5: Input/output error" (37: in progress).
        if rc == 0 or not was_loaded or rc not in (5, 37) or waited >= EXIT_TIMEOUT_S + 5:
            break
        host.sleep(1.0)
        waited += 1.0
    if rc != 0:
        svc.path.unlink(missing_ok=True)
        extra = [f"before it, `launchctl bootout {svc.target}` said {bootout_problem}"] if bootout_problem else []
        extra += [enable_problem] if enable_problem else []
        raise ServiceError(
            f"`{_cmdline(argv)}` failed ({_said(rc, out, err)}){'; ' if extra else ''}{'; '.join(extra)}. "
            f"Nothing is installed now ({svc.path} was removed); fix the cause and run install again. "
            f"The gui/{svc.uid} domain exists only while you are logged in at the Mac's screen.")
    return ran


def _install_systemd(plan: Plan, host: Host) -> list[list[str]]:
    svc = plan.service
    ran: list[list[str]] = []

    def systemctl(*args: str) -> tuple[int, str, str]:
        argv = ["systemctl", "--user", *args]
        ran.append(argv)
        return host.run(argv)

    had_timer, had_service = svc.timer_path.exists(), svc.path.exists()
    if had_timer and svc.timer_path not in plan.files:
        # An earlier install had a start time, this one has none: the old timer must not fire.
        systemctl("disable", "--now", svc.timer_path.name)
        svc.timer_path.unlink(missing_ok=True)
    elif had_service and not had_timer and svc.timer_path in plan.files:
        # An earlier install started the service at login; now the timer does. A running
        # training is left alone (no --now).
        systemctl("disable", svc.path.name)
    for path, text in plan.files.items():
        _write(path, text)
    unit = svc.timer_path.name if svc.timer_path in plan.files else svc.path.name
    steps = (("daemon-reload",), ("enable", "--now", unit))
    for i, step in enumerate(steps):
        rc, out, err = systemctl(*step)
        if rc != 0:
            if i > 0:  # undo a half-done enable (works without the user bus: plain symlinks)
                host.run(["systemctl", "--user", "disable", *(p.name for p in plan.files)])
            for path in plan.files:
                path.unlink(missing_ok=True)
            raise ServiceError(
                f"`{_cmdline(ran[-1])}` failed ({_said(rc, out, err)}). Nothing is installed now (the unit files "
                "were removed); fix the cause and run install again. `systemctl --user` needs your user's "
                "systemd session (log in, or `loginctl enable-linger $USER` to keep it when logged out).")
    return ran


def uninstall(svc: Service, host: Host) -> tuple[list[Path], list[list[str]]]:
    """Given a Service, stop and unload it and remove its files; return (files removed,
    commands run). A running daemon gets SIGTERM and checkpoints first. Logs stay: they
    are the user's record. Raise InputError when the files belong to another run
    directory; ServiceError when launchd cannot unload the agent (the plist stays, so
    ``status`` still shows it and uninstall can be retried) or systemctl fails for a
    reason other than a missing user bus (the files are gone; the message says what to
    check)."""
    _check_owner(svc)
    present = [p for p in svc.files() if p.exists()]
    ran: list[list[str]] = []
    if svc.manager == "launchd":
        argv, _, problem = _bootout(svc, host)  # even without a plist: it may be loaded from a deleted file
        ran.append(argv)
        if problem:
            raise ServiceError(f"`{_cmdline(argv)}` failed ({problem}); {svc.path} was left in place")
        for path in present:
            path.unlink()
        return present, ran
    if not present:
        return [], ran  # nothing of ours: systemctl would only complain that the units do not exist
    argv = ["systemctl", "--user", "disable", "--now", *(p.name for p in reversed(present))]
    ran.append(argv)
    rc, out, err = host.run(argv)
    for path in present:
        path.unlink()
    # `disable` works on plain files even without the user bus; a stop that failed for lack
    # of one means nothing was running. Our own enable symlinks go either way.
    for wants in svc.unit_dir.glob("*.wants"):
        for path in present:
            link = wants / path.name
            if link.is_symlink():
                link.unlink()
    argv = ["systemctl", "--user", "daemon-reload"]
    ran.append(argv)
    host.run(argv)
    if rc != 0 and not re.search(r"connect to bus|not loaded|does not exist", err + out, re.IGNORECASE):
        raise ServiceError(f"`{_cmdline(ran[0])}` failed ({_said(rc, out, err)}); the unit files were removed, "
                           f"check `systemctl --user status {svc.path.name}`")
    return present, ran


# --------------------------------------------------------------------------- status


def service_status(run: RunDir, host: Host | None = None) -> dict | None:
    """Given a run directory, return ``{"manager", "label", "installed", "loaded", "path"}``
    for ``status``; ``loaded`` is True/False, or None when it cannot be told (no launchctl
    or systemctl, no user bus). Probes only when the file exists, with a short timeout;
    returns None on an unsupported platform and never raises."""
    try:
        host = host or real_host(PROBE_TIMEOUT_S)
        svc = service_for(run, host)
        info: dict = {"manager": svc.manager, "label": svc.label, "installed": False, "loaded": None,
                      "path": str(svc.path)}
        if not svc.path.exists():
            return info
        other = installed_run_dir(svc)
        if other is not None and other != svc.run_dir:
            info["other_run_dir"] = str(other)  # the label is taken by a run of the same name
            return info
        info["installed"] = True
        if svc.manager == "launchd":
            rc, out, err = host.run(["launchctl", "print", svc.target])
            if rc == 0:
                info["loaded"] = True
            elif rc == 113 or _NOT_LOADED_RE.search(err + out):
                info["loaded"] = False
        else:
            unit = svc.timer_path.name if svc.timer_path.exists() else svc.path.name
            rc, out, _err = host.run(["systemctl", "--user", "is-enabled", unit])
            state = out.strip()
            if rc == 0:
                info["loaded"] = True
            elif state in ("disabled", "static", "masked", "linked", "indirect"):
                info["loaded"] = False
            info["unit"] = unit
        return info
    except Exception:  # noqa: BLE001 - status describes the run; the service line is extra
        return None


# --------------------------------------------------------------------------- what install says


def describe_start(plan: Plan) -> str:
    """Given a Plan, return one line saying when the service starts training."""
    svc = plan.service
    when = f"{plan.at[0]:02d}:{plan.at[1]:02d}" if plan.at else None
    source = f" (from {plan.at_source})" if plan.at_source == "daemon.window" else ""
    if svc.manager == "launchd":
        text = "now and at every login (RunAtLoad)"
        return f"daily at {when}{source}, a start missed asleep runs on wake; also {text}" if when else text
    if when:
        return f"daily at {when}{source} by {svc.timer_path.name} (Persistent=true: a missed start runs later)"
    return "now and whenever your systemd user session starts (default.target)"


# --------------------------------------------------------------------------- the documented example

EXAMPLE_RUN_DIR = "/Users/me/runs/dsmath"
EXAMPLE_PYTHON = "/Users/me/mathlora-daemon/.venv/bin/python"
EXAMPLE_SCRIPT = "/Users/me/mathlora-daemon/.venv/bin/mathlora-daemon"


def example_host(platform: str = "darwin") -> Host:
    """Return the made-up Mac (user ``me``, uid 501) that ``launchd/`` documents."""

    def refuse(argv: list[str]) -> tuple[int, str, str]:
        raise AssertionError(f"the example host runs nothing: {argv}")

    return Host(platform=platform, home=Path("/Users/me"), uid=501, python=EXAMPLE_PYTHON, run=refuse,
                script=EXAMPLE_SCRIPT)


def example_plist() -> str:
    """Return the plist ``launchd/com.mathlora.daemon.dsmath.example.plist`` holds: what
    ``install --at 22:30 --run-dir /Users/me/runs/dsmath`` writes for the example host
    (a test keeps the file equal to this)."""
    # The documented command line's --run-dir, built as the CLI builds it (cli/arguments.py).
    plan = plan_install(RunDir(Path(EXAMPLE_RUN_DIR)), example_host(), at="22:30")
    return plan.files[plan.service.path]
