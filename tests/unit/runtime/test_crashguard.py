"""Tests for daemon.crashguard: the start sequences a user would see under launchd
(crash loops, progress, clean exits, exit 75, configuration errors) and the files kept."""

from __future__ import annotations

import json

import pytest

from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.crashguard import (
    StartRecord,
    begin_start,
    clear_failure,
    config_hash,
    decide,
    read_failure,
    read_start_record,
    record_clean_exit,
    record_failure,
    record_progress,
)

LIMIT = 3
HASH = config_hash("[train]\nepochs = 1\n", [])
OTHER_HASH = config_hash("[train]\nepochs = 2\n", [])


class Launchd:
    """Starts the 'daemon' the way launchd would: one start after another, each given a
    new pid and time; returns what the crash guard tells the start."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.run = RunDir(run_dir)
        self.pid = 1000
        self.now = 1_700_000_000.0

    def start(self, hash_: str = HASH) -> tuple[int, str | None]:
        self.pid += 1
        self.now += 10.0
        crashes = begin_start(self.run, self.pid, self.now)
        return crashes, decide(self.run, crashes, LIMIT, hash_)


@pytest.fixture
def launchd(tmp_path):
    return Launchd(tmp_path)


def test_three_crashes_in_a_row_fail_the_fourth_start(launchd):
    assert launchd.start() == (0, None)   # crashes (no record_clean_exit, no progress)
    assert launchd.start() == (1, None)
    assert launchd.start() == (2, None)
    crashes, reason = launchd.start()
    assert crashes == 3
    assert reason == "crashed 3 times in a row without completing a step"


def test_the_fourth_start_records_failed_and_later_starts_repeat_it(launchd):
    for _ in range(3):
        launchd.start()
    _, reason = launchd.start()
    assert read_failure(launchd.run) is None
    record_failure(launchd.run, reason, "crash_loop", HASH, launchd.now)
    record_clean_exit(launchd.run, 0)  # exit 0: launchd stops restarting

    # A manual start (or launchd's next calendar start) with the same config: still failed.
    crashes, again = launchd.start()
    assert crashes == 0
    assert again.startswith("the crash loop recorded at ")
    assert again.endswith("has an unchanged configuration: crashed 3 times in a row without completing a step")
    assert read_failure(launchd.run)["reason"] == reason  # not re-recorded, not nested
    record_clean_exit(launchd.run, 0)

    # The user changes the config: the failure is cleared and a fresh count begins.
    assert launchd.start(OTHER_HASH) == (0, None)
    assert read_failure(launchd.run) is None


def test_clearing_a_crash_loop_on_config_change_resets_the_count(launchd):
    for _ in range(4):
        crashes, reason = launchd.start()
    record_failure(launchd.run, reason, "crash_loop", HASH, launchd.now)  # the start then died uncleanly
    crashes, reason = launchd.start(OTHER_HASH)
    assert (crashes, reason) == (4, None)  # config changed: not failed at once
    assert read_start_record(launchd.run).crashes_in_a_row == 0
    assert launchd.start(OTHER_HASH) == (1, None)  # that start crashed too: one, not five


def test_progress_resets_the_count(launchd):
    launchd.start()
    launchd.start()
    assert launchd.start() == (2, None)
    record_progress(launchd.run)  # a step completed, then it crashed
    assert read_start_record(launchd.run).crashes_in_a_row == 0
    assert launchd.start() == (0, None)
    assert launchd.start() == (1, None)


@pytest.mark.parametrize("code", [0, 78])
def test_clean_exits_do_not_count(launchd, code):
    for _ in range(6):
        crashes, reason = launchd.start()
        assert (crashes, reason) == (0, None)
        record_clean_exit(launchd.run, code)  # e.g. outside the window, budget spent


def test_clean_exit_breaks_a_run_of_crashes(launchd):
    launchd.start()
    launchd.start()
    record_clean_exit(launchd.run, 0)
    assert launchd.start() == (0, None)


def test_exit_75_without_progress_counts(launchd):
    for expected in range(3):
        assert launchd.start() == (expected, None)
        record_clean_exit(launchd.run, 75)  # e.g. out of memory before the first step
    _, reason = launchd.start()
    assert reason == "crashed 3 times in a row without completing a step"


def test_exit_75_after_progress_does_not_count(launchd):
    for _ in range(5):
        assert launchd.start() == (0, None)
        record_progress(launchd.run)
        record_clean_exit(launchd.run, 75)  # out of memory after some steps: retry is right


def test_an_unexpected_exit_code_is_still_a_crash(launchd):
    launchd.start()
    record_clean_exit(launchd.run, 1)
    record = read_start_record(launchd.run)
    assert (record.clean_exit, record.exit_code) == (False, 1)
    assert launchd.start() == (1, None)


def test_config_error_same_hash_fails_at_once_different_hash_clears(launchd):
    launchd.start()
    record_failure(launchd.run, "daemon.window = '25:00': expected HH:MM-HH:MM", "config", HASH, launchd.now)
    record_clean_exit(launchd.run, 78)  # launchd restarts on 78

    crashes, reason = launchd.start()
    assert crashes == 0
    assert reason.startswith("the configuration error recorded at ")
    assert reason.endswith(" is unchanged: daemon.window = '25:00': expected HH:MM-HH:MM")
    record_clean_exit(launchd.run, 0)

    assert launchd.start(OTHER_HASH) == (0, None)  # the user fixed the config
    assert read_failure(launchd.run) is None
    assert not (launchd.run_dir / "state" / "failure.json").exists()


def test_start_record_file(tmp_path):
    crashes = begin_start(RunDir(tmp_path), 4321, 1234.5, step_at_start=16)
    assert crashes == 0
    path = tmp_path / "state" / "starts.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert read_start_record(RunDir(tmp_path)) == StartRecord(crashes_in_a_row=0, step_at_start=16, clean_exit=False,
                                                      pid=4321, started_at=1234.5)
    record_progress(RunDir(tmp_path))
    record_clean_exit(RunDir(tmp_path), 0)
    data = json.loads(path.read_text())
    assert data == {"crashes_in_a_row": 0, "step_at_start": 16, "clean_exit": True, "pid": 4321,
                    "started_at": 1234.5, "progressed": True, "exit_code": 0}
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["starts.json"]  # no temporaries left


def test_damaged_start_record_counts_as_no_history(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "starts.json").write_text('{"crashes_in_a_row": "many"}')
    assert read_start_record(RunDir(tmp_path)) is None
    assert begin_start(RunDir(tmp_path), 1, 1.0) == 0


def test_progress_and_exit_without_a_start_do_nothing(tmp_path):
    record_progress(RunDir(tmp_path))
    record_clean_exit(RunDir(tmp_path), 0)
    assert not (tmp_path / "state").exists()


def test_failure_file_round_trip(tmp_path):
    assert read_failure(RunDir(tmp_path)) is None
    record_failure(RunDir(tmp_path), "bad", "config", None, 5.0)
    assert read_failure(RunDir(tmp_path)) == {"reason": "bad", "kind": "config", "config_hash": None, "at": 5.0}
    assert (tmp_path / "state" / "failure.json").stat().st_mode & 0o777 == 0o600
    clear_failure(RunDir(tmp_path))
    clear_failure(RunDir(tmp_path))
    assert read_failure(RunDir(tmp_path)) is None
    with pytest.raises(ValueError, match="failure kind"):
        record_failure(RunDir(tmp_path), "bad", "oops", None, 5.0)
    (tmp_path / "state" / "failure.json").write_text("{broken")
    assert read_failure(RunDir(tmp_path)) is None


def test_config_hash():
    base = config_hash("[lora]\nrank = 8\n", ["train.seed=1"])
    assert base == config_hash("[lora]\nrank = 8\n", ["train.seed=1"])
    assert len(base) == 64 and int(base, 16) >= 0
    assert base != config_hash("[lora]\nrank = 16\n", ["train.seed=1"])
    assert base != config_hash("[lora]\nrank = 8\n", [])
    assert config_hash("", []) != config_hash(None, [])  # empty file vs. no file
    assert config_hash(None, ["a=1", "a=2"]) != config_hash(None, ["a=2", "a=1"])  # the last --set wins
    assert config_hash("a", ["b"]) != config_hash("ab", [])
