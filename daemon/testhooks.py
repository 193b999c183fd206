"""Fault-injection points for the crash tests, inert unless their variables are set.

The crash and resume tests kill the real daemon process at exact moments (between two
micro-batches, halfway through a checkpoint save) and make a save fail with ENOSPC.
Timing a kill from outside would be a race; instead the daemon announces that it
reached the point by creating a marker file and then blocks until it is killed:

    MATHLORA_TEST_HOLD="<point>@<step>:<marker path>"   point: start | micro | save | eval | final_eval | exit
        | rollout (GRPO) | stage ("sft+grpo": the switch, between its record and the checkpoints' move)
        (a stop signal raises out of the wait inside a validation pass or the final eval,
        which are interruptible: that is what the tests of a prompt SIGTERM check)
    MATHLORA_TEST_HOLD="<point>@<step>:<marker path>:<release path>"
        the same, but go on once the release file exists (a distributed test holds one
        rank there, signals it, then lets it reach the next collective)
    MATHLORA_TEST_ENOSPC="<step>"                      the save of that step fails
    MATHLORA_TEST_OOM="<step>:<rows>"                  that step fails for memory (as MLX's allocator
        says it) while its micro-batches hold more than <rows> rows
    MATHLORA_TEST_SLOW_COMPILE="<seconds>"             building each compiled trace takes that
        much longer (a CPU test of how a GPU's minutes of kernel compilation are accounted)
    MATHLORA_TEST_TRACE_COLLECTIVES="<file>"           append the name of every collective this
        process calls to <file>.<rank> (the test that every rank calls the same, in order)

Nothing here runs in normal use: with the variables unset each call is one dict lookup.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

HOLD_VAR = "MATHLORA_TEST_HOLD"
ENOSPC_VAR = "MATHLORA_TEST_ENOSPC"
SLOW_COMPILE_VAR = "MATHLORA_TEST_SLOW_COMPILE"
OOM_VAR = "MATHLORA_TEST_OOM"
TRACE_VAR = "MATHLORA_TEST_TRACE_COLLECTIVES"


def hold_point(point: str, step: int) -> None:
    """Given a point name and the global step, when the hold variable names this point
    and step: create its marker file, then block until killed (or, when the variable
    names a release file, until that file exists; signals are handled meanwhile)."""
    spec = os.environ.get(HOLD_VAR)
    if not spec:
        return
    where, _, rest = spec.partition(":")
    if where != f"{point}@{step}":
        return
    marker, _, release = rest.partition(":")
    Path(marker).write_text(str(os.getpid()))
    if release:
        while not Path(release).exists():
            time.sleep(0.01)
        return
    while True:  # the test SIGKILLs us here
        signal.pause()


def failing_writer(step: int, writer):
    """Given the step being saved and the real writer, return a writer that raises
    ENOSPC on the second file when the ENOSPC variable names this step, else `writer`."""
    if os.environ.get(ENOSPC_VAR) != str(step):
        return writer
    calls = []

    def write(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        writer(path, data)

    return write


def slow_compile() -> None:
    """When the slow-compile variable is set, wait that many seconds (inside a trace build)."""
    delay = os.environ.get(SLOW_COMPILE_VAR)
    if delay:
        time.sleep(float(delay))


def trace_collective(name: str) -> None:
    """When the trace variable is set, append the collective's name to this rank's file."""
    path = os.environ.get(TRACE_VAR)
    if path:
        with open(f"{path}.{os.environ.get('MLX_RANK', '0')}", "a", encoding="utf-8") as fh:
            fh.write(name + "\n")


def out_of_memory(step: int, rows: int) -> None:
    """Raise MLX's allocation failure when MATHLORA_TEST_OOM names this step and the step's
    micro-batches hold more rows than it allows."""
    spec = os.environ.get(OOM_VAR)
    if not spec:
        return
    at, _, limit = spec.partition(":")
    if int(at) == step and rows > int(limit):
        raise RuntimeError(f"[metal::malloc] Unable to allocate {rows} rows: Insufficient Memory (test)")
