"""The overnight runtime, end to end: the real CLI and real daemon processes.

Signals, pause/resume/stop, the budget across restarts, the window, the lock, the
crash-loop guard, memory thresholds, hot reload, and `status` in every state.
"""

from __future__ import annotations

import json
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path

from mathlora_checkpoints.store import list_checkpoints
from mathlora_daemon.config import to_toml

from runs import (
    assert_matches_reference,
    cli,
    copy,
    events,
    finish,
    hold,
    kill_at,
    start,
    step_logged,
    tiny_config,
    wait_for,
)

LONG = ("--set", "train.epochs=200")  # 1600 steps: runs until the test stops it


def status(run: Path) -> dict:
    result = cli("status", "--json", run=run)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def event_logged(run: Path, name: str, after: int = 0):
    return lambda: len(events(run, name)) > after


def write_config(run: Path, **daemon_fields) -> None:
    cfg = tiny_config()
    for key, value in daemon_fields.items():
        setattr(cfg.daemon, key, value)
    (run / "mathlora.toml").write_text(to_toml(cfg))


def test_sigterm_checkpoints_at_the_step_boundary_exits_0_and_the_resume_is_exact(template_dir, reference, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    proc = start(run)
    wait_for(step_logged(run, 5), proc, "step 5")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    finish(proc, expect=0)
    measured = time.monotonic() - sent
    stop = events(run, "daemon.stop")[-1]
    assert stop["reason"] == "signal SIGTERM" and stop["exit_code"] == 0
    assert 0 <= stop["signal_to_exit_s"] <= measured
    assert events(run, "signal.received")[-1]["signal"] == "SIGTERM"
    last_step = events(run, "train.step")[-1]["step"]
    assert list_checkpoints(run / "checkpoints")[-1].step == last_step  # nothing trained is lost
    assert status(run)["state"] == "stopped"

    finish(start(run))  # the next start resumes and ends exactly where an uninterrupted run does
    assert events(run, "resume")[-1]["from_step"] == last_step
    assert_matches_reference(run, reference)
    assert status(run)["state"] == "finished"


def test_pause_resume_and_stop_from_the_cli_while_running(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    assert cli("pause", run=run).returncode == 1  # no daemon: nothing to pause, nothing written
    assert not (run / "state" / "control.json").exists()

    proc = start(run, *LONG)
    wait_for(step_logged(run, 3), proc, "step 3")
    assert status(run)["state"] == "running"
    assert cli("pause", run=run).returncode == 0
    wait_for(lambda: status(run)["state"] == "paused", proc, "paused")
    paused_at = status(run)["step"]
    assert list_checkpoints(run / "checkpoints")[-1].step == paused_at  # a pause checkpoints first
    assert "resume" in status(run)["reason"]

    assert cli("resume", run=run).returncode == 0
    wait_for(step_logged(run, paused_at + 2), proc, "training after resume")
    assert [e["event"] for e in events(run) if e["event"].startswith("control.")] == ["control.pause",
                                                                                       "control.resume"]
    assert cli("stop", run=run).returncode == 0
    finish(proc, expect=0)
    final = status(run)
    assert final["state"] == "stopped" and final["reason"] == "stopped by the user"
    assert list_checkpoints(run / "checkpoints")[-1].step == events(run, "train.step")[-1]["step"]


def test_a_tiny_budget_is_spent_across_three_restarts_and_never_exceeded(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    budget_s = 20.0  # room for the first two starts' 8 steps even on a loaded machine
    args = (*LONG, "--set", f"daemon.budget_hours={budget_s / 3600!r}")
    for _ in range(2):  # two starts stopped by SIGTERM before the budget is spent
        proc = start(run, *args)
        done = len(events(run, "train.step"))
        wait_for(lambda: len(events(run, "train.step")) >= done + 4, proc, "four more steps")
        proc.send_signal(signal.SIGTERM)
        finish(proc, expect=0)
    finish(start(run, *args), expect=0)  # the third spends the rest
    assert len(events(run, "budget.exhausted")) == 1
    steps = events(run, "train.step")
    trained = sum(e["step_s"] for e in steps)
    assert trained <= budget_s + max(e["step_s"] for e in steps)  # at most one step over
    assert len(events(run, "resume")) == 2
    final = status(run)
    assert final["state"] == "budget_exhausted" and final["budget_used_s"] >= budget_s
    assert (run / "adapters" / "adapters.safetensors").is_file()

    logged = events(run)
    err = finish(start(run, *args), expect=0)  # every later start exits 0 at once, touching nothing
    assert "spent its training budget" in err and "mathlora-daemon status" in err
    assert events(run) == logged  # no model load, no second budget.exhausted, nothing at all


def _window_excluding_now() -> str:
    now = datetime.now()
    start, end = now + timedelta(hours=2), now + timedelta(hours=3)
    return f"{start:%H:%M}-{end:%H:%M}"


def test_started_outside_the_window_it_exits_0_at_once(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    window = _window_excluding_now()
    finish(start(run, "--set", f"daemon.window={window}"), expect=0)
    assert [e["window"] for e in events(run, "schedule.outside_window")] == [window]
    assert not events(run, "model.load.start")
    assert status(run)["state"] == "stopped" and window in status(run)["reason"]


def test_config_edits_while_running_apply_safe_fields_and_reject_the_rest_then_the_window_ends(template_dir,
                                                                                              tmp_path):
    run = copy(template_dir, tmp_path / "run")
    proc = start(run, *LONG)
    wait_for(step_logged(run, 3), proc, "step 3")

    cfg = tiny_config()
    cfg.lora.rank = 16  # not safe while training: rejected, training goes on
    (run / "mathlora.toml").write_text(to_toml(cfg))
    wait_for(event_logged(run, "config.rejected"), proc, "config.rejected")
    assert events(run, "config.rejected")[-1]["fields"] == ["lora.rank"]
    at_rejection = events(run, "train.step")[-1]["step"]
    wait_for(step_logged(run, at_rejection + 2), proc, "training after a rejected edit")

    window = _window_excluding_now()
    write_config(run, window=window)  # safe: applied, and the window has now ended
    finish(proc, expect=0)
    reloaded = events(run, "config.reloaded")
    assert reloaded and reloaded[-1]["changes"]["daemon.window"] == ["", window]
    assert events(run, "schedule.outside_window")
    assert list_checkpoints(run / "checkpoints")[-1].step == events(run, "train.step")[-1]["step"]
    assert status(run)["state"] == "stopped"


def test_the_memory_limit_and_the_sleep_inhibitor_follow_the_config_while_running(template_dir, tmp_path):
    """Both keys are declared reloadable: an edit to the file reaches MLX's limit and the
    inhibitor at the next step boundary, and editing them back undoes it."""
    run = copy(template_dir, tmp_path / "run")
    proc = start(run, *LONG)
    wait_for(step_logged(run, 2), proc, "step 2")
    write_config(run, memory_limit_gb=3.0, prevent_sleep=True)
    wait_for(event_logged(run, "power.prevent_sleep"), proc, "the inhibitor started")
    limits = [e for e in events(run, "memory.limits") if e.get("reloaded")]
    assert limits and limits[-1]["memory_limit_gb"] == 3.0
    reloaded = events(run, "config.reloaded")[-1]["changes"]
    assert reloaded["daemon.memory_limit_gb"] == [0.0, 3.0] and reloaded["daemon.prevent_sleep"] == [False, True]
    write_config(run, memory_limit_gb=0.0, prevent_sleep=False)
    wait_for(event_logged(run, "power.allow_sleep"), proc, "the inhibitor stopped")
    limits = [e for e in events(run, "memory.limits") if e.get("reloaded")]
    assert limits[-1]["memory_limit_gb"] == 0.0 and limits[-1]["previous_memory_limit_bytes"] == 3 * 2**30
    proc.send_signal(signal.SIGTERM)
    finish(proc, expect=0)


def saved_after_reload(run: Path) -> list[int]:
    """The steps of the checkpoints saved after the last config.reloaded, in log order."""
    log = events(run)
    last = max(i for i, e in enumerate(log) if e["event"] == "config.reloaded")
    return [e["step"] for e in log[last:] if e["event"] == "checkpoint.saved"]


def test_the_checkpoint_cadence_retention_segment_and_budget_follow_the_config_while_running(template_dir, tmp_path):
    """The other reloadable keys, each seen acting on the running daemon: a checkpoint
    every step, more of them kept, a checkpoint at every (tiny) segment's end with the
    step cadence off, then a budget lowered below what was used ends the run."""
    run = copy(template_dir, tmp_path / "run")
    proc = start(run, *LONG)
    wait_for(step_logged(run, 2), proc, "step 2")
    write_config(run, checkpoint_every_steps=1, keep_checkpoints=6)
    wait_for(event_logged(run, "config.reloaded"), proc, "the first reload")
    wait_for(lambda: len(saved_after_reload(run)) >= 8, proc, "eight checkpoints after the reload")
    saved = saved_after_reload(run)
    assert saved[:8] == list(range(saved[0], saved[0] + 8))  # one at every step
    assert 6 <= len(list_checkpoints(run / "checkpoints")) <= 7  # the newest six (and the best), not two
    write_config(run, checkpoint_every_steps=0, keep_checkpoints=6, segment_minutes=0.0005)
    wait_for(lambda: len(events(run, "config.reloaded")) >= 2, proc, "the second reload")
    changes = events(run, "config.reloaded")[-1]["changes"]
    assert changes["daemon.segment_minutes"] == [10.0, 0.0005] and changes["daemon.checkpoint_every_steps"] == [1, 0]
    wait_for(lambda: len(saved_after_reload(run)) >= 3, proc, "checkpoints at the ends of 0.03 s segments")
    used = json.loads((run / "state" / "status.json").read_text())["budget_used_s"]
    write_config(run, checkpoint_every_steps=0, keep_checkpoints=6, segment_minutes=0.0005,
                 budget_hours=used / 2 / 3600)
    finish(proc, expect=0)
    assert events(run, "config.reloaded")[-1]["changes"]["daemon.budget_hours"][1] == used / 2 / 3600
    assert events(run, "budget.exhausted") and status(run)["state"] == "budget_exhausted"


def test_a_second_daemon_refuses_touching_nothing_and_a_killed_one_shows_as_crashed(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    first = hold(run, "micro@3", tmp_path, *LONG)
    running = status(run)
    assert running["state"] == "running" and running["pid"] == first.pid

    def files() -> dict:
        # The first daemon's heartbeat thread goes on rewriting its status.json while it
        # is held; every other byte in the run directory must stay as it was.
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "status.json"}

    before = files()
    second = cli("run", run=run)
    assert second.returncode == 75
    assert f"pid {first.pid}" in second.stderr
    # Pruning could remove the very checkpoint the daemon resumes from: only under the lock.
    pruned = cli("checkpoints", "prune", "--keep", "1", run=run)
    assert pruned.returncode == 75 and f"pid {first.pid}" in pruned.stderr and "stop it first" in pruned.stderr
    assert files() == before
    assert not (run / "state" / "control.json").exists()

    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    crashed = status(run)
    assert crashed["state"] == "crashed" and str(first.pid) in crashed["crashed_reason"]
    human = cli("status", run=run).stdout
    assert "crashed" in human and "None" not in human


def test_starts_that_crash_before_a_step_stop_the_restart_loop(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    for _ in range(3):  # each start is killed before completing its first step
        kill_at(run, "micro@1", tmp_path)
    finish(start(run), expect=0)  # the fourth records `failed` and exits 0: launchd stops
    failed = events(run, "daemon.failed")
    assert len(failed) == 1 and "crashed 3 times in a row" in failed[0]["reason"]
    assert not events(run, "train.step")
    st = status(run)
    assert st["state"] == "failed" and "crashed 3 times" in st["reason"]
    finish(start(run), expect=0)  # still failed, still exit 0 at once
    assert len(events(run, "model.load.start")) == 3


def test_a_config_error_repeated_unchanged_exits_0_then_a_fix_runs(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    good = (run / "mathlora.toml").read_text()
    (run / "mathlora.toml").write_text(good.replace("rank = 4", "rank = 0"))
    first = finish(start(run), expect=78)
    assert "lora.rank = 0" in first
    second = finish(start(run), expect=0)  # launchd restarts it: the same error, recorded, exit 0
    assert "unchanged" in second and "lora.rank = 0" in second
    st = status(run)
    assert st["state"] == "failed" and "lora.rank" in st["reason"]
    (run / "mathlora.toml").write_text(good)
    finish(start(run, "--set", "train.max_steps=2"), expect=0)
    assert status(run)["state"] == "finished"


def test_memory_below_the_warning_threshold_warns_and_goes_on(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    finish(start(run, "--set", "train.max_steps=3", "--set", "daemon.memory_warning_available_gb=4000",
                 "--set", "daemon.memory_critical_available_gb=0"))
    warning = events(run, "memory.warning")
    assert warning and warning[0]["level"] == "warning" and warning[0]["sys_available_gb"] > 0
    steps = events(run, "train.step")
    assert len(steps) == 3
    for e in steps:
        assert {"mem_active_gb", "mem_peak_gb", "rss_gb", "sys_available_gb", "swap_used_gb"} <= e.keys()


def test_critical_memory_pauses_in_process_until_it_recovers(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    write_config(run, memory_warning_available_gb=4000.0, memory_critical_available_gb=4000.0)
    proc = start(run, "--set", "train.max_steps=3")
    wait_for(event_logged(run, "memory.critical"), proc, "memory.critical")
    wait_for(lambda: status(run)["state"] == "waiting", proc, "waiting")
    assert "memory is low" in status(run)["reason"]
    assert not events(run, "train.step")

    write_config(run, memory_warning_available_gb=0.0, memory_critical_available_gb=0.0)  # hot reload
    finish(proc, expect=0)
    assert events(run, "config.reloaded") and events(run, "memory.recovered")
    assert len(events(run, "train.step")) == 3
    assert status(run)["state"] == "finished"


def test_logs_command_filters_and_prints_raw_json(reference):
    run = reference["dir"]
    saved = cli("logs", "--event", "checkpoint.saved", "-n", "2", "--json", run=run)
    lines = [json.loads(line) for line in saved.stdout.splitlines()]
    assert [e["step"] for e in lines] == [28, 32] and all(e["event"] == "checkpoint.saved" for e in lines)
    human = cli("logs", "--event", "train", "-n", "3", run=run).stdout.splitlines()
    assert len(human) == 3 and all(" train." in line for line in human)
    assert cli("logs", "--level", "error", run=run).stdout.strip() == ""
