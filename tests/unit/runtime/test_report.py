"""The morning report file (runtime/report.py): written at every end, kept by later
starts, and the test of "nothing left to do" that lets a start exit without loading."""

from __future__ import annotations

import pytest

from mathlora_checkpoints.store import save_checkpoint
from mathlora_daemon.config import Config
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.report import finished_already, read_report, training_identity, write_report

FIGURES = {"adapters": "/r/adapters", "steps": 32, "selected_step": 28, "best_val_loss": 1.5}


def checkpoint(run: RunDir, step: int) -> None:
    import numpy as np
    from safetensors.numpy import save

    tensors = save({"w": np.zeros(4, dtype=np.float32)})
    save_checkpoint(run.checkpoints, step, {"adapters": tensors, "optimizer": tensors},
                    {"global_step": step, "train_seconds": 1.0})


@pytest.fixture
def run(tmp_path) -> RunDir:
    run = RunDir(tmp_path)
    run.adapters.mkdir()
    checkpoint(run, 32)
    return run


def test_a_failed_start_keeps_the_figures_of_the_end_before_it(run):
    write_report(run, "budget_exhausted", "budget spent", 32, FIGURES, identity="abc", now=10.0)
    write_report(run, "failed", "configuration error: ...", None, None, now=20.0)
    report = read_report(run)
    assert report["state"] == "failed" and report["step"] == 32 and report["report"] == FIGURES
    assert report["identity"] == "abc" and report["ended_unix"] == 20.0


def test_unknown_states_and_damaged_files_are_refused(run):
    with pytest.raises(ValueError):
        write_report(run, "running", "", 1, {})
    run.report_file.write_text("{not json")
    assert read_report(run) is None


def test_a_finished_run_has_nothing_to_do_until_its_settings_change(run):
    cfg = Config()
    identity = training_identity(cfg)
    write_report(run, "finished", "finished", 32, FIGURES, identity=identity)
    assert finished_already(run, identity, budget_exhausted=False)["step"] == 32
    cfg.train.epochs = 2  # more epochs: work again
    assert finished_already(run, training_identity(cfg), budget_exhausted=False) is None
    cfg.train.epochs, cfg.daemon.budget_hours = 1, 99.0  # the daemon's own settings do not count
    assert training_identity(cfg) == identity


def test_a_spent_budget_has_nothing_to_do_only_while_it_stays_spent(run):
    write_report(run, "budget_exhausted", "spent", 32, FIGURES, identity="x")
    assert finished_already(run, "other", budget_exhausted=True) is not None
    assert finished_already(run, "other", budget_exhausted=False) is None  # budget_hours raised


def test_owed_work_is_not_nothing_to_do(run):
    write_report(run, "finished", "finished", 32, {**FIGURES, "final_eval_pending": True}, identity="x")
    assert finished_already(run, "x", budget_exhausted=False) is None  # the final eval is owed
    write_report(run, "finished", "finished", 32, FIGURES, identity="x")
    checkpoint(run, 33)  # a newer checkpoint than the report: its end was never written
    assert finished_already(run, "x", budget_exhausted=False) is None
    write_report(run, "stopped", "stopped by the user", 33, FIGURES, identity="x")
    assert finished_already(run, "x", budget_exhausted=False) is None  # a stop is not an end


def test_a_checkpoint_damaged_since_is_not_nothing_to_do(run):
    write_report(run, "finished", "finished", 32, FIGURES, identity="x")
    assert finished_already(run, "x", budget_exhausted=False) is not None
    weights = run.checkpoints / "step-00000032" / "adapters.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x01\x02\x03\x04")  # same size, other bytes
    assert finished_already(run, "x", budget_exhausted=False) is None
