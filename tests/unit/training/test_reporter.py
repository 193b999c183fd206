"""The progress bar's expected end of training: the earliest of the steps left at the
current speed, the budget and the window, and which of them it is."""

from datetime import datetime

from mathlora_daemon.training.reporter import expected_end

NOW = datetime(2026, 12, 1, 23, 0).timestamp()


def test_the_steps_end_training_when_they_run_out_first():
    end, limit = expected_end(NOW, steps_left=1000, step_s=2.0, budget_left_s=16 * 3600, window_end=None)
    assert (end, limit) == (datetime(2026, 12, 1, 23, 33, 20), "steps")


def test_the_budget_or_the_window_when_either_comes_first():
    end, limit = expected_end(NOW, steps_left=100_000, step_s=2.0, budget_left_s=3600, window_end=None)
    assert (end, limit) == (datetime(2026, 12, 2, 0, 0), "budget")
    end, limit = expected_end(NOW, steps_left=100_000, step_s=2.0, budget_left_s=16 * 3600,
                              window_end=datetime(2026, 12, 2, 7, 0))
    assert (end, limit) == (datetime(2026, 12, 2, 7, 0), "window")


def test_nothing_known_yet():
    assert expected_end(NOW, None, None, float("inf"), None) == (None, None)
    end, limit = expected_end(NOW, steps_left=10, step_s=None, budget_left_s=60, window_end=None)
    assert limit == "budget"
