"""docs/reference.md, generated: every config key (from config.py's declarations) and
every command with its options (from the CLI's own parser), so the reference cannot say
one thing while the code does another. A test keeps the file in step:

    python -m mathlora_daemon.cli.reference > docs/reference.md
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

WIDTH = 98  # what argparse makes of a 100-column terminal

HEADER = """# Reference

Generated from the code (`python -m mathlora_daemon.cli.reference > docs/reference.md`; a
test fails when this file drifts). The walk-throughs are in `docs/guide.md`, the contracts
and the architecture in `docs/DESIGN.md`.

## Configuration

`mathlora.toml` in the run directory, or `--config FILE`; any key also as
`--set section.key=value` (TOML syntax: strings quoted, `--set train.method='"grpo"'`).
"change" says when a new value takes effect: while running (the daemon re-reads the file
when it changes, or on SIGHUP, and logs `config.reloaded`), at the next start, or only in a
new run (the key is in the checkpoints' fingerprint: a resume with another value is refused
with exit 78).

"""

CLI_INTRO = """## Commands

`mathlora-daemon COMMAND` (also `python -m mathlora_daemon COMMAND`). Commands that read a
run take `--run-dir DIR` (default `.`), `--config FILE` and repeatable
`--set section.key=value` after the command (for `checkpoints` also after its action).
"""

EXIT_CODES = """## Exit codes and errors

launchd's `KeepAlive {SuccessfulExit: false}` restarts only on non-zero:

| code | meaning |
|---|---|
| 0 | finished, budget spent, outside the window, or stopped (SIGTERM included, after its checkpoint); also a recorded `failed` state, so launchd stops restarting |
| 75 | temporary failure, safe to retry: a checkpoint could not be written (a full disk), another daemon holds the run directory, an offline hub; a rank of a distributed job that lost the others |
| 78 | configuration or input error: the message names the key, option, file or row and what is allowed |
| 130 | a second Ctrl-C |
| other | a crash (the crash guard stops launchd's restarts after `daemon.max_crash_restarts`) |

Every failure a user can cause ends with one line that names the option, key, file or row
and what to do, never a Python traceback, and loses nothing: checkpoints, adapters and
caches stay intact. A run directory that `run` cannot write is recorded outside it
(`$XDG_STATE_HOME`, else `~/.local/state`, `mathlora-daemon/`), so launchd's restart
after the 78 exits 0 at once instead of looping. `tests/e2e/test_bad_input.py` drives
every command through 100 such cases.
"""


def _commands(parser: argparse.ArgumentParser):
    """(name, subparser) of every command, and of every action of a command that has them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {inner}", p) for inner, p in _commands(sub))


def render() -> str:
    """The whole of docs/reference.md."""
    from mathlora_daemon.cli.arguments import build_parser
    from mathlora_daemon.config import reference_table

    parser = build_parser()
    parts = [HEADER, reference_table(), "\n", CLI_INTRO]
    for name, sub in _commands(parser):
        sub.prog = f"mathlora-daemon {name}"
        # argparse wraps to the terminal's width; the file must not depend on the terminal.
        sub.formatter_class = partial(argparse.HelpFormatter, width=WIDTH)
        parts.append(f"\n### {name}\n\n```\n{sub.format_help().rstrip()}\n```\n")
    parts.append("\n" + EXIT_CODES)
    return "".join(parts)


if __name__ == "__main__":
    sys.stdout.write(render())
