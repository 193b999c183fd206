"""The learning-rate schedule (training/lr.py): warmup, constant / cosine / linear decay to
a floor, and a length that the budget may shorten, fixed once and kept across restarts."""

from __future__ import annotations

import math

import pytest

from mathlora_daemon.config import load_config
from mathlora_daemon.runtime.budget import Budget
from mathlora_daemon.training.checkpointing import Progress
from mathlora_daemon.training.lr import ESTIMATE_AFTER, LRPlan, LRSchedule, budget_length

from fakes import RecordingLog


def test_warmup_then_cosine_to_the_floor():
    s = LRSchedule("cosine", peak=1e-3, warmup=10, floor_ratio=0.1, length=110)
    assert [s(i) for i in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert s(10) == pytest.approx(1e-3)  # decay starts at the peak
    assert s(60) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # halfway
    assert s(109) == pytest.approx(1e-4, abs=1e-6) and s(500) == pytest.approx(1e-4)  # the floor, and after
    values = [s(i) for i in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_and_constant():
    lin = LRSchedule("linear", 2.0, 0, 0.0, 4)
    assert [lin(i) for i in range(5)] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])
    const = LRSchedule("constant", 3e-4, 5, 0.1, 100)
    assert const(0) == pytest.approx(6e-5) and const(5) == const(99) == pytest.approx(3e-4)


@pytest.mark.parametrize("left_s, expected", [(math.inf, 1000), (10_000.0, 1000), (970.0, 10 + 940),
                                              (0.5, 11)])
def test_the_budget_can_shorten_the_schedule(left_s, expected):
    # 10 steps done at 1 s a step; the budget keeps a margin for checkpoints and evaluations.
    assert budget_length(1000, 10, 1.0, left_s) == expected


class FakeBudget:
    def __init__(self, total_s):
        self.total_s, self.used_s = total_s, 0.0

    @property
    def left_s(self):
        return max(0.0, self.total_s - self.used_s)


class Loop:
    """The budget's side of training/loop.py: each step's cost is charged at the next
    boundary (or before a checkpoint); loading is never charged; a kill charges what was
    spent (a crash never refunds) and loses the progress since the last checkpoint."""

    def __init__(self, cfg, progress: Progress, budget: FakeBudget, log=None):
        self.progress, self.budget, self.pending = progress, budget, 0.0
        self.plan = LRPlan(cfg.train, 1000, progress, budget, log or RecordingLog())

    def steps(self, until: int, cost: float) -> None:
        while self.progress.global_step < until:
            self.budget.used_s += self.pending  # the boundary
            self.pending = 0.0
            self.progress.record(1.0, 10)
            self.pending += cost
            self.plan.after_step()

    def checkpoint(self) -> Progress:
        self.budget.used_s += self.pending
        self.pending = 0.0
        self.progress.train_seconds = self.budget.used_s  # the Checkpointer does this
        return Progress.from_state(_state(self.progress))


def test_the_plan_fixes_the_length_once_from_measured_time_and_a_resume_keeps_it():
    cfg = load_config(None, ["train.lr_schedule=cosine", "train.learning_rate=1e-3", "train.warmup_steps=5"])
    progress, budget, log = Progress(), FakeBudget(total_s=100.0), RecordingLog()
    loop = Loop(cfg, progress, budget, log)
    plan = loop.plan
    assert plan.schedule.length == 1000  # until measured
    loop.steps(ESTIMATE_AFTER, cost=2.0)
    assert progress.schedule_length is None  # after step 20 only 19 steps are charged
    loop.steps(ESTIMATE_AFTER + 1, cost=2.0)
    assert progress.schedule_length is not None and progress.schedule_source == "budget"
    # 40 s used by the 20 steps before step 21: 29 more steps of 2 s fit in the 60 s
    # left (the margin keeps 3%).
    assert progress.schedule_length == 21 + 29 and plan.schedule.length == progress.schedule_length
    event = log.fields("train.schedule")
    assert event["source"] == "budget" and event["length"] == progress.schedule_length
    rates = [plan.lr(step) for step in range(60)]

    # A restart with the progress of a checkpoint continues the very same schedule.
    restored = Progress.from_state({**_state(progress)})
    again = LRPlan(cfg.train, 1000, restored, FakeBudget(total_s=1e9), RecordingLog())
    assert [again.lr(step) for step in range(60)] == rates
    assert rates[-1] == pytest.approx(1e-4)  # decayed to the floor before the budget ends


def test_in_a_distributed_job_every_rank_takes_rank_0_s_length():
    cfg = load_config(None, ["train.warmup_steps=0"])
    progress = Progress()
    plan = LRPlan(cfg.train, 1000, progress, Budget(float("inf")), RecordingLog(), agree=lambda length: 77)
    for _ in range(ESTIMATE_AFTER + 1):
        progress.record(1.0, 1)
        plan.after_step()
    assert progress.schedule_length == 77 and plan.schedule.length == 77


def test_a_rank_without_the_evidence_asks_at_the_same_step_and_takes_rank_0_s_not_yet():
    # Rank 1 never read the checkpoint (fresh Progress, rank 0's step); rank 0 resumed
    # one written before the evidence was kept, so it answers 0 ("not yet") until it has
    # timed ESTIMATE_AFTER steps itself. Both ranks ask at every step from the same one.
    cfg = load_config(None, ["train.warmup_steps=0"])
    rank0 = [0] * 5 + [333]
    asked = []
    progress = Progress(global_step=40)
    plan = LRPlan(cfg.train, 1000, progress, Budget(3600.0), RecordingLog(),
                  agree=lambda length: asked.append(progress.global_step) or rank0[len(asked) - 1])
    for _ in range(6):
        progress.record(1.0, 1)
        plan.after_step()
    assert asked == [41, 42, 43, 44, 45, 46] and progress.schedule_length == 333


def test_the_evidence_adds_up_across_restarts_and_fixes_the_length_at_the_same_step():
    cfg = load_config(None, ["train.warmup_steps=3"])
    whole = Loop(cfg, Progress(), FakeBudget(total_s=100.0))
    whole.steps(30, cost=1.0)

    # Restarted every few steps, each start losing two steps to a kill after its last
    # checkpoint (their cost charged, never refunded), one start timing a single step.
    progress, budget = Progress(), FakeBudget(total_s=100.0)
    for saved_at in (4, 8, 9, 16):
        loop = Loop(cfg, progress, budget)
        loop.steps(saved_at, cost=1.0)
        saved = loop.checkpoint()
        loop.steps(saved_at + 2, cost=1.0)
        budget.used_s += loop.pending  # killed
        assert saved.schedule_length is None
        assert (saved.timed_steps, saved.timed_seconds) == (saved_at, float(saved_at))
        progress = saved
    loop = Loop(cfg, progress, budget)
    loop.steps(30, cost=1.0)

    fixed, whole_fixed = loop.plan.log.fields("train.schedule"), whole.plan.log.fields("train.schedule")
    assert fixed["step"] == whole_fixed["step"] == ESTIMATE_AFTER + 1
    assert fixed["source"] == whole_fixed["source"] == "budget"
    assert fixed["seconds_per_step"] == whole_fixed["seconds_per_step"] == 1.0  # the same evidence
    # The killed run spent 8 s more of its budget on lost steps: less is left, so its
    # schedule is shorter by those seconds' steps.
    assert (whole_fixed["length"], fixed["length"]) == (21 + int(80 * 0.97), 21 + int(72 * 0.97))


def _state(progress: Progress) -> dict:
    return {"global_step": progress.global_step, "tokens_seen": progress.tokens_seen,
            "train_seconds": progress.train_seconds, **progress.to_state()}
