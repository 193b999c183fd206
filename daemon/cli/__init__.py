"""`mathlora-daemon` command line: parse, dispatch to one command, map errors to the
documented exit codes (docs/DESIGN.md, "Exit codes": 78 for configuration and input
errors, 75 for temporary failures, 130 for a second Ctrl-C).

cli/arguments.py declares every command's arguments (the shared ones once);
cli/actions.py holds the commands, each a thin function.
"""

from __future__ import annotations

import os
import sys

from mathlora_daemon.errors import EXIT_CONFIG, InputError, TemporaryFailure


def main(argv: list[str] | None = None) -> int:
    from mathlora_daemon.cli.actions import COMMANDS
    from mathlora_daemon.cli.arguments import parse

    args = parse(argv)
    os.umask(0o077)  # everything the daemon creates is user-only (0600 files, 0700 dirs)
    try:
        return COMMANDS[args.command](args)
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
