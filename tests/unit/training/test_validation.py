"""The Evaluator (training/validation.py): when a validation pass runs, what it keeps, when it
asks for the early stop, and what a stop during the pass leaves; told through a recording
Reporter, with a scripted validation pass (the real pass is measured in tests/e2e)."""

from __future__ import annotations

from contextlib import contextmanager

from mathlora_daemon.runtime.signals import Interrupted
from mathlora_daemon.training.checkpointing import Progress
from mathlora_daemon.training.validation import Evaluator


class RecordingReporter:
    def __init__(self):
        self.phases, self.evals, self.deferred = [], [], []

    def on_phase(self, phase):
        self.phases.append(phase)

    def on_eval(self, result, best):
        self.evals.append((result["loss"], best))

    def on_eval_deferred(self, step, reason):
        self.deferred.append((step, reason))


def scripted(losses):
    """A validation pass that returns the next loss of `losses` each time it is called."""
    calls = iter(losses)
    return lambda: {"loss": next(calls), "tokens": 10, "sequences": 2, "seconds": 0.01}


def test_each_step_is_measured_once_and_the_base_is_not_a_candidate():
    progress, reporter = Progress(), RecordingReporter()
    evaluator = Evaluator(progress, scripted([2.0, 1.5, 9.9]), reporter, early_stop_evals=0, on_early_stop=None)
    evaluator.measure()  # step 0: the base model
    progress.global_step = 5
    evaluator.measure()
    evaluator.measure()  # the same step again: nothing runs (the scripted 9.9 is never read)
    assert reporter.evals == [(2.0, False), (1.5, True)]
    assert progress.base_eval_loss == 2.0 and (progress.best_eval_step, progress.best_eval_loss) == (5, 1.5)
    assert reporter.phases == ["evaluating", "evaluating"]


def test_the_early_stop_comes_after_the_set_number_of_evaluations_without_a_new_best():
    progress, reporter, stops = Progress(), RecordingReporter(), []
    evaluator = Evaluator(progress, scripted([2.0, 1.0, 1.1, 1.2]), reporter, early_stop_evals=2,
                          on_early_stop=stops.append)
    for step in (0, 10, 20):
        progress.global_step = step
        evaluator.measure()
    assert stops == [] and progress.stopped_early is None
    progress.global_step = 30
    evaluator.measure()
    assert len(stops) == 1 and stops[0] == progress.stopped_early
    assert "2 evaluations" in stops[0] and "at step 10" in stops[0]


def test_a_stop_during_the_pass_leaves_it_pending_and_the_next_measure_takes_it():
    progress, reporter = Progress(global_step=7), RecordingReporter()
    interrupt = [True]

    @contextmanager
    def interruptible():
        yield
        if interrupt[0]:
            raise Interrupted("stop requested")

    evaluator = Evaluator(progress, scripted([1.4, 1.3]), reporter, early_stop_evals=0, on_early_stop=None,
                          interruptible=interruptible)
    evaluator.measure()
    assert progress.eval_pending and progress.eval_step is None and reporter.evals == []
    assert reporter.deferred == [(7, "stop requested")]
    interrupt[0] = False
    evaluator.measure()  # the next start: the same step, measured now
    assert not progress.eval_pending and progress.eval_step == 7 and reporter.evals == [(1.3, True)]


def test_without_a_validation_pass_nothing_is_measured_and_nothing_stays_pending():
    progress = Progress(global_step=3, eval_pending=True)
    reporter = RecordingReporter()
    Evaluator(progress, None, reporter, early_stop_evals=1, on_early_stop=None).measure()
    assert not progress.eval_pending and reporter.phases == [] and reporter.evals == []
