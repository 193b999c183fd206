"""`launch`: a distributed job as one process that launchd or systemd can supervise (the
command's front-end is cli/training.py).

`mlx.launch` starts the ranks (here, or over ssh) and relays their output, but (MLX
0.32.4) it exits 0 whatever the ranks did and does not pass SIGTERM on to them: a service
manager could neither restart a failed job nor stop one cleanly. `launch` runs
`mlx.launch ... -- <python> -m mathlora_daemon run --run-dir <run>` as its child and adds both:

- signals: SIGTERM and SIGINT go to rank 0 as SIGTERM, SIGHUP as SIGHUP (rank 0's pid is
  the one in the run directory's lock). Rank 0's stop reaches every rank at the same step
  boundary; it checkpoints and all ranks exit 0. Before rank 0 holds the lock there is
  nothing to save, and the launcher's processes get SIGTERM.
- the exit status: rank 0's own, which the crash guard records at every exit it chooses
  (0, 75, 78); 1 when rank 0 ended without one (killed, crashed, never started). So
  launchd's KeepAlive and systemd's Restart= restart a failed job, never a finished one.

Rank 0 must run on this machine (the first host of --hosts or of the hostfile), in this
run directory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import RunDir


def find_launcher(python: str) -> str:
    """Given the interpreter, return the `mlx.launch` beside it (the venv's), else the one
    on PATH; raise InputError when there is none."""
    beside = Path(python).parent / "mlx.launch"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mlx.launch")
    if found:
        return found
    raise InputError(f"mlx.launch: not found beside {python} nor on PATH (it comes with the mlx package)")


def launcher_argv(launcher: str, python: str, run: RunDir, hosts: str | None = None,
                  hostfile: Path | None = None, ranks: int = 1, backend: str | None = None,
                  starting_port: int | None = None, run_args: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Given the launch options, return the mlx.launch command line; raise InputError for
    a missing hostfile, both or neither of hosts and hostfile, or ranks < 1."""
    if (hosts is None) == (hostfile is None):
        raise InputError("launch: give exactly one of --hosts (e.g. 192.168.2.1,192.168.2.2) and --hostfile")
    if ranks < 1:
        raise InputError(f"launch: -n {ranks}: expected an integer >= 1 (ranks per host)")
    argv = [launcher]
    if backend:
        argv += ["--backend", backend]
    if hostfile is not None:
        if not Path(hostfile).is_file():
            raise InputError(f"--hostfile {hostfile}: no such file")
        try:  # mlx.launch would say so too, but after the supervisor started: exit 78 here
            hosts_json = json.loads(Path(hostfile).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InputError(f"--hostfile {hostfile}: not a JSON hostfile ({exc}); mlx.launch expects a list of "
                             '{"ssh": host, "ips": [...]} objects') from None
        if not isinstance(hosts_json, list) or not hosts_json:
            raise InputError(f"--hostfile {hostfile}: expected a non-empty JSON list of hosts")
        argv += ["--hostfile", str(Path(hostfile).resolve())]
    else:
        argv += ["--hosts", hosts]
    if ranks > 1:
        argv += ["-n", str(ranks)]
    if starting_port:
        argv += ["--starting-port", str(starting_port)]
    return argv + ["--", python, "-m", "mathlora_daemon", "run", "--run-dir", str(run.root.resolve()), *run_args]


def first_host(hosts: str | None, hostfile: Path | None) -> tuple[str, list[str]]:
    """Given --hosts or a hostfile, return rank 0's (ssh name, addresses); ("", []) when
    the hostfile cannot be read (mlx.launch will say why)."""
    import json

    if hosts is not None:
        name = hosts.split(",")[0].strip()
        return name, [name]
    try:
        data = json.loads(Path(hostfile).read_text())
        entries = data["hosts"] if isinstance(data, dict) else data
        return str(entries[0].get("ssh", "")), [str(ip) for ip in entries[0].get("ips", [])]
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return "", []


def is_this_machine(name: str, addresses: list[str]) -> bool:
    """Whether a host named so, or at one of these addresses, is this machine."""
    import socket

    import psutil

    local = {"localhost", "127.0.0.1", "::1"}
    host = socket.gethostname()
    local |= {host, host.split(".")[0], f"{host.split('.')[0]}.local"}
    for addrs in psutil.net_if_addrs().values():
        local |= {a.address.split("%")[0] for a in addrs}
    return name in local or any(a in local for a in addresses)


def launch_job(argv: list[str], run: RunDir) -> tuple[int | None, int]:
    """Given the mlx.launch command line and rank 0's run directory, run the job with
    signals passed to rank 0 and return (rank 0's exit code, None when it recorded none:
    crashed, killed or never started; mlx.launch's own exit code)."""
    from mathlora_daemon.runtime.crashguard import read_start_record
    from mathlora_daemon.runtime.lock import probe_lock

    before = read_start_record(run)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)

    def forward(signum, _frame) -> None:
        running, pid = probe_lock(run)
        if running and pid and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGHUP if signum == signal.SIGHUP else signal.SIGTERM)
            except ProcessLookupError:
                pass
        elif signum != signal.SIGHUP:
            _terminate_tree(proc.pid)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    after = read_start_record(run)
    started = after is not None and (before is None or (after.pid, after.started_at) != (before.pid, before.started_at))
    return (after.exit_code if started else None), proc.returncode


def _terminate_tree(pid: int) -> None:
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass


def job_argv(run: RunDir, config: Path | None, overrides: list[str], hosts: str | None, hostfile: Path | None,
             ranks: int, backend: str | None, starting_port: int | None) -> list[str]:
    """Given the `launch` options, return the mlx.launch command line (the one beside this
    interpreter) that runs `run` with this config and these overrides on every rank;
    raise InputError as launcher_argv does, or when there is no mlx.launch."""
    python = os.path.abspath(sys.executable)
    run_args = (["--config", str(Path(config).resolve())] if config else [])
    for text in overrides:
        run_args += ["--set", text]
    return launcher_argv(find_launcher(python), python, run, hosts, hostfile, ranks, backend, starting_port,
                         run_args)
