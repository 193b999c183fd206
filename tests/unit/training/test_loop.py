"""The training loop as such (training/loop.py): the real set-up and the real compiled step
on the tiny model, driven by a scripted runtime, so each decision the loop makes is
checked: every step reported in order, compile time handed to the budget as set-up, a
checkpoint when a segment ends, a stop at a boundary, an abort between micro-batches."""

from __future__ import annotations

import numpy as np
import pytest
from mlx.utils import tree_flatten

from mathlora_daemon.config import load_config
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.boundary import Stop
from mathlora_daemon.runtime.world import SINGLE
from mathlora_daemon.training.loop import loop
from mathlora_daemon.training.session import setup_session

from fakes import RecordingHeartbeat, RecordingLog
from runs import copy


class ScriptedRuntime:
    """A Runtime that says "go on" until `stop_at`, and records what the loop tells it."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at, self.boundaries, self.not_training_s, self.accounts = stop_at, [], [], []
        self.step = 0
        self.finished_early = None

    def boundary(self, checkpoint):
        self.boundaries.append(self.step)
        return Stop("stopped", "asked") if self.stop_at is not None and self.step >= self.stop_at else None

    def account(self, training: bool):
        self.accounts.append(training)

    def not_training(self, seconds: float):
        self.not_training_s.append(seconds)


class RecordingReporter:
    def __init__(self, runtime: ScriptedRuntime, progress):
        self.runtime, self.progress, self.steps = runtime, progress, []
        self.log = RecordingLog()  # what the loop reports besides steps (a batch split)

    def on_step(self, epoch, result, step_s):
        self.steps.append((self.progress.global_step, epoch, result.loss, result.compile_s))
        self.runtime.step = self.progress.global_step


class RecordingEvaluator:
    def __init__(self, progress):
        self.progress, self.measured = progress, []

    def measure(self):
        self.measured.append(self.progress.global_step)


class RecordingCheckpointer:
    def __init__(self, progress, every: int):
        self.progress, self.every, self.saved = progress, every, []

    def due(self):
        return self.progress.global_step % self.every == 0

    def save(self):
        self.saved.append(self.progress.global_step)


class RecordingPlan:
    """The LR plan: a rate per step, and told after each step."""

    def __init__(self):
        self.asked, self.after = [], 0

    def lr(self, step):
        self.asked.append(step)
        return 1e-3 / (step + 1)

    def after_step(self):
        self.after += 1


@pytest.fixture
def session(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    cfg = load_config(RunDir(run).config, ["train.epochs=1", "lora.dropout=0.0"])
    return setup_session(RunDir(run), cfg, RecordingLog(), RecordingHeartbeat(), SINGLE, show_bar=False)


def test_the_loop_takes_every_step_reports_it_and_hands_compile_time_to_the_budget(session):
    runtime = ScriptedRuntime()
    reporter = RecordingReporter(runtime, session.progress)
    evaluator, checkpointer = RecordingEvaluator(session.progress), RecordingCheckpointer(session.progress, every=3)
    plan = RecordingPlan()
    assert loop(session, runtime, evaluator, checkpointer, reporter, lambda: False, plan) is None
    total = session.schedule.total_steps
    assert plan.asked == list(range(total)) and plan.after == total  # every step at its own rate
    assert float(session.optimizer.learning_rate.item()) == pytest.approx(1e-3 / total)
    saved = [s for s in range(1, total + 1) if s % 3 == 0]
    assert evaluator.measured == [0] + saved  # the base model's, then before each segment's checkpoint
    assert [s[0] for s in reporter.steps] == list(range(1, total + 1))
    assert session.progress.global_step == total and len(session.progress.recent_losses) == total
    assert runtime.boundaries == list(range(total))  # one look before every step
    assert runtime.not_training_s == [s[3] for s in reporter.steps] and runtime.not_training_s[0] > 0
    assert checkpointer.saved == saved
    assert runtime.accounts[0] is False and runtime.accounts[-1] is True  # loading is not training


def test_a_stop_at_a_boundary_leaves_the_state_at_that_step(session):
    runtime = ScriptedRuntime(stop_at=3)
    reporter = RecordingReporter(runtime, session.progress)
    stop = loop(session, runtime, RecordingEvaluator(session.progress), RecordingCheckpointer(session.progress, 100),
                reporter, lambda: False, RecordingPlan())
    assert stop == Stop("stopped", "asked") and session.progress.global_step == 3
    assert [s[0] for s in reporter.steps] == [1, 2, 3]


def test_an_abort_between_micro_batches_leaves_the_model_at_the_last_boundary(session):
    runtime = ScriptedRuntime()
    reporter = RecordingReporter(runtime, session.progress)
    before = {k: np.array(v) for k, v in tree_flatten(session.model.trainable_parameters())}
    moments = {k: np.array(v) for k, v in tree_flatten(session.optimizer.state)}
    assert session.cfg.train.grad_accumulation_steps > 1  # so there is a "between"
    loop(session, runtime, RecordingEvaluator(session.progress), RecordingCheckpointer(session.progress, 100),
         reporter, lambda: True, RecordingPlan())
    assert reporter.steps == [] and session.progress.global_step == 0
    assert runtime.boundaries == [0, 0]  # the second look decides what the stop means
    for key, value in tree_flatten(session.model.trainable_parameters()):
        assert np.array_equal(np.array(value), before[key]), key
    for key, value in tree_flatten(session.optimizer.state):
        assert key not in moments or np.array_equal(np.array(value), moments[key]), key
