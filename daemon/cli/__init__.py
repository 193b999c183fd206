"""`mathlora-daemon` command line: parse, dispatch to one command, map errors to the
documented exit codes (docs/DESIGN.md, "Exit codes": 78 for configuration and input
errors, 75 for temporary failures, 130 for a second Ctrl-C).

cli/arguments.py declares every command's arguments (the shared ones once);
cli/actions.py maps each command to its front-end, which lives with its family
(training.py, watch.py, checkpoints.py, service.py, models.py, evaluation.py, demo.py)
and decides what is printed and the exit code; cli/common.py holds what they share.

Output never fails a command: stdout and stderr escape what their encoding cannot show
(PYTHONIOENCODING=ascii and a run directory named "nuit-é"), and a reader that closed
stdout early (`checkpoints list | head -1`) ends the command quietly with 0, Python's
documented BrokenPipeError recipe. `entry` is what the console script and `python -m
mathlora_daemon` call: a signal arriving once main() has returned does not turn its exit
code into a death by signal.
"""

from __future__ import annotations

import os
import signal
import sys

from mathlora_daemon.errors import EXIT_CONFIG, InputError, TemporaryFailure, classify_os_error
from mathlora_daemon.runtime import imports

# Options that name a path: an OSError on (or below, or above) one is reported under its name.
_PATH_OPTIONS = {"out": "--out", "adapter_path": "--adapter-path", "data": "--data", "config": "--config",
                 "hostfile": "--hostfile", "source": "--source", "run_dir": "--run-dir"}


def _path_options(args) -> dict[str, object]:
    values = {flag: getattr(args, name) for name, flag in _PATH_OPTIONS.items()
              if getattr(args, name, None) is not None}
    if "--run-dir" in values:
        values["--run-dir"] = values["--run-dir"].root  # a RunDir (cli/arguments.py): the path it was given
    return values


def _tolerant_streams() -> None:
    # A character the terminal's (or PYTHONIOENCODING's) encoding lacks is printed as
    # \xe9 rather than ending the command with a UnicodeEncodeError.
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)  # absent on a replaced stream (tests)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (OSError, ValueError):  # pragma: no cover - a closed or detached stream
                pass


def _stdout_closed() -> bool:
    """Whether stdout is a pipe (or socket) whose reader has gone: a BrokenPipeError
    from writing it is then the reader's choice, not a failure of the command."""
    import select

    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows) or no real stdout
        return False


def _silence_stdout() -> None:
    # Python's recipe (docs: "Note on SIGPIPE"): point stdout at devnull so that the
    # interpreter's final flush does not raise BrokenPipeError again at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):  # pragma: no cover - no real stdout
        pass


def main(argv: list[str] | None = None) -> int:
    from mathlora_daemon.cli.actions import COMMANDS
    from mathlora_daemon.cli.arguments import parse
    from mathlora_daemon.cli.common import check_run_dir

    _tolerant_streams()
    args = parse(argv)
    os.umask(0o077)  # everything the daemon creates is user-only (0600 files, 0700 dirs)
    try:
        try:
            check_run_dir(args.command, args.run_dir)
            code = COMMANDS[args.command](args)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
            return code
        except BrokenPipeError as exc:
            if exc.filename is None and _stdout_closed():
                _silence_stdout()
                return 0
            raise classify_os_error(exc, _path_options(args)) from exc
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


def entry() -> None:
    """The console script and `python -m mathlora_daemon`: run main() and exit with its
    code. Once main() has returned, SIGINT and SIGTERM are ignored: one arriving while the
    interpreter shuts down would otherwise end the process by that signal (-2, -15) and
    lose the code main() returned (a supervisor would count a finished run as killed)."""
    imports.hide()  # torch and wandb, before anything imports them (runtime/imports.py says why)
    if sys.argv[1:2] == ["run"]:
        # The daemon: a stop signal while it starts up (imports, lock, config) is a stop
        # like any other, never a death by signal (runtime/signals.py).
        from mathlora_daemon.runtime.signals import catch_early_stops

        catch_early_stops()
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
