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


def test_the_plan_fixes_the_length_once_from_measured_time_and_a_resume_keeps_it():
    cfg = load_config(None, ["train.lr_schedule=cosine", "train.learning_rate=1e-3", "train.warmup_steps=5"])
    progress, budget, log = Progress(), FakeBudget(total_s=100.0), RecordingLog()
    plan = LRPlan(cfg.train, total_steps=1000, progress=progress, budget=budget, log=log)
    assert plan.schedule.length == 1000  # until measured
    for _ in range(ESTIMATE_AFTER):
        progress.record(1.0, 10)
        budget.used_s += 2.0  # 2 s a step, charged at the next boundary
        plan.after_step()
    assert progress.schedule_length is not None and progress.schedule_source == "budget"
    # 40 s used after 20 steps (the plan sees 19 charged): about 29 more steps fit in 60 s.
    assert 40 <= progress.schedule_length <= 52 and plan.schedule.length == progress.schedule_length
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
    for _ in range(ESTIMATE_AFTER):
        progress.record(1.0, 1)
        plan.after_step()
    assert progress.schedule_length == 77 and plan.schedule.length == 77


def _state(progress: Progress) -> dict:
    return {"global_step": progress.global_step, "tokens_seen": progress.tokens_seen,
            "train_seconds": progress.train_seconds, **progress.to_state()}
