"""What every command's front-end shares: the run directory's checks, the one way from
options to a Config (`config_from`), and the check of a number option's minimum.

Light on purpose: no MLX, no mlx-lm, nothing that makes `status` or `logs` slow.
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

from mathlora_daemon.config import Config, check_config_file, load_config
from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import RunDir

# Commands that may be given a run directory that does not exist yet (they create it,
# or, for uninstall, act on the service whatever became of the directory).
MAY_CREATE_RUN_DIR = frozenset({"demo", "convert", "uninstall"})


def check_run_dir(command: str, run: RunDir) -> None:
    """Raise InputError when --run-dir names no directory (a typo, usually) for a command
    that needs one; nothing is created there."""
    if command in MAY_CREATE_RUN_DIR:
        return
    if not run.root.exists():
        raise InputError(f"--run-dir {run.root}: no such directory (check the path; `mathlora-daemon demo` or "
                         "`convert` create a run directory)")
    if not run.root.is_dir():
        raise InputError(f"--run-dir {run.root}: not a directory")


def require_writable(run: RunDir) -> None:
    """Raise the contract error (78; 75 for a full disk) when the run directory or a
    directory in it that the command writes cannot be written."""
    from mathlora_daemon.rundir import unwritable_error

    error = unwritable_error(run)
    if error is not None:
        raise error


def config_path(args: Namespace) -> Path:
    """The config file the options name: --config (which must exist), else <run-dir>/mathlora.toml."""
    if args.config is not None:
        if not check_config_file(args.config, "--config"):  # a directory, FIFO, device: said what it is
            raise InputError(f"--config {args.config}: no such file")
        return args.config
    return args.run_dir.config


def config_from(args: Namespace) -> Config:
    """Given normalized arguments, return the validated Config (file + --set)."""
    return load_config(config_path(args), args.overrides)


def positive(value: int | None, option: str, minimum: int, what: str = "") -> None:
    """Raise InputError when an integer option is below its minimum (None: not given)."""
    if value is not None and value < minimum:
        raise InputError(f"{option} {value}: expected an integer >= {minimum}{what}")
