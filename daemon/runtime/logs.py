"""Structured logs: one JSON object per line in `logs/daemon.jsonl`, size-rotated.

Every line carries `ts` (UTC ISO-8601), `level`, `event` and `run`. The same events are
rendered readably on stderr; `train.step` is left to the progress bar when one is drawn.
Built on structlog over the standard library's RotatingFileHandler.
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import sys

import structlog

from mathlora_checkpoints.fsio import ensure_private_dir
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.humanize import local_clock

MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5
LOGGER_NAME = "mathlora"  # the handlers hang here: the file, the console, the trackers
# What a person scans for comes first on a console line, after the event; the JSON log
# keeps every field in the order it was logged.
CONSOLE_FIRST = ("step", "loss", "tok_per_s", "val_loss", "epoch", "lr", "reason", "exit_code", "error")
CONSOLE_LAST = ("run",)


def console_order(_logger, _name, event_dict: dict) -> dict:
    """structlog processor for the console: the event, then CONSOLE_FIRST fields, the
    rest as logged, `run` last; the UTC `ts` becomes local wall-clock time."""
    first = {k: event_dict[k] for k in ("ts", "level", "event") if k in event_dict}
    if isinstance(first.get("ts"), str):
        first["ts"] = local_clock(first["ts"])
    ordered = {k: event_dict[k] for k in CONSOLE_FIRST if k in event_dict}
    rest = {k: v for k, v in event_dict.items() if k not in first and k not in ordered and k not in CONSOLE_LAST}
    last = {k: event_dict[k] for k in CONSOLE_LAST if k in event_dict}
    return {**first, **ordered, **rest, **last}


class _ConsoleFilter(logging.Filter):
    """Keep the console readable: hide `quiet` events (a progress bar shows them) and
    show `train.step` only every `every` steps; the JSON log keeps every line."""

    def __init__(self, quiet: set[str], every: int = 10):
        super().__init__()
        self.quiet = quiet
        self.every = every

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        if not isinstance(msg, dict):
            return True
        if msg.get("event") in self.quiet:
            return False
        if msg.get("event") == "train.step":
            step = msg.get("step")
            return not isinstance(step, int) or step == 1 or step % self.every == 0
        return True


class _LogFile(logging.handlers.RotatingFileHandler):
    """The JSON log file. One that cannot be written (a full disk) must neither stop
    training nor print logging's traceback for every line: say so once on stderr, and
    once more when lines reach the file again (checkpoints report their own failures).

    A line is in the file whole or not at all. The file is written unbuffered, each line
    with its own writes from the end of the file; when a write fails part-way (the disk
    filled mid-line) the file is truncated back to where the line began, so no half
    line is left for the next line (the next start's `daemon.start`) to be glued onto.
    A file whose last byte is not a newline (a power loss mid-line, or a truncation
    that failed) gets one before its next line. Only rank 0 of a job writes the file,
    so nobody else appends between the offset taken and the truncation.
    """

    failing = False
    _torn = False  # the file does not end with a newline: the next line starts one

    def _open(self):
        # Binary, unbuffered, readable (to look at the last byte): a buffered text
        # stream would keep the unwritten rest of a failed line and write it later.
        stream = open(self.baseFilename, "a+b", buffering=0)
        try:
            size = os.fstat(stream.fileno()).st_size
            self._torn = size > 0 and os.pread(stream.fileno(), 1, size - 1) != b"\n"
        except OSError:  # not a regular file (a device): nothing to mend
            self._torn = False
        return stream

    def emit(self, record: logging.LogRecord) -> None:
        self._failed_now = False
        try:
            if self.shouldRollover(record):
                self.doRollover()
            if self.stream is None:
                self.stream = self._open()
            self._append((self.format(record) + self.terminator).encode("utf-8", errors="backslashreplace"))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
        if self.failing and not self._failed_now:
            self.failing = False
            sys.stderr.write(f"mathlora-daemon: the log file {self.baseFilename} is written again\n")

    def _append(self, line: bytes) -> None:
        """Write one whole line at the end of the file, or raise OSError and leave the
        file as it was."""
        fd = self.stream.fileno()
        data = memoryview(b"\n" + line if self._torn else line)
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            while data:
                written = os.write(fd, data)
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.baseFilename)
                data = data[written:]
        except OSError:
            try:
                os.ftruncate(fd, start)
            except OSError:  # a device, or the truncation failed too: the next line starts a new one
                self._torn = True
            raise
        self._torn = False

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed_now = True
        if not self.failing:
            self.failing = True
            error = sys.exc_info()[1]
            sys.stderr.write(f"mathlora-daemon: cannot write the log file {self.baseFilename} ({error}); "
                             "lines go to the console only until it can\n")

    def flush(self) -> None:
        try:
            super().flush()
        except OSError:
            self.handleError(None)  # type: ignore[arg-type]


def setup_logging(run: RunDir | None, run_name: str, console: bool = True,
                  quiet_events: set[str] = frozenset()) -> structlog.stdlib.BoundLogger:
    """Given the run directory (None: console only) and the run's name, configure
    logging and return a logger bound to `run`. Safe to call again (tests, demo)."""
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    ]
    structlog.configure(
        processors=shared + [structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger(LOGGER_NAME)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG)
    root.propagate = False

    if run is not None:
        path = run.log_file
        ensure_private_dir(path.parent)
        file_handler = _LogFile(path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8")
        file_handler.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.dict_tracebacks,
                        structlog.processors.JSONRenderer(sort_keys=False)]))
        root.addHandler(file_handler)
    if console:
        stream = logging.StreamHandler(sys.stderr)
        stream.setLevel(logging.INFO)
        stream.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, console_order,
                        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(), pad_event_to=22, sort_keys=False,
                                                      timestamp_key="ts")]))
        stream.addFilter(_ConsoleFilter(set(quiet_events)))
        root.addHandler(stream)
    return structlog.get_logger(LOGGER_NAME).bind(run=run_name)


def close_logging() -> None:
    """Flush and close every handler (before exit, or before a test reads the file)."""
    root = logging.getLogger(LOGGER_NAME)
    for handler in list(root.handlers):
        try:
            handler.flush()
            handler.close()
        except OSError:  # a full disk at the last flush: the log says what it could
            pass
        root.removeHandler(handler)
