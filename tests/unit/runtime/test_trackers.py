"""runtime/trackers.py: the log's figures mirrored into TensorBoard, W&B and MLflow, each
step once across a restart, and a failing tracker that never stops training."""

from __future__ import annotations

import json
import logging

import pytest

from mathlora_daemon.config import ReportConfig
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.trackers import Trackers, metrics_of


def record(**event) -> logging.LogRecord:
    return logging.LogRecord("mathlora", logging.INFO, __file__, 1, event, None, None)


def step_event(step: int, loss: float) -> dict:
    return {"event": "train.step", "step": step, "loss": loss, "lr": 1e-4, "tok_per_s": 900.0, "step_s": 0.5,
            "padding": 0.1, "mem_peak_gb": 1.5, "run": "r", "epoch": 0, "tokens": 10}


def test_events_become_tagged_metrics():
    step, m = metrics_of(step_event(3, 2.5))
    assert step == 3 and m["train/loss"] == 2.5 and m["train/lr"] == 1e-4 and m["memory/peak_gb"] == 1.5
    assert "train/epoch" not in m and "train/tokens" not in m
    assert metrics_of({"event": "train.eval", "step": 4, "val_loss": 1.2, "val_accuracy": 0.3}) == \
        (4, {"val/loss": 1.2, "val/accuracy": 0.3})
    assert metrics_of({"event": "rl.step", "step": 2, "reward_mean": 0.5, "kl": 0.01, "note": "x"}) == \
        (2, {"rl/reward_mean": 0.5, "rl/kl": 0.01})
    assert metrics_of({"event": "train.step", "step": 1, "loss": float("nan")}) == (1, {})
    assert metrics_of({"event": "daemon.start"}) is None


def scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_keeps_each_step_once_across_a_restart(tmp_path, recording_log):
    """A start logs steps 1-6 and dies (its checkpoint: step 4); the next resumes at 4 and
    logs 5-8 again: TensorBoard reads every step once, the re-done ones with the new values."""
    run = RunDir(tmp_path)
    first = Trackers(run, ReportConfig(tensorboard=True), {"train": {"seed": 0}}, 0, recording_log)
    for s in range(1, 7):
        first.emit(record(**step_event(s, 10.0 - s)))
    first.emit(record(event="train.eval", step=4, val_loss=3.0))
    first.close()  # (a SIGKILL would leave the same files, flushed or not)
    second = Trackers(run, ReportConfig(tensorboard=True), {"train": {"seed": 0}}, 4, recording_log)
    for s in range(5, 9):
        second.emit(record(**step_event(s, 100.0 + s)))
    second.close()
    got = scalars(run.logs / "tensorboard")
    assert [s for s, _ in got["train/loss"]] == list(range(1, 9))
    assert dict(got["train/loss"])[4] == pytest.approx(6.0) and dict(got["train/loss"])[5] == pytest.approx(105.0)
    assert got["val/loss"] == [(4, 3.0)]


def test_a_checkpoint_waits_until_the_trackers_hold_the_steps_it_keeps(tmp_path, recording_log, monkeypatch):
    """A tracker slow to start (W&B's import takes seconds) must not lose the steps of a
    checkpoint: after a SIGKILL they are never taken again. The checkpoint's log line
    returns only once TensorBoard's files hold them."""
    import threading

    from mathlora_daemon.runtime import trackers as module

    gate = threading.Event()
    real_init = module._TensorBoard.__init__

    def slow_init(self, *args):
        gate.wait(30)
        real_init(self, *args)

    monkeypatch.setattr(module._TensorBoard, "__init__", slow_init)
    run = RunDir(tmp_path)
    live = Trackers(run, ReportConfig(tensorboard=True), {"train": {"seed": 0}}, 0, recording_log)
    for s in range(1, 5):
        assert live.handle(record(**step_event(s, 10.0 - s)))
    threading.Timer(0.3, gate.set).start()  # the tracker finishes starting while the step waits
    live.handle(record(event="checkpoint.saved", step=4, path="checkpoints/step-00000004"))
    assert [s for s, _ in scalars(run.logs / "tensorboard")["train/loss"]] == [1, 2, 3, 4]
    live.close()


def test_a_checkpoint_waits_for_a_stuck_tracker_only_so_long(tmp_path, recording_log, monkeypatch):
    import threading
    import time

    from mathlora_daemon.runtime import trackers as module

    gate = threading.Event()
    monkeypatch.setattr(module._TensorBoard, "__init__", lambda self, *args: gate.wait(30))
    monkeypatch.setattr(Trackers, "FLUSH_WAIT_S", 0.2)
    live = Trackers(RunDir(tmp_path), ReportConfig(tensorboard=True), {}, 0, recording_log)
    started = time.monotonic()
    live.handle(record(event="checkpoint.saved", step=4, path="checkpoints/step-00000004"))
    assert time.monotonic() - started < 20  # the bound, not the stuck tracker's 30 s
    gate.set()
    live.close()


def test_mlflow_and_wandb_continue_the_same_run_after_a_restart(tmp_path, recording_log, monkeypatch):
    import mlflow

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = RunDir(tmp_path)
    cfg = ReportConfig(mlflow_uri="local", wandb_project="mathlora-tests")
    config = {"train": {"learning_rate": 1e-4}, "lora": {"rank": 8}}
    first = Trackers(run, cfg, config, 0, recording_log)
    first.flush()
    assert [t.name for t in first.trackers] == ["wandb", "mlflow"]
    for s in (1, 2):
        first.emit(record(**step_event(s, 3.0 - s)))
    first.close()
    ids = json.loads(run.tracker_state.read_text())
    second = Trackers(run, cfg, config, 2, recording_log)
    second.emit(record(**step_event(3, 0.5)))
    second.emit(record(event="train.done", steps=3, adapters=str(tmp_path / "adapters"), best_val_loss=0.4))
    second.close()
    assert json.loads(run.tracker_state.read_text()) == ids  # the same runs
    client = mlflow.tracking.MlflowClient(tracking_uri=(run.logs / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("mathlora-daemon").experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]]
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "train_loss")] == [1, 2, 3]
    final = client.get_run(ids["mlflow"]).data
    assert final.params["train.learning_rate"] == "0.0001" and final.metrics["final_best_val_loss"] == 0.4
    assert final.tags["adapters"] == str(tmp_path / "adapters")
    offline = sorted(p.name for p in (run.logs / "wandb").glob("offline-run-*"))
    # One W&B run, two starts (two starts in one second get a suffix after the id).
    assert len(offline) == 2 and all(f"-{ids['wandb']}" in name for name in offline), offline


def test_a_failing_tracker_is_one_warning_and_training_goes_on(tmp_path, recording_log, monkeypatch):
    run = RunDir(tmp_path)
    # An MLflow server that is not there: the tracker cannot start.
    trackers = Trackers(run, ReportConfig(tensorboard=True, mlflow_uri="http://127.0.0.1:9/"), {}, 0, recording_log)
    trackers.flush()
    failed = [f for level, e, f in recording_log.events if e == "tracker.failed"]
    assert [f["tracker"] for f in failed] == ["mlflow"] and [t.name for t in trackers.trackers] == ["tensorboard"]

    def broken(*_a):
        raise OSError("disk full")

    monkeypatch.setattr(trackers.trackers[0], "log", broken)
    trackers.emit(record(**step_event(1, 1.0)))  # no exception reaches the logger
    trackers.emit(record(**step_event(2, 1.0)))
    trackers.flush()
    failed = [f for level, e, f in recording_log.events if e == "tracker.failed"]
    assert [f["tracker"] for f in failed] == ["mlflow", "tensorboard"]  # once, then off
    assert not trackers.trackers
    trackers.close()
