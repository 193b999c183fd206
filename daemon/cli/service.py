"""The service commands' front-ends: `install` (launchd or systemd, or `--print` the
files) and `uninstall`. service/install.py plans, writes and loads the files and says
what it did; what is printed, and the exit code, is decided here.

No MLX import: install and uninstall answer at once.
"""

from __future__ import annotations

import shlex
import sys
from argparse import Namespace
from pathlib import Path
from typing import TYPE_CHECKING

from mathlora_daemon.cli.common import positive
from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import RunDir

if TYPE_CHECKING:  # imported where used: the module is not needed by every command
    from mathlora_daemon.service.install import Host


def install(args: Namespace) -> int:
    from mathlora_daemon.service.install import real_host

    launch_args = []
    if args.hostfile is not None:
        if not args.hostfile.is_file():
            raise InputError(f"--hostfile {args.hostfile}: no such file")
        launch_args = ["--hostfile", str(args.hostfile.resolve())]
    elif args.hosts is not None:
        launch_args = ["--hosts", args.hosts]
    if launch_args and args.ranks != 1:
        positive(args.ranks, "-n", 1, " (ranks per host)")
        launch_args += ["-n", str(args.ranks)]
    return install_main(args.run_dir, args.at, args.config, args.overrides, args.print_only, args.system,
                        real_host(), sys.stdout, sys.stderr, launch_args)


def install_main(run: RunDir, at: str | None, config: Path | None, overrides: list[str], print_only: bool,
                 system: str | None, host: Host, out, err, launch: list[str] | tuple[str, ...] = ()) -> int:
    """Given the ``install`` options and the Host (service/install.py), print the files
    (``--print``: nothing is written) or install them; return the exit code. InputError
    propagates (exit 78)."""
    from mathlora_daemon.service.install import ServiceError, describe_start, manager_for, plan_install
    from mathlora_daemon.service.install import install as install_service

    if system is not None and system != manager_for(host.platform) and not print_only:
        raise InputError(f"--system {system}: this machine uses {manager_for(host.platform)}; "
                         f"--system {system} only goes with --print (to copy the files to another machine)")
    plan = plan_install(run, host, at, config, overrides, system, launch)
    for note in plan.notes:
        print(f"note: {note}", file=err)
    if print_only:
        if plan.service.manager == "launchd":
            out.write(plan.files[plan.service.path])
        else:
            out.write("\n".join(f"# {path}\n{text}" for path, text in plan.files.items()))
        return 0
    try:
        install_service(plan, host)
    except ServiceError as exc:
        print(f"mathlora-daemon install: error: {exc}", file=err)
        return exc.exit_code
    svc = plan.service
    lines = [f"installed {svc.manager} {'agent' if svc.manager == 'launchd' else 'service'} {svc.label}",
             f"  file     {', '.join(str(p) for p in plan.files)}",
             f"  starts   {describe_start(plan)}",
             "  restarts after a crash or exit 75; not after exit 0 (finished, stopped, outside the window) or 78"]
    if svc.manager == "launchd":
        lines += [f"  output   {svc.log_dir / (svc.name + '.out.log')} (.err.log)",
                  f"  check    launchctl print {svc.target}"]
    else:
        lines += [f"  output   journalctl --user -u {svc.path.name}",
                  f"  check    systemctl --user status {svc.path.name}"]
    lines += [f"           mathlora-daemon status --run-dir {shlex.quote(str(svc.run_dir))}; "
              f"mathlora-daemon logs -f --run-dir {shlex.quote(str(svc.run_dir))}",
              f"  remove   mathlora-daemon uninstall --run-dir {shlex.quote(str(svc.run_dir))}"]
    print("\n".join(lines), file=out)
    return 0


def uninstall(args: Namespace) -> int:
    from mathlora_daemon.service.install import real_host

    return uninstall_main(args.run_dir, real_host(), sys.stdout, sys.stderr)


def uninstall_main(run: RunDir, host: Host, out, err) -> int:
    """Given a run directory and the Host, uninstall its service, print what was done and
    return the exit code (0 also when nothing was installed)."""
    from mathlora_daemon.service.install import ServiceError, service_for
    from mathlora_daemon.service.install import uninstall as uninstall_service

    svc = service_for(run, host)
    try:
        removed, _ran = uninstall_service(svc, host)
    except ServiceError as exc:
        print(f"mathlora-daemon uninstall: error: {exc}", file=err)
        return exc.exit_code
    if removed:
        print(f"uninstalled {svc.label}: removed {', '.join(str(p) for p in removed)}", file=out)
    else:
        print(f"nothing was installed for {svc.run_dir} ({svc.path} does not exist)", file=out)
    if svc.log_dir is not None and svc.log_dir.is_dir():
        print(f"logs kept in {svc.log_dir} (delete them yourself when no longer needed)", file=out)
    return 0
