"""Watch the night and be told (issue 23), through the real daemon: TensorBoard, MLflow
and W&B (offline) follow one run across a SIGKILL and a restart, each step once where
TensorBoard reads it; the end is told once, with the morning report's lines; the page
is there."""

from __future__ import annotations

import json
import shlex
import signal

import pytest

from runs import TOTAL, cli, copy, events, finish, hold, make_tiny_run, start


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    base = tmp_path_factory.mktemp("watch")
    run = copy(make_tiny_run(base / "template"), base / "run")
    notes = base / "notes.jsonl"
    watch = ("--set", "report.tensorboard=true", "--set", 'report.mlflow_uri="local"',
             "--set", 'report.wandb_project="mathlora-tests"',
             "--set", f"notify.command={json.dumps(f'cat >> {shlex.quote(str(notes))}; echo >> {shlex.quote(str(notes))}')}")
    proc = hold(run, "micro@10", base, *watch)  # steps 1-9 logged, checkpoint at 8
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    finish(start(run, *watch))
    again = cli("run", *watch, run=run)  # finished already: nothing to do, nothing to tell
    assert again.returncode == 0
    return run, notes


def test_tensorboard_reads_every_step_once_across_the_kill(watched):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = watched
    acc = EventAccumulator(str(run / "logs" / "tensorboard"))
    acc.Reload()
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == list(range(1, TOTAL + 1))
    logged = {e["step"]: e["loss"] for e in events(run, "train.step")}  # the last value logged for each step
    assert all(e.value == pytest.approx(logged[e.step], rel=1e-6) for e in losses)
    assert {"train/lr", "memory/peak_gb", "val/loss"} <= set(acc.Tags()["scalars"])
    evals = [e.step for e in acc.Scalars("val/loss")]
    assert evals == sorted(set(evals)) and 0 in evals  # the base model's, then each checkpoint's, once


def test_mlflow_and_wandb_continue_one_run(watched, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as `mlflow ui` needs it for the local store
    run, _ = watched
    ids = json.loads((run / "state" / "trackers.json").read_text())
    client = mlflow.tracking.MlflowClient(tracking_uri=(run / "logs" / "mlruns").resolve().as_uri())
    runs = client.search_runs([client.get_experiment_by_name("mathlora-daemon").experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]]
    steps = {m.step for m in client.get_metric_history(ids["mlflow"], "train_loss")}
    assert steps == set(range(1, TOTAL + 1))
    data = client.get_run(ids["mlflow"]).data
    assert data.params["train.seed"] == "7" and data.tags["adapters"] == str(run / "adapters")
    assert "notify.command" not in data.params  # the notifications' settings are not recorded
    offline = sorted(p.name for p in (run / "logs" / "wandb").glob("offline-run-*"))
    # The two starts that trained (the third had nothing to do), one W&B run.
    assert len(offline) == 2 and all(f"-{ids['wandb']}" in name for name in offline), offline


def test_the_end_is_told_once_with_the_report_lines(watched):
    run, notes = watched
    told = [json.loads(line) for line in notes.read_text().splitlines() if line.strip()]
    assert [t["event"] for t in told] == ["finished"]  # the kill told nothing, the idle start neither
    body = told[0]["body"]
    assert f"adapters: {run / 'adapters'}" in body and "val loss:" in body and "(base " in body
    assert (run / "report.html").is_file()


def test_a_failure_before_the_log_exists_is_told_too(tmp_path):
    """A guarded start (launchd's: no terminal) with a configuration error: the [notify]
    section is still read, and the failure is told once, with the error."""
    run = copy(make_tiny_run(tmp_path / "template"), tmp_path / "run")
    notes = tmp_path / "notes.jsonl"
    config = run / "mathlora.toml"
    text = config.read_text()
    assert 'command = ""' in text and "learning_rate = 0.002" in text  # the [notify] and [train] sections
    config.write_text(text.replace('command = ""', f'command = "cat >> {notes}; echo >> {notes}"')
                      .replace("learning_rate = 0.002", 'learning_rate = "fast"'))
    result = cli("run", run=run)
    assert result.returncode == 78 and "learning_rate" in result.stderr
    told = [json.loads(line) for line in notes.read_text().splitlines() if line.strip()]
    assert [t["event"] for t in told] == ["failed"] and "learning_rate" in told[0]["body"]
    # launchd's next start finds the same error on record: it exits 0 and tells nothing new.
    assert cli("run", run=run).returncode == 0
    assert len([line for line in notes.read_text().splitlines() if line.strip()]) == 1
