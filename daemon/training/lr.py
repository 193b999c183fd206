"""The learning rate of every step: warmup, then constant, cosine or linear decay to a floor.

The schedule's length is the run's total steps, unless the training budget will end the
run first: then it is the steps the budget allows, estimated once from the measured
budget cost per step and kept in every later checkpoint, so a run cut by its budget has
already decayed when the budget runs out, and a resume continues the very same schedule.

The evidence (steps timed, their budget seconds) lives in Progress and is saved with
every checkpoint, so it adds up across restarts: a run restarted every few steps fixes
its length at the same global step as one never interrupted (once ESTIMATE_AFTER steps
are timed; the budget is charged at each step boundary, so after step k the steps up to
k - 1 are), with the same learning rates before it. What a kill loses since the last
checkpoint is timed again when those steps are re-done.

In a distributed job rank 0 decides the length and every rank takes it (one collective,
at the same step on every rank: the step is decided from the agreed global step alone,
and rank 0 answers 0, "not yet", while its evidence is short, e.g. after resuming a
checkpoint written before the evidence was kept).

The rate is computed on the host for each step and handed to the compiled update, so a
new length needs no new trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ESTIMATE_AFTER = 20  # steps timed (across starts, beyond warmup) before the budget's length is estimated
BUDGET_MARGIN = 0.97  # keep a little of the budget for checkpoints and evaluations the steps did not show


@dataclass(frozen=True)
class LRSchedule:
    kind: str  # constant | cosine | linear
    peak: float
    warmup: int
    floor_ratio: float
    length: int

    def __call__(self, step: int) -> float:
        """The learning rate of the step taken at global step `step` (0-based)."""
        if self.warmup and step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.peak
        t = min(max(step - self.warmup, 0) / max(self.length - self.warmup, 1), 1.0)
        floor = self.peak * self.floor_ratio
        if self.kind == "linear":
            return floor + (self.peak - floor) * (1.0 - t)
        return floor + (self.peak - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def budget_length(total_steps: int, steps_done: int, seconds_per_step: float, budget_left_s: float) -> int:
    """Given the run's total steps, the steps taken, the measured seconds a step costs the
    budget and the budget left, return the schedule's length: the total, or fewer when the
    budget allows fewer (at least one more step)."""
    if not math.isfinite(budget_left_s) or seconds_per_step <= 0:
        return total_steps
    allowed = steps_done + int(budget_left_s * BUDGET_MARGIN / seconds_per_step)
    return max(min(total_steps, allowed), steps_done + 1)


class LRPlan:
    """The schedule of this run, sized once (see the module docstring). `progress`
    carries the fixed length across restarts (trainer_state.json, "schedule")."""

    def __init__(self, train_cfg, total_steps: int, progress, budget, log, agree=None):
        self.cfg, self.total, self.progress, self.budget, self.log = train_cfg, total_steps, progress, budget, log
        self.agree = agree or (lambda length: length)  # distributed: every rank takes rank 0's length
        # This start's timing begins here: loading was not charged to the budget.
        progress.timing_since = (progress.global_step, budget.used_s)
        self.schedule = self._schedule(progress.schedule_length or total_steps)

    def _schedule(self, length: int) -> LRSchedule:
        c = self.cfg
        return LRSchedule(c.lr_schedule, c.learning_rate, c.warmup_steps, c.min_lr_ratio, length)

    def lr(self, step: int) -> float:
        return self.schedule(step)

    def after_step(self) -> None:
        """After a step: once ESTIMATE_AFTER steps past warmup are timed (across starts),
        fix the schedule's length for good."""
        p = self.progress
        # Decided from the global step alone (the same on every rank): with the evidence
        # kept in every checkpoint, the steps before this one are timed.
        if p.schedule_length is not None or p.global_step - 1 < ESTIMATE_AFTER or p.global_step < self.cfg.warmup_steps:
            return
        # The budget was last charged at this step's boundary: it holds the steps before it.
        steps, seconds = p.timing(self.budget.used_s, p.global_step - 1)
        per_step = seconds / max(steps, 1)
        enough = steps >= ESTIMATE_AFTER
        length = self.agree(budget_length(self.total, p.global_step, per_step, self.budget.left_s) if enough else 0)
        if not length:  # rank 0 has not timed enough steps yet (see the module docstring)
            return
        p.schedule_length, p.schedule_source = length, "budget" if length < self.total else "steps"
        self.schedule = self._schedule(length)
        self.log.info("train.schedule", step=p.global_step, kind=self.cfg.lr_schedule, length=length,
                      source=p.schedule_source, total_steps=self.total, seconds_per_step=round(per_step, 4),
                      budget_left_s=round(self.budget.left_s, 1))
