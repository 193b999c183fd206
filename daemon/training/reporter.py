"""The one voice that tells the user what training does (as mlx-lm's TrainingCallback):
after each step, each validation pass and each checkpoint, the log line, the heartbeat,
the progress bar and the report page. The loop, the Evaluator (training/validation.py)
and the Checkpointer call it; the trackers (runtime/trackers.py) mirror its log lines.

Kept cheap: a small model takes tens of steps a second, so the heartbeat file is
written at most once a second and the bar redraws at most ten times a second. Only
rank 0 reports; on the other ranks every call returns at once.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime

from mathlora_daemon.runtime import crashguard, humanize

HEARTBEAT_WRITE_S = 1.0  # status stays current, and a crash refunds less than this plus a step


class Reporter:
    """Given the Session (training/session.py: the run, its progress, optimizer, schedule
    and where it resumed), the Runtime (runtime/boundary.py: the log, heartbeat, budget
    and window), whether to draw the bar and the report page to refresh after each
    checkpoint (runtime/report_page.py's Page, which never raises; None: no page), report
    every step, validation pass and checkpoint."""

    def __init__(self, session, runtime, show_bar: bool, page=None):
        from tqdm import tqdm

        resumed_step = session.resumed.step if session.resumed else 0
        total_steps = session.schedule.total_steps
        self.run, self.runtime = session.run, runtime
        self.log, self.heartbeat, self.budget = runtime.log, runtime.heartbeat, runtime.budget
        self.progress, self.optimizer, self.leader = session.progress, session.optimizer, session.world.leader
        self.page = page
        self.first_step = resumed_step + 1  # the crash guard counts a start as progress after this one
        self.first_loss = self.last_loss = None
        self.traces = 0
        self.compile_s = 0.0
        self.tokens = self.positions = 0
        self.last_write = time.monotonic()
        self.mean_step_s: float | None = None  # smoothed, for the expected end of training
        self.bar = tqdm(total=total_steps, initial=resumed_step, unit="step", disable=not (show_bar and self.leader),
                        dynamic_ncols=True)

    def on_step(self, epoch: int, result, step_s: float) -> None:
        """After an optimizer step: `result` is the trainer's StepResult, `step_s` the
        step's seconds without the traces it built."""
        self.traces += len(result.traces)
        self.compile_s += result.compile_s
        self.tokens += result.tokens
        self.positions += result.positions
        if not self.leader:
            return
        step = self.progress.global_step
        if step == self.first_step:
            crashguard.record_progress(self.run)
        if result.traces:
            self.log.info("train.compiled", step=step, seconds=round(result.compile_s, 3), traces=result.traces,
                          traces_total=self.traces, budgeted=False)
        self.mean_step_s = step_s if self.mean_step_s is None else 0.9 * self.mean_step_s + 0.1 * step_s
        self.first_loss = result.loss if self.first_loss is None else self.first_loss
        self.last_loss = result.loss
        mem = self.runtime.last_memory.as_fields() if self.runtime.last_memory else {}
        split = {"batch_split": self.progress.batch_split} if self.progress.batch_split > 1 else {}
        budget = self.budget
        self.log.info("train.step", step=step, epoch=epoch, loss=result.loss,
                      lr=float(self.optimizer.learning_rate.item()), tokens=result.tokens,
                      tok_per_s=round(result.tokens / step_s, 1), step_s=round(step_s, 4),
                      padding=round(result.padding_share, 4), budget_used_s=round(budget.used_s + step_s, 1),
                      budget_left_s=round(max(budget.total_s - budget.used_s - step_s, 0), 1), **split, **mem)
        if hasattr(result, "rl_fields"):  # GRPO: what the rollouts found, beside the step's line
            rl = result.rl_fields()
            self.log.info("rl.step", step=step, **rl)
            self.heartbeat.update(rl=rl)
        self.heartbeat.update(step=step, epoch=epoch, loss=result.loss, step_s=round(step_s, 4),
                              recent_mean_loss=self.progress.recent_mean(), tok_per_s=round(result.tokens / step_s, 1),
                              memory=mem, batch_split=self.progress.batch_split)
        if time.monotonic() - self.last_write >= HEARTBEAT_WRITE_S:
            self.heartbeat.update(budget_used_s=round(budget.used_s + step_s, 1))
            self.write_heartbeat()
            self.last_write = time.monotonic()
        if not self.bar.disable:
            self.bar.set_description_str(self.bar_prefix(), refresh=False)
            self.bar.set_postfix_str(f"loss={result.loss:.3f} tok/s={result.tokens / step_s:,.0f} budget used "
                                     f"{humanize.duration(budget.used_s)}, left {humanize.duration(budget.left_s)}",
                                     refresh=False)
            self.bar.update(1)

    def on_phase(self, phase: str) -> None:
        """What the run is doing now (status's phase): "evaluating", "checkpointing"."""
        self.heartbeat.update(phase=phase)

    def on_eval(self, result: dict, best: bool) -> None:
        """After a validation pass (training/validation.py's result at the current step)."""
        p = self.progress
        # GRPO validates by greedy accuracy; its "loss" is the error rate (1 - accuracy).
        accuracy = {"val_accuracy": result["accuracy"], "val_format": result["format"]} if "accuracy" in result else {}
        self.log.info("train.eval", step=p.global_step, val_loss=result["loss"], best=best,
                      best_step=p.best_eval_step, best_val_loss=p.best_eval_loss, base_val_loss=p.base_eval_loss,
                      tokens=result["tokens"], sequences=result["sequences"], seconds=result["seconds"], **accuracy)
        self.heartbeat.update(phase="training", val_loss=result["loss"], val_step=p.global_step,
                              best_val_loss=p.best_eval_loss, best_val_step=p.best_eval_step,
                              base_val_loss=p.base_eval_loss, **accuracy)

    def on_eval_deferred(self, step: int, reason: str) -> None:
        self.log.warning("train.eval.deferred", step=step, reason=reason,
                         why="a stop cut the validation pass short; the next start measures it")

    def on_checkpoint(self, info, seconds: float, pruned: list) -> None:
        """After a checkpoint was written (`info`: its CheckpointInfo) and older ones pruned."""
        self.log.info("checkpoint.saved", step=info.step, path=str(info.path), bytes=info.bytes,
                      seconds=round(seconds, 4), val_loss=info.eval_loss)
        self.heartbeat.update(phase="training", last_checkpoint_step=info.step,
                              last_checkpoint_at=datetime.now().astimezone().isoformat())
        for gone in pruned:
            self.log.info("checkpoint.pruned", step=gone.step, path=str(gone.path))
        if self.page is not None:
            self.page.refresh()

    def on_checkpoint_failed(self, step: int, exc: OSError) -> None:
        self.log.error("checkpoint.failed", step=step, errno=exc.errno, error=str(exc))

    def on_best_unavailable(self, step: int, why: str) -> None:
        """The best checkpoint cannot be read at the end: the current adapters stand."""
        self.log.warning("checkpoint.best_unavailable", step=step, why=why)

    def write_heartbeat(self) -> None:
        try:
            self.heartbeat.write()
        except OSError:
            pass  # a full disk must not stop training; the heartbeat thread retries, checkpoints report

    def bar_prefix(self) -> str:
        """`[ends 04:28: steps]`: when training is expected to end and what ends it."""
        step_s = self.mean_step_s
        steps_left = max(self.bar.total - self.progress.global_step, 0) if self.bar.total else None
        end, limit = expected_end(time.time(), steps_left, step_s, self.budget.left_s, self.runtime.window_ends())
        return f"[ends {end:%H:%M}: {limit}]" if end is not None else "training"

    def totals(self) -> dict:
        """This start's compiled traces, compile seconds and padding share, for train.done."""
        padding = 1.0 - self.tokens / self.positions if self.positions else 0.0
        return {"traces": self.traces, "compile_s": round(self.compile_s, 3), "padding": round(padding, 4)}

    def close(self) -> None:
        self.bar.close()


def expected_end(now: float, steps_left: int | None, step_s: float | None, budget_left_s: float,
                 window_end: datetime | None) -> tuple[datetime | None, str | None]:
    """Given now (Unix seconds), the steps left and seconds a step, the budget left and
    the window's end, return (the local time training is expected to end, the limit that
    ends it: "steps", "budget" or "window"); (None, None) when nothing is known."""
    ends = []
    if steps_left is not None and step_s is not None:
        ends.append((datetime.fromtimestamp(now + steps_left * step_s), "steps"))
    if budget_left_s != float("inf"):
        ends.append((datetime.fromtimestamp(now + max(budget_left_s, 0.0)), "budget"))
    if window_end is not None:
        ends.append((window_end.replace(tzinfo=None) if window_end.tzinfo else window_end, "window"))
    if not ends:
        return None, None
    return min(ends, key=lambda e: e[0])


def show_progress_bar(progress: bool | None) -> bool:
    """Whether to draw the progress bar: as asked, else when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else progress
