"""train.method = "sft+grpo": how each stage sees the run's config, its budget, a reload,
the switch's files and the trackers' step axis (the e2e test drives the real daemon)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mathlora_daemon.config import load_config
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.budget import Budget
from mathlora_daemon.runtime.control import reload_config
from mathlora_daemon.training.loop import RunResult
from mathlora_daemon.training.stages import (
    GRPO,
    SFT,
    Stage,
    finish_switch,
    read_stage,
    sft_budget,
    stage_config,
    switch_to_grpo,
    train_in_stages,
)

from fakes import RecordingHeartbeat, RecordingLog


def staged_file(path: Path, budget_hours: float = 2.0) -> Path:
    path.write_text(f'[train]\nmethod = "sft+grpo"\nlearning_rate = 2e-4\nfinal_eval = 50\n'
                    f'[data]\npack = true\n[rl]\nsft_share = 0.25\nlearning_rate = 3e-5\n'
                    f'[daemon]\nbudget_hours = {budget_hours}\n')
    return path


def test_each_stage_trains_with_its_own_method_and_settings(tmp_path):
    cfg, run = load_config(staged_file(tmp_path / "mathlora.toml")), RunDir(tmp_path)
    sft = stage_config(cfg, run, SFT)
    assert (sft.train.method, sft.train.final_eval, sft.train.learning_rate, sft.data.pack) == ("sft", 0, 2e-4, True)
    grpo = stage_config(cfg, run, GRPO)
    assert (grpo.train.method, grpo.train.learning_rate, grpo.data.pack) == ("grpo", 3e-5, False)
    assert grpo.train.final_eval == 50  # the run's end is the GRPO stage's
    assert grpo.rl.init_adapters == str(tmp_path / "stages" / "sft" / "adapters")
    one = load_config(None, ["train.method=\"sft\""])
    assert stage_config(one, run, SFT) is one


def test_the_sft_stage_has_its_share_of_the_budget_and_a_reload_keeps_it(tmp_path):
    path = staged_file(tmp_path / "mathlora.toml")
    cfg, run = load_config(path), RunDir(tmp_path)
    sub = sft_budget(cfg, Budget(2 * 3600.0, 100.0))
    assert (sub.total_s, sub.used_s) == (0.25 * 2 * 3600, 100.0)
    stage = Stage(run, SFT)
    current = stage.view(cfg)
    staged_file(path, budget_hours=4.0)
    new, applied, rejected, error = reload_config(path, [], current, stage.view)
    assert error is None and rejected == []  # the stage's own method and settings are not the user's changes
    assert applied == {"daemon.budget_hours": [2.0, 4.0]}
    assert stage.budget_total(new) == 0.25 * 4 * 3600
    assert Stage(run, GRPO).budget_total(new) == 4 * 3600
    assert reload_config(path, [], current)[2]  # without the view the stage's settings would look changed


def test_the_switch_keeps_the_sft_adapters_and_moves_its_checkpoints(tmp_path):
    run = RunDir(tmp_path)
    (run.adapters).mkdir()
    (run.adapters / "adapters.safetensors").write_bytes(b"sft weights")
    (run.checkpoints / "step-00000004").mkdir(parents=True)
    assert read_stage(run) == {"stage": SFT}
    log = RecordingLog()
    result = RunResult(0, 4, 1.0, 0.5, run.adapters, "finished", {"best_val_loss": 0.7, "selected_step": 4})
    record = switch_to_grpo(run, result, Budget(100.0, 40.0), log)
    assert read_stage(run) == json.loads(run.stage_file.read_text()) == record
    assert record["sft"]["steps"] == 4 and record["sft"]["best_val_loss"] == 0.7
    assert record["sft"]["budget_used_s"] == 40.0
    assert (run.sft_stage / "adapters" / "adapters.safetensors").read_bytes() == b"sft weights"
    assert (run.sft_stage / "checkpoints" / "step-00000004").is_dir() and not run.checkpoints.exists()
    assert log.events[0][1] == "train.stage"
    # A later start finds GRPO's own series in checkpoints/ and leaves it there.
    (run.checkpoints / "step-00000002").mkdir(parents=True)
    finish_switch(run)
    assert (run.checkpoints / "step-00000002").is_dir()


def test_a_kill_before_the_move_is_finished_by_the_next_start(tmp_path):
    run = RunDir(tmp_path)
    run.state.mkdir()
    run.stage_file.write_text(json.dumps({"stage": GRPO, "sft": {"steps": 4}}))
    (run.checkpoints / "step-00000004").mkdir(parents=True)
    finish_switch(run)
    assert (run.sft_stage / "checkpoints" / "step-00000004").is_dir() and not run.checkpoints.exists()


@pytest.mark.parametrize("resumed_in_grpo", [False, True])
def test_trackers_draw_the_grpo_stage_after_the_sft_steps(tmp_path, resumed_in_grpo):
    """train_in_stages with a stand-in for the loop's train: the SFT stage is drawn from
    step 0, the GRPO stage after the SFT stage's 30 steps, whether the switch happened in
    this start or an earlier one."""
    run, cfg = RunDir(tmp_path), load_config(staged_file(tmp_path / "mathlora.toml"))
    calls = []

    def train_stage(stage_cfg, stage_budget, stage):
        calls.append((stage_cfg.train.method, stage.step_offset))
        if stage.name == SFT:
            run.adapters.mkdir()
            (run.adapters / "adapters.safetensors").write_bytes(b"sft weights")
            return RunResult(0, 30, 1.0, 0.5, run.adapters, "finished", {})
        return RunResult(0, 5, 1.0, 0.5, run.adapters, "stopped", None)

    if resumed_in_grpo:
        run.state.mkdir()
        run.stage_file.write_text(json.dumps({"stage": GRPO, "sft": {"steps": 30}}))
    train_in_stages(run, cfg, Budget(3600.0), RecordingLog(), RecordingHeartbeat(), train_stage)
    assert calls == ([] if resumed_in_grpo else [("sft", 0)]) + [("grpo", 30)]
