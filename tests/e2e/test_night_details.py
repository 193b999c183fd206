"""Details of a night, with the real daemon process: the budget-sized learning-rate
schedule under frequent restarts (SIGKILL), and `status` of a daemon stopped by SIGSTOP.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import psutil
import pytest

from mathlora_daemon.training.lr import ESTIMATE_AFTER, LRSchedule

from runs import cli, copy, events, finish, kill_at, start, step_logged, tiny_config, wait_for

# 800 planned steps and a 20 s budget: the budget ends the run long before its steps
# (a tiny step costs ~0.4 s of budget with its checkpoints and evaluations here), yet
# leaves room for the ESTIMATE_AFTER + 1 steps that size the schedule even on a slow,
# shared machine (up to ~0.9 s a step).
BUDGET_BOUND = ("--set", "train.epochs=100", "--set", f"daemon.budget_hours={20 / 3600}")
FIX_STEP = ESTIMATE_AFTER + 1  # after step k the budget holds the steps up to k - 1


def lrs(run: Path) -> list[tuple[int, float]]:
    """Every (step, lr) the run logged, re-done steps included."""
    return [(e["step"], e["lr"]) for e in events(run, "train.step")]


def test_a_budget_bound_schedule_is_sized_at_the_same_step_however_often_the_run_is_killed(template_dir, tmp_path):
    whole = copy(template_dir, tmp_path / "whole")
    finish(start(whole, *BUDGET_BOUND))
    assert events(whole, "budget.exhausted")

    run = copy(template_dir, tmp_path / "killed")
    # SIGKILL in the middle of steps 6, 11, 17 and 21 (each start resumes the checkpoint
    # before: 4, 8, 16, 20); the start resumed at 20 takes step 21 with no step of its
    # own timed, so it sizes the schedule from the evidence of the earlier starts alone.
    # Then once more after the schedule is fixed (step 27, back to checkpoint 24).
    for point in ("micro@6", "micro@11", "micro@17", "micro@21", "micro@27"):
        kill_at(run, point, tmp_path, *BUDGET_BOUND)
    finish(start(run, *BUDGET_BOUND))
    assert events(run, "budget.exhausted")
    assert [e["from_step"] for e in events(run, "resume")] == [4, 8, 16, 20, 24]

    (fixed,) = events(run, "train.schedule")  # sized once, kept by checkpoint 24 across the last kill
    (whole_fixed,) = events(whole, "train.schedule")
    assert fixed["step"] == whole_fixed["step"] == FIX_STEP
    assert fixed["source"] == whole_fixed["source"] == "budget"
    total = whole_fixed["total_steps"]
    assert fixed["step"] < fixed["length"] < total and whole_fixed["step"] < whole_fixed["length"] < total

    # Up to the step that sizes it, every learning rate logged (re-done steps too) is
    # the uninterrupted run's, bit for bit: the same unsized schedule.
    reference = dict(lrs(whole))
    before = [(step, lr) for step, lr in lrs(run) if step <= FIX_STEP]
    assert {step for step, _ in before} == set(range(1, FIX_STEP + 1)) and len(before) > FIX_STEP
    assert all(lr == reference[step] for step, lr in before)

    # The two lengths are not compared: each comes from measured seconds per step and
    # the budget left, and wall-clock timing on a shared machine (compiling, checkpoint
    # writes, evaluations, other processes) differs from run to run, so they may differ
    # by a few steps. What holds exactly: after the sizing step each run follows the
    # schedule of its own length, the killed one across its last restart too.
    cfg = tiny_config().train
    for r, event in ((run, fixed), (whole, whole_fixed)):
        schedule = LRSchedule(cfg.lr_schedule, cfg.learning_rate, cfg.warmup_steps, cfg.min_lr_ratio, event["length"])
        after = [(step, lr) for step, lr in lrs(r) if step > FIX_STEP]
        assert after, "the budget ended the run right at the sizing step; nothing to check after it"
        for step, lr in after:  # step k is taken at 0-based index k - 1; logged in float32
            assert lr == pytest.approx(schedule(step - 1), rel=1e-6), (r.name, step)


def test_status_says_a_sigstopped_daemon_is_suspended_and_how_to_resume_it(template_dir, tmp_path):
    run = copy(template_dir, tmp_path / "run")
    proc = start(run)
    wait_for(step_logged(run, 2), proc, "step 2")
    proc.send_signal(signal.SIGSTOP)
    try:
        # The stop reaches every thread asynchronously: wait until the kernel says so.
        wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED, proc, "the stop")
        shown = cli("status", run=run)
        assert shown.returncode == 0, shown.stderr
        head = shown.stdout.splitlines()[0]
        assert head.startswith(f"state      running (pid {proc.pid})"), shown.stdout
        assert head.endswith(f"SUSPENDED (SIGSTOP or Ctrl-Z; `kill -CONT {proc.pid}` resumes it)"), shown.stdout
        as_json = cli("status", "--json", run=run)
        assert json.loads(as_json.stdout)["suspended"] is True and "eta_at" not in json.loads(as_json.stdout)
    finally:
        proc.send_signal(signal.SIGCONT)
    finish(proc)
    after = cli("status", run=run)
    assert after.stdout.startswith("state      finished") and "SUSPENDED" not in after.stdout
