"""The learning rate of every step: warmup, then constant, cosine or linear decay to a floor.

The schedule's length is the run's total steps, unless the training budget will end the
run first: then it is the steps the budget allows, estimated once from the measured
time per step (after ESTIMATE_AFTER steps) and kept in every later checkpoint, so a run
cut by its budget has already decayed when the budget runs out, and a resume continues
the very same schedule. In a distributed job rank 0 decides the length and every rank
takes it (one collective, at the same step on every rank).

The rate is computed on the host for each step and handed to the compiled update, so a
new length needs no new trace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ESTIMATE_AFTER = 20  # steps of this start (beyond warmup) before the budget's length is estimated
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
        self.start_step = progress.global_step
        self.start_used_s = budget.used_s
        self.schedule = self._schedule(progress.schedule_length or total_steps)

    def _schedule(self, length: int) -> LRSchedule:
        c = self.cfg
        return LRSchedule(c.lr_schedule, c.learning_rate, c.warmup_steps, c.min_lr_ratio, length)

    def lr(self, step: int) -> float:
        return self.schedule(step)

    def after_step(self) -> None:
        """After a step: once this start has taken ESTIMATE_AFTER steps past warmup, fix
        the schedule's length for good."""
        p = self.progress
        taken = p.global_step - self.start_step
        if p.schedule_length is not None or taken < ESTIMATE_AFTER or p.global_step < self.cfg.warmup_steps:
            return
        # The budget was last charged at this step's boundary: it holds the steps before it.
        per_step = (self.budget.used_s - self.start_used_s) / max(taken - 1, 1)
        length = self.agree(budget_length(self.total, p.global_step, per_step, self.budget.left_s))
        p.schedule_length, p.schedule_source = length, "budget" if length < self.total else "steps"
        self.schedule = self._schedule(length)
        self.log.info("train.schedule", step=p.global_step, kind=self.cfg.lr_schedule, length=length,
                      source=p.schedule_source, total_steps=self.total, seconds_per_step=round(per_step, 4),
                      budget_left_s=round(self.budget.left_s, 1))
