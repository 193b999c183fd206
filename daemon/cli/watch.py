"""The running daemon's front-ends: `status` (text, JSON or the report page), `logs` (the
last lines, filtered, followed) and `pause` / `resume` / `stop` (a request the daemon
acknowledges). The data comes from runtime/status.py, runtime/logview.py and
runtime/control.py; what is printed, and the exit code, is decided here.

No MLX import: these answer at once, whether a daemon runs or not.
"""

from __future__ import annotations

import json
import sys
import time
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from mathlora_daemon.cli.common import positive
from mathlora_daemon.rundir import RunDir


def status(args: Namespace) -> int:
    from mathlora_daemon.service.install import service_status

    if args.html:  # refreshed first, so the page always exists when asked (and says what status says now)
        from mathlora_daemon.evaluation.plot import page_figures
        from mathlora_daemon.runtime.report_page import Page

        print(Page(args.run_dir, page_figures).write())
        return 0
    return status_main(args.run_dir, as_json=args.json, out=sys.stdout, service_probe=service_status)


def status_main(run: RunDir, as_json: bool = False, out: TextIO | None = None,
                service_probe: Callable[[RunDir], dict | None] | None = None) -> int:
    """Given a run directory, print its status as JSON (``as_json``) or as the human
    table to ``out`` (default stdout) and return 0: status always answers, even for a
    missing or empty directory ("not started")."""
    from mathlora_daemon.runtime.heartbeat import jsonable
    from mathlora_daemon.runtime.status import read_status, render_status

    out = sys.stdout if out is None else out
    status = read_status(run, service_probe=service_probe)
    if as_json:
        out.write(json.dumps(jsonable(status), sort_keys=True, indent=2) + "\n")
    else:
        out.write(render_status(status))
    out.flush()
    return 0


def logs(args: Namespace) -> int:
    positive(args.lines, "--lines", 0)
    return logs_main(args.run_dir, lines=args.lines, follow=args.follow, level=args.level, event=args.event,
                     as_json=args.json, out=sys.stdout)


def logs_main(run: RunDir, lines: int = 20, follow: bool = False, level: str | None = None,
              event: str | None = None, as_json: bool = False, out: TextIO | None = None,
              stop: Callable[[], bool] | None = None, poll_s: float = 0.2,
              err: TextIO | None = None, sleep: Callable[[float], None] = time.sleep) -> int:
    """Given a run directory, print the last ``lines`` matching log lines (oldest first)
    to ``out`` and, with ``follow``, keep printing new ones every ``poll_s`` until
    ``stop()`` is true or KeyboardInterrupt. Return 0; 2 when ``level`` is not a level.

    No log at all: say so on ``err`` (default stderr) and return 0, or with ``follow``
    wait for it to appear. A last line still being written (no newline yet) is left for
    the next poll rather than shown half. ``sleep`` is injectable so tests can decide
    when the follower polls.
    """
    from mathlora_daemon.runtime import logview

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    min_level = None
    if level is not None:
        min_level = logview.level_rank(level)
        if min_level is None:
            err.write(f"unknown level {level!r}: use one of {', '.join(logview.LEVELS)}\n")
            return 2
    line_filter = logview.LineFilter(min_level, event or None)

    def emit(batch: list[bytes]) -> None:
        shown, skipped = logview.select_lines(batch, line_filter)
        for text, record in shown:
            out.write((text if as_json else logview.render_line(text, record)) + "\n")
        out.flush()
        if skipped:
            note({tail.path: skipped})

    def note(skipped: dict) -> None:
        for path, count in skipped.items():
            err.write(logview.damaged_note(path, count) + "\n")
        err.flush()

    tail = logview.LogTail(run)
    try:
        tail.open()
        skipped: dict[Path, int] = {}
        last = tail.last(max(0, lines), line_filter, skipped)
        if last is None:
            err.write(f"no log yet at {tail.path}\n")
            err.flush()
            if not follow:
                return 0
        else:
            emit(last)
            note(skipped)
        while follow:
            emit(tail.poll())
            if stop is not None and stop():
                break
            sleep(poll_s)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `logs -f | head`: the reader left
        pass
    finally:
        tail.close()
    return 0


def control(args: Namespace) -> int:
    """pause, resume, stop: a request in state/control.json for the running daemon,
    answered "accepted" only once the daemon has acknowledged it."""
    from mathlora_daemon.errors import EXIT_TEMPFAIL
    from mathlora_daemon.runtime.control import send_request
    from mathlora_daemon.runtime.lock import probe_lock

    outcome, request, pid = send_request(args.run_dir, args.command, probe_lock)
    if outcome == "no_daemon":
        gone = f" (daemon pid {pid} exited before reading the request)" if pid else ""
        print(f"no daemon is running in {args.run_dir.root}{gone}; nothing to {args.command}", file=sys.stderr)
        return 1
    if outcome == "unacknowledged":
        print(f"{args.command} requested (id {request['id'][:8]}) but daemon pid {pid} has not acknowledged it "
              "within 10 s (suspended or busy? `mathlora-daemon status` tells); the request stays and is acted "
              "on when the daemon reads it", file=sys.stderr)
        return EXIT_TEMPFAIL
    what = {"stop": "checkpoints at the next step boundary and exits",
            "pause": "checkpoints at the next step boundary and waits (`mathlora-daemon resume` continues)",
            "resume": "continues training"}[args.command]
    print(f"{args.command} accepted (id {request['id'][:8]}) by daemon pid {pid}: it {what}")
    return 0
