"""`mathlora-daemon` command line: parse, dispatch to one command, map errors to the
documented exit codes (docs/DESIGN.md, "Exit codes": 78 for configuration and input
errors, 75 for temporary failures, 130 for a second Ctrl-C).

cli/arguments.py declares every command's arguments (the shared ones once);
cli/actions.py holds the commands, each a thin function.
"""

from __future__ import annotations

import os
import sys

from mathlora_daemon.errors import EXIT_CONFIG, InputError, TemporaryFailure, classify_os_error

# Options that name a path: an OSError on (or below, or above) one is reported under its name.
_PATH_OPTIONS = {"out": "--out", "adapter_path": "--adapter-path", "data": "--data", "config": "--config",
                 "hostfile": "--hostfile", "source": "--source", "run_dir": "--run-dir"}


def _path_options(args) -> dict[str, object]:
    return {flag: getattr(args, name) for name, flag in _PATH_OPTIONS.items() if getattr(args, name, None) is not None}


def main(argv: list[str] | None = None) -> int:
    from mathlora_daemon.cli.actions import COMMANDS, check_run_dir
    from mathlora_daemon.cli.arguments import parse

    args = parse(argv)
    os.umask(0o077)  # everything the daemon creates is user-only (0600 files, 0700 dirs)
    try:
        try:
            check_run_dir(args.command, args.run_dir)
            return COMMANDS[args.command](args)
        except OSError as exc:
            # A file-system or network error no command handled itself: the contract's
            # 78 (permissions, read-only, wrong file type) or 75 (full disk, network),
            # never a traceback and never exit 1 (a crash, which launchd restarts).
            raise classify_os_error(exc, _path_options(args)) from exc
    except InputError as exc:
        print(f"mathlora-daemon {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TemporaryFailure as exc:
        print(f"mathlora-daemon {args.command}: temporary failure (exit 75, safe to retry): {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
