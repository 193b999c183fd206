"""Tests for daemon.budget: awake time vs. sleep on fake clocks, the budget arithmetic,
and reading the used seconds back from a run directory's heartbeat and checkpoints."""

from __future__ import annotations

import json
import math

import pytest

from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.budget import AwakeClock, Budget, initial_used, read_used_seconds


class FakeClocks:
    """A monotonic and a wall clock the test moves by hand."""

    def __init__(self, mono: float = 1000.0, wall: float = 1_700_000_000.0):
        self.mono, self.wall = mono, wall

    def awake(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def sleep(self, seconds: float) -> None:  # the Mac sleeps: only the wall clock runs
        self.wall += seconds

    def clock(self, **kwargs) -> AwakeClock:
        return AwakeClock(monotonic=lambda: self.mono, wall=lambda: self.wall, **kwargs)


# --- AwakeClock -------------------------------------------------------------------------

def test_first_tick_measures_from_construction_and_awake_time_accumulates():
    clocks = FakeClocks()
    clock = clocks.clock()
    clocks.awake(12.5)
    assert clock.tick() == (12.5, 0.0)
    total = 0.0
    for _ in range(4):
        clocks.awake(10.0)
        awake, slept = clock.tick()
        total += awake
        assert slept == 0.0
    assert total == 40.0
    assert clock.tick() == (0.0, 0.0)


def test_an_hour_of_sleep_is_reported_and_not_counted_as_awake():
    clocks = FakeClocks()
    clock = clocks.clock()
    clocks.awake(5.0)
    clocks.sleep(3600.0)
    clocks.awake(7.0)
    assert clock.tick() == (12.0, 3600.0)
    clocks.awake(1.0)
    assert clock.tick() == (1.0, 0.0)  # the sleep is reported once


@pytest.mark.parametrize("skew", [0.5, 29.0, 30.0])
def test_skew_up_to_the_threshold_is_not_sleep(skew):
    clocks = FakeClocks()
    clock = clocks.clock()
    clocks.awake(60.0)
    clocks.wall += skew  # an NTP step forward or timer jitter
    assert clock.tick() == (60.0, 0.0)


def test_threshold_is_configurable():
    clocks = FakeClocks()
    clock = clocks.clock(sleep_threshold_s=5.0)
    clocks.sleep(6.0)
    assert clock.tick() == (0.0, 6.0)


def test_wall_clock_going_backwards_is_no_sleep_and_never_negative():
    clocks = FakeClocks()
    clock = clocks.clock()
    clocks.awake(10.0)
    clocks.wall -= 3600.0  # NTP steps the clock back an hour
    assert clock.tick() == (10.0, 0.0)
    clocks.awake(10.0)  # measured from the stepped-back wall time: still no phantom sleep
    assert clock.tick() == (10.0, 0.0)


def test_real_clocks_by_default():
    clock = AwakeClock()
    awake, slept = clock.tick()
    assert 0.0 <= awake < 5.0 and slept == 0.0


# --- Budget ----------------------------------------------------------------------------

def test_budget_left_and_exhausted():
    budget = Budget(total_s=100.0)
    assert (budget.used_s, budget.left_s, budget.exhausted) == (0.0, 100.0, False)
    budget.add(60.0)
    assert (budget.left_s, budget.exhausted) == (40.0, False)
    budget.add(40.0)
    assert (budget.left_s, budget.exhausted) == (0.0, True)
    budget.add(5.0)
    assert budget.used_s == 105.0 and budget.left_s == 0.0 and budget.exhausted


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_budget_never_refunds(bad):
    budget = Budget(total_s=10.0, used_s=3.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        budget.add(bad)
    assert budget.used_s == 3.0


@pytest.mark.parametrize("heartbeat, checkpoint, expected", [
    (None, None, 0.0),
    (120.0, None, 120.0),
    (None, 90.0, 90.0),
    (120.0, 90.0, 120.0),   # crashed after the checkpoint: the extra 30 s stay spent
    (80.0, 90.0, 90.0),     # heartbeat older than the checkpoint
    (-5.0, 90.0, 90.0),     # a damaged value is ignored
    (math.nan, None, 0.0),
])
def test_initial_used_takes_the_larger_known_value(heartbeat, checkpoint, expected):
    assert initial_used(heartbeat, checkpoint) == expected


# --- read_used_seconds -----------------------------------------------------------------

def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))


def checkpoint(run_dir, step, train_seconds, manifest=True):
    directory = run_dir / "checkpoints" / f"step-{step:08d}"
    write_json(directory / "trainer_state.json", {"global_step": step, "train_seconds": train_seconds})
    if manifest:
        write_json(directory / "MANIFEST.json", {"step": step})
    return directory


def test_read_used_seconds_from_heartbeat_and_newest_checkpoint(tmp_path):
    write_json(tmp_path / "state" / "status.json", {"pid": 1, "phase": "training", "budget_used_s": 5400.5})
    checkpoint(tmp_path, 8, 1200.0)
    checkpoint(tmp_path, 16, 2400.0)
    checkpoint(tmp_path, 24, 3600.0, manifest=False)  # killed mid-save: not a checkpoint
    (tmp_path / "checkpoints" / ".tmp-step-00000032").mkdir()
    assert read_used_seconds(RunDir(tmp_path)) == (5400.5, 2400.0)


def test_read_used_seconds_skips_a_checkpoint_whose_state_does_not_parse(tmp_path):
    checkpoint(tmp_path, 8, 1200.0)
    broken = checkpoint(tmp_path, 16, 2400.0)
    write_json(broken / "trainer_state.json", "{truncated")
    assert read_used_seconds(RunDir(tmp_path)) == (None, 1200.0)


def test_step_order_is_numeric_not_by_mtime(tmp_path):
    checkpoint(tmp_path, 100, 1000.0)
    checkpoint(tmp_path, 99, 990.0)  # written later
    assert read_used_seconds(RunDir(tmp_path))[1] == 1000.0


@pytest.mark.parametrize("status", ["{not json", "[1, 2]", {"budget_used_s": "lots"}, {"budget_used_s": True},
                                    {"phase": "idle"}])
def test_unusable_heartbeat_gives_none(tmp_path, status):
    write_json(tmp_path / "state" / "status.json", status)
    assert read_used_seconds(RunDir(tmp_path)) == (None, None)


def test_empty_run_dir(tmp_path):
    assert read_used_seconds(RunDir(tmp_path)) == (None, None)
    assert read_used_seconds(RunDir(tmp_path / "missing")) == (None, None)
    assert list(tmp_path.iterdir()) == []
