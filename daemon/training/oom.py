"""Out of memory costs a step, not the night: split the micro-batch and take the step again.

A step that fails for memory (MLX's allocation errors on any backend, Metal's
"Insufficient Memory" command-buffer failure, CUDA's out-of-memory) raises out of
training/step.py with the adapters and Adam state possibly half-replaced by lazy values
that will never evaluate. The loop (`take_step_splitting`) therefore keeps references to
the state as it was at the step's boundary (evaluated arrays: nothing is copied), puts
it back, frees MLX's buffer cache, and retries the same step with every micro-batch cut
in two and twice as many of them: the same global batch and data cursor. The factor is
kept in Progress (`batch_split`, saved in every checkpoint), so later steps and later
starts go on with it; a step's mean loss is then a mean over more, smaller micro-batches,
so the run is no longer bit-identical to an unsplit one, and the `train.batch_split`
event says so.

A micro-batch of one row cannot be split: then the error goes up as before.

When the system kills the process instead (macOS's memory pressure, Linux's OOM killer:
a SIGKILL, no error to catch), the next start reads what the dead one last wrote in its
heartbeat (`died_of_memory`): training, with less memory available than
`daemon.memory_warning_available_gb`. It then starts with the split doubled.
"""

from __future__ import annotations

import numpy as np

from mathlora_daemon import testhooks

NOT_BIT_IDENTICAL = ("the same global batch in smaller micro-batches: from here on the run is no longer "
                     "bit-identical to an unsplit one")

# What MLX says when an allocation fails (CPU malloc, Metal, CUDA), lower-cased.
OUT_OF_MEMORY_SIGNS = ("unable to allocate", "insufficient memory", "out of memory", "outofmemory",
                       "cudaerrormemoryallocation", "cuda_error_out_of_memory", "memory allocation failed")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is an allocation failure (MLX raises RuntimeError for those)."""
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(sign in str(exc).lower() for sign in OUT_OF_MEMORY_SIGNS)


def split_micro_batches(micro_batches: list[np.ndarray], split: int) -> list[np.ndarray]:
    """Each micro-batch cut into `split` parts of (nearly) equal rows, in order; a part
    never empty (a micro-batch of fewer rows gives fewer parts)."""
    if split <= 1:
        return list(micro_batches)
    return [part for mb in micro_batches for part in np.array_split(np.asarray(mb), min(split, len(mb)))]


def take_step_splitting(session, step: int, micro_batches, lr: float, should_abort, log):
    """Take the session's step; on an allocation failure put the state back, double the
    split and take it again. Return the step's result (None when a stop abandoned it)."""
    import gc

    import mlx.core as mx

    from mathlora_daemon.training.step import restore_state, state_snapshot

    progress = session.progress
    while True:
        parts = split_micro_batches(micro_batches, progress.batch_split)
        saved = state_snapshot(session.model, session.optimizer)
        try:
            testhooks.out_of_memory(step + 1, max(len(p) for p in parts))
            return session.take_step(step, parts, lr, should_abort)
        except Exception as exc:
            if not is_out_of_memory(exc) or max(len(p) for p in parts) <= 1:
                raise
            message = f"{type(exc).__name__}: {exc}"[:300]
            restore_state(session.model, session.optimizer, saved)
            del exc  # its traceback holds the failed step's arrays
            gc.collect()
            mx.clear_cache()
            progress.batch_split *= 2
            smaller = split_micro_batches(micro_batches, progress.batch_split)
            log.warning("train.batch_split", step=step + 1, split=progress.batch_split,
                        micro_batch_rows=max(len(p) for p in smaller), micro_batches=len(smaller), error=message,
                        note=NOT_BIT_IDENTICAL)


def died_of_memory(run, warning_available_gb: float) -> dict | None:
    """What the previous start's heartbeat says of its death, when it looks like memory:
    it was training (state running: it never wrote an end; we hold the lock, so it is
    gone) with less memory available than the warning level. None otherwise."""
    from mathlora_checkpoints.store import read_json_object

    last = read_json_object(run.status_file) or {}
    memory = last.get("memory") if isinstance(last.get("memory"), dict) else {}
    available = memory.get("sys_available_gb")
    if last.get("state") != "running" or last.get("phase") != "training" or warning_available_gb <= 0:
        return None
    if not isinstance(available, (int, float)) or available >= warning_available_gb:
        return None
    return {"step": last.get("step"), "sys_available_gb": available, "rss_gb": memory.get("rss_gb")}


def split_after_death(progress, death: dict | None, log) -> None:
    """Double the split when the previous start died of memory (see died_of_memory)."""
    if death is None:
        return
    progress.batch_split *= 2
    log.warning("train.batch_split", step=progress.global_step + 1, split=progress.batch_split,
                reason=f"the previous start died while training step {death.get('step')} with "
                       f"{death['sys_available_gb']:.2f} GB of memory available",
                note=NOT_BIT_IDENTICAL)

