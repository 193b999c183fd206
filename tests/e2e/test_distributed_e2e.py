"""Data-parallel training with real processes: two ranks of `mathlora-daemon run` on the
ring backend over loopback, started by the real `mlx.launch` or, where a test must reach
one rank (to kill it, signal it or give it other arguments), exactly as mlx.launch
starts them (MLX_RANK + MLX_HOSTFILE).

The job: the tiny run with 2 sequences per micro-batch and 4 micro-batches per step, so
each of 2 ranks computes 2 whole micro-batches a step (and a stop can fall between them),
16 steps, dropout 0.1, a checkpoint every 4 steps.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mathlora_checkpoints.store import newest_checkpoint
from mathlora_daemon.config import to_toml

from runs import (
    DEADLINE_S,
    cli,
    copy,
    events,
    finish,
    finish_all,
    make_tiny_run,
    mlx_launch,
    sha,
    start,
    start_ranks,
    step_logged,
    stop_step,
    tiny_config,
    wait_for,
)

STEPS = 16


def job_config():
    cfg = tiny_config()
    cfg.train.batch_size, cfg.train.grad_accumulation_steps, cfg.train.epochs = 2, 4, 2
    return cfg


@pytest.fixture(scope="module")
def job_template(tmp_path_factory) -> Path:
    run = make_tiny_run(tmp_path_factory.mktemp("dist") / "template")
    (run / "mathlora.toml").write_text(to_toml(job_config()))
    return run


@pytest.fixture(scope="module")
def single(job_template, tmp_path_factory) -> dict:
    """The job in one process: what two ranks must reproduce."""
    run = copy(job_template, tmp_path_factory.mktemp("single") / "run")
    finish(start(run))
    return outcome(run)


@pytest.fixture(scope="module")
def two_ranks(job_template, tmp_path_factory) -> dict:
    """The job on two ranks, uninterrupted: what a killed and restarted job must equal bit for bit."""
    tmp = tmp_path_factory.mktemp("two")
    run = copy(job_template, tmp / "run")
    trace = {"MATHLORA_TEST_TRACE_COLLECTIVES": str(tmp / "collectives")}  # each rank lists its collectives
    finish_all(start_ranks(run, 2, tmp / "hosts.json", env={0: trace, 1: trace}))
    return {**outcome(run), "collectives": [(tmp / f"collectives.{rank}").read_text().split() for rank in (0, 1)]}


def test_every_rank_calls_the_same_collectives_in_the_same_order(two_ranks):
    rank0, rank1 = two_ranks["collectives"]
    assert rank0 == rank1
    # set-up (agreement on the config, the step, rank 0's adapters and Adam state), then at
    # every boundary one look and between micro-batches the abort checks
    assert rank0.count("broadcast_arrays") == 2 and rank0.count("any_true") >= STEPS
    assert rank0.count("gather_ints") > STEPS


def outcome(run: Path) -> dict:
    return {"adapters": sha(run / "adapters" / "adapters.safetensors"),
            "weights": mx.load(str(run / "adapters" / "adapters.safetensors")),
            "losses": {e["step"]: e["loss"] for e in events(run, "train.step")}}


def assert_close_to(run: Path, reference: dict, tolerance: float) -> None:
    got = outcome(run)
    assert set(got["losses"]) == set(range(1, STEPS + 1))
    for step, loss in got["losses"].items():
        assert abs(loss - reference["losses"][step]) <= tolerance * max(1.0, abs(loss)), (step, loss)
    for key, value in reference["weights"].items():
        np.testing.assert_allclose(np.array(got["weights"][key]), np.array(value), rtol=0, atol=tolerance,
                                   err_msg=key)


def assert_bit_exact(run: Path, reference: dict) -> None:
    assert sha(run / "adapters" / "adapters.safetensors") == reference["adapters"]
    for e in events(run, "train.step"):  # every logged loss, re-done steps included
        assert e["loss"] == reference["losses"][e["step"]], e


def test_two_ranks_under_mlx_launch_train_like_one_process(job_template, single, tmp_path):
    run = copy(job_template, tmp_path / "run")
    done = mlx_launch(run, 2)
    assert done.returncode == 0, done.stderr
    assert "exited with code" not in done.stderr  # mlx.launch's warning for a failed rank
    # The same losses and adapters as one process; only the order in which the four
    # micro-batch gradients are added differs ((g0+g2)+(g1+g3) vs ((g0+g1)+g2)+g3).
    assert_close_to(run, single, 1e-5)
    assert outcome(run)["losses"] != {}
    status = json.loads(cli("status", "--json", run=run).stdout)
    assert status["state"] == "finished" and status["world_size"] == 2
    assert "world      2 ranks" in cli("status", run=run).stdout
    lines = events(run)  # rank 0 alone writes the log; every line says so
    assert lines and all(e.get("rank") == 0 and e.get("world_size") == 2 for e in lines)
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert json.loads((newest / "trainer_state.json").read_text())["world_size"] == 2


def test_micro_batches_that_do_not_divide_are_split_by_rows(job_template, tmp_path):
    # 3 micro-batches of 4 on 2 ranks: every rank takes 2 of the 4 rows of each.
    overrides = ("--set", "train.batch_size=4", "--set", "train.grad_accumulation_steps=3", "--set",
                 "lora.dropout=0.0")
    alone = copy(job_template, tmp_path / "alone")
    finish(start(alone, *overrides))
    run = copy(job_template, tmp_path / "run")
    finish_all(start_ranks(run, 2, tmp_path / "hosts.json", args={0: overrides, 1: overrides}))
    reference = outcome(alone)
    got = outcome(run)
    assert set(got["losses"]) == set(reference["losses"]) and len(got["losses"]) >= 5
    for step, loss in got["losses"].items():
        assert abs(loss - reference["losses"][step]) <= 1e-5 * max(1.0, loss), (step, loss)
    for key, value in reference["weights"].items():
        np.testing.assert_allclose(np.array(got["weights"][key]), np.array(value), rtol=0, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_ends_the_job_promptly_and_a_restart_resumes_bit_exactly(job_template, two_ranks, tmp_path,
                                                                               victim):
    run = copy(job_template, tmp_path / "run")
    marker = tmp_path / "held"
    procs = start_ranks(run, 2, tmp_path / "hosts.json",
                        env={victim: {"MATHLORA_TEST_HOLD": f"micro@7:{marker}"}})  # mid-step 7
    wait_for(marker.exists, procs[victim], "the victim's hold point")
    procs[victim].send_signal(signal.SIGKILL)
    other = procs[1 - victim]
    killed_at = time.monotonic()
    try:
        _out, err = other.communicate(timeout=60)  # no hang: the lost peer fails its collective
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail("the surviving rank did not exit within 60 s of its peer's SIGKILL")
    procs[victim].wait(timeout=60)
    assert other.returncode == 75, err  # temporary: restart the job
    assert "lost contact with the other ranks" in err
    print(f"surviving rank exited {time.monotonic() - killed_at:.2f} s after the SIGKILL")
    assert newest_checkpoint(run / "checkpoints")[0] == 4

    finish_all(start_ranks(run, 2, tmp_path / "hosts.json"))  # the whole job again
    resumes = events(run, "resume")
    assert [e["from_step"] for e in resumes] == [4]
    assert_bit_exact(run, two_ranks)


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_boundary(job_template, two_ranks, tmp_path):
    run = copy(job_template, tmp_path / "run")
    marker, release = tmp_path / "held", tmp_path / "release"
    procs = start_ranks(run, 2, tmp_path / "hosts.json",
                        env={1: {"MATHLORA_TEST_HOLD": f"micro@6:{marker}:{release}"}})
    wait_for(marker.exists, procs[1], "rank 1's hold point")  # rank 1 is between its two micro-batches of step 6
    procs[1].send_signal(signal.SIGTERM)
    release.write_text("")
    errs = finish_all(procs)
    # Step 6 is abandoned on both ranks; both stop at the boundary after step 5.
    assert stop_step(errs[0]) == stop_step(errs[1]) == 5
    stops = events(run, "daemon.stop")
    assert stops[-1]["reason"] == "rank 1: asked to stop (signal or `mathlora-daemon stop`)"
    assert newest_checkpoint(run / "checkpoints")[0] == 5
    assert json.loads(cli("status", "--json", run=run).stdout)["state"] == "stopped"

    finish_all(start_ranks(run, 2, tmp_path / "hosts.json"))
    assert_bit_exact(run, two_ranks)


def test_the_stop_command_stops_every_rank_at_the_same_boundary(job_template, tmp_path):
    run = copy(job_template, tmp_path / "run")
    procs = start_ranks(run, 2, tmp_path / "hosts.json", args={0: ("--set", "train.epochs=50"),
                                                              1: ("--set", "train.epochs=50")})
    wait_for(step_logged(run, 2), procs[0], "step 2")
    assert cli("stop", run=run).returncode == 0
    errs = finish_all(procs)
    step = stop_step(errs[0])
    assert stop_step(errs[1]) == step and 2 <= step < 50 * 8
    assert events(run, "daemon.stop")[-1]["reason"] == "stopped by the user"
    assert (run / "checkpoints" / f"step-{step:08d}").is_dir()


def test_ranks_with_different_configurations_refuse_to_train(job_template, tmp_path):
    run = copy(job_template, tmp_path / "run")
    procs = start_ranks(run, 2, tmp_path / "hosts.json", args={1: ("--set", "lora.rank=8")})
    for proc in procs:
        proc.wait(timeout=DEADLINE_S)
    errs = [proc.stderr.read() for proc in procs]
    assert [proc.returncode for proc in procs] == [78, 78], errs
    assert "ranks 1 disagree with rank 0 on the configuration fingerprint" in errs[0]
    assert not list((run / "checkpoints").glob("step-*")) and not (run / "adapters").exists()


def test_outside_rank_0s_window_no_rank_trains(job_template, tmp_path):
    run = copy(job_template, tmp_path / "run")
    now = datetime.now()
    window = f"{now + timedelta(hours=2):%H:%M}-{now + timedelta(hours=3):%H:%M}"
    errs = finish_all(start_ranks(run, 2, tmp_path / "hosts.json", args={0: ("--set", f"daemon.window={window}")}))
    assert "rank 0 did not start training" in errs[1]
    assert not events(run, "model.load.start") and not (run / "cache").exists()
    assert "outside the training window" in json.loads(cli("status", "--json", run=run).stdout)["reason"]


def test_a_pause_on_rank_0_holds_every_rank_and_a_stop_while_paused_ends_both_there(job_template, tmp_path):
    run = copy(job_template, tmp_path / "run")
    longer = ("--set", "train.epochs=50")
    procs = start_ranks(run, 2, tmp_path / "hosts.json", args={0: longer, 1: longer})
    wait_for(step_logged(run, 2), procs[0], "step 2")
    assert cli("pause", run=run).returncode == 0
    paused = wait_for(lambda: (s := json.loads(cli("status", "--json", run=run).stdout))["state"] == "paused" and s,
                      procs[0], "status paused")
    assert cli("stop", run=run).returncode == 0
    errs = finish_all(procs)
    # No step was taken after the pause, by either rank: both stop at the paused boundary.
    assert stop_step(errs[0]) == stop_step(errs[1]) == paused["step"]
    assert [e["event"] for e in events(run) if e["event"].startswith(("daemon.paused", "control."))] == \
        ["control.pause", "daemon.paused", "control.stop"]


def test_rank_0s_budget_stops_every_rank_at_the_same_boundary(job_template, tmp_path):
    run = copy(job_template, tmp_path / "run")
    args = ("--set", "train.epochs=50", "--set", "daemon.budget_hours=0.0005")  # 1.8 s of training
    errs = finish_all(start_ranks(run, 2, tmp_path / "hosts.json", args={0: args, 1: args}))
    step = stop_step(errs[0])
    assert stop_step(errs[1]) == step and 0 < step < 50 * 8
    assert events(run, "budget.exhausted")[-1]["step"] == step
    assert json.loads(cli("status", "--json", run=run).stdout)["state"] == "budget_exhausted"
