"""Structured logs: one JSON object per line in `logs/daemon.jsonl`, size-rotated.

Every line carries `ts` (UTC ISO-8601), `level`, `event` and `run`. The same events are
rendered readably on stderr; `train.step` is left to the progress bar when one is drawn.
Built on structlog over the standard library's RotatingFileHandler.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path

import structlog

from mathlora_checkpoints.fsio import ensure_private_dir
from mathlora_daemon.rundir import RunDir

MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5
_LOGGER_NAME = "mathlora"


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


def setup_logging(run_dir: Path | None, run_name: str, console: bool = True,
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
    root = logging.getLogger(_LOGGER_NAME)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG)
    root.propagate = False

    if run_dir is not None:
        path = RunDir(run_dir).log_file
        ensure_private_dir(path.parent)
        file_handler = logging.handlers.RotatingFileHandler(path, maxBytes=MAX_BYTES, backupCount=BACKUPS,
                                                            encoding="utf-8")
        file_handler.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.dict_tracebacks,
                        structlog.processors.JSONRenderer(sort_keys=False)]))
        root.addHandler(file_handler)
    if console:
        stream = logging.StreamHandler(sys.stderr)
        stream.setLevel(logging.INFO)
        stream.setFormatter(structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(), pad_event_to=22)]))
        stream.addFilter(_ConsoleFilter(set(quiet_events)))
        root.addHandler(stream)
    return structlog.get_logger(_LOGGER_NAME).bind(run=run_name)


def close_logging() -> None:
    """Flush and close every handler (before exit, or before a test reads the file)."""
    root = logging.getLogger(_LOGGER_NAME)
    for handler in list(root.handlers):
        handler.flush()
        handler.close()
        root.removeHandler(handler)
