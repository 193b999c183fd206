"""GRPO through the real daemon: learning from answers survives the night like SFT does.

The demo's pretrained base is given a short SFT (so its sampled answers are sometimes
right and the groups carry a signal), then GRPO starts from those adapters. A run killed
with SIGKILL mid-rollout, mid-update and mid-save resumes to the very adapters and
per-step losses of one never killed; SIGTERM during the rollouts abandons them and exits
at once; the budget ends a GRPO run like any other; the adapters are ordinary LoRA
adapters that `eval` and `export` take.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest

from runs import cli, events, finish, hold, kill_at, sha, start, step_logged, wait_for

STEPS = 6
GRPO = ("--set", 'train.method="grpo"', "--set", 'rl.init_adapters="sft/adapters"', "--set", "rl.group_size=4",
        "--set", "rl.prompts_per_step=2", "--set", "rl.max_new_tokens=40", "--set", f"train.max_steps={STEPS}",
        "--set", "daemon.checkpoint_every_steps=2", "--set", "train.learning_rate=5e-4", "--set",
        "train.warmup_steps=0", "--set", "train.eval_sequences=8", "--set", "train.final_eval=0",
        "--set", "daemon.keep_checkpoints=10",
        # The last step's adapters: what the resume tests compare bit for bit. With "best",
        # six steps that never beat the start would all end with the start's adapters.
        "--set", 'train.select="last"')


@pytest.fixture(scope="session")
def grpo_template(tmp_path_factory) -> Path:
    """The demo's files plus SFT adapters (sft/adapters) from 30 steps of the demo's SFT."""
    run = tmp_path_factory.mktemp("grpo") / "run"
    assert cli("demo", "--run-dir", str(run), "--prepare-only").returncode == 0
    sft = run / "sft"
    sft.mkdir()
    for name in ("data", "mlx_model", "mathlora.toml"):
        (sft / name).symlink_to(run / name)
    finish(start(sft, "--set", "train.max_steps=30", "--set", "train.final_eval=0"))
    assert (sft / "adapters" / "adapters.safetensors").is_file()
    return run


@pytest.fixture(scope="session")
def grpo_reference(grpo_template, tmp_path_factory) -> dict:
    run = copy_run(grpo_template, tmp_path_factory.mktemp("grpo-ref") / "run")
    finish(start(run, *GRPO))
    steps = events(run, "rl.step")
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    return {"dir": run, "adapters": sha(run / "adapters" / "adapters.safetensors"),
            "losses": {e["step"]: e["loss"] for e in events(run, "train.step")},
            "rewards": {e["step"]: e["reward_mean"] for e in steps}}


def copy_run(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, symlinks=True, ignore=shutil.ignore_patterns("checkpoints", "logs", "state",
                                                                                   "report.json", "cache"))
    return dest


def assert_matches(run: Path, reference: dict) -> None:
    assert sha(run / "adapters" / "adapters.safetensors") == reference["adapters"]
    for e in events(run, "train.step"):  # every loss ever logged, re-done steps included
        assert e["loss"] == reference["losses"][e["step"]], e
    for e in events(run, "rl.step"):  # the same completions, so the same rewards
        assert e["reward_mean"] == reference["rewards"][e["step"]], e


def test_grpo_steps_report_rewards_and_select_by_accuracy(grpo_reference):
    run = grpo_reference["dir"]
    steps = events(run, "rl.step")
    for e in steps:
        for key in ("reward_mean", "reward_std", "sample_accuracy", "zero_advantage_share", "completion_tokens_mean",
                    "kl", "clip_fraction", "generation_tok_per_s", "update_tok_per_s"):
            assert key in e, (key, e)
    assert any(e["reward_std"] > 0 for e in steps)  # the groups carried a signal: the test trains something
    assert steps[0]["kl"] == 0.0  # the reference is the SFT start, where GRPO begins
    evals = events(run, "train.eval")
    assert all("val_accuracy" in e and e["val_loss"] == pytest.approx(1 - e["val_accuracy"]) for e in evals)
    status = json.loads(cli("status", "--json", run=run).stdout)
    assert status["state"] == "finished" and status["rl"]["reward_mean"] == steps[-1]["reward_mean"]
    text = cli("status", run=run).stdout
    assert "val acc" in text and "reward" in text
    state = json.loads(sorted((run / "checkpoints").glob("step-*/trainer_state.json"))[-1].read_text())
    assert state["rl"]["recent_rewards"][-1] == pytest.approx(steps[-1]["reward_mean"], abs=1e-4)
    assert (sorted((run / "checkpoints").glob("step-*"))[-1] / "reference.safetensors").is_file()


@pytest.mark.parametrize("point", ["rollout@3", "micro@4", "save@4"])
def test_sigkill_at_any_point_resumes_to_the_same_adapters(grpo_template, grpo_reference, tmp_path, point):
    run = copy_run(grpo_template, tmp_path / "run")
    kill_at(run, point, tmp_path, *GRPO)
    finish(start(run, *GRPO))
    assert events(run, "resume")
    assert_matches(run, grpo_reference)


def test_sigterm_during_the_rollouts_abandons_them_and_exits_at_once(grpo_template, grpo_reference, tmp_path):
    run = copy_run(grpo_template, tmp_path / "run")
    proc = hold(run, "rollout@3", tmp_path, *GRPO)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 0
    stop = events(run, "daemon.stop")[-1]
    assert stop["reason"] == "signal SIGTERM" and stop["step"] == 2  # step 3 was abandoned, not half applied
    finish(start(run, *GRPO))
    assert_matches(run, grpo_reference)


def test_the_budget_ends_a_grpo_run(grpo_template, tmp_path):
    run = copy_run(grpo_template, tmp_path / "run")
    args = [*GRPO[:-2], "--set", "train.max_steps=400", "--set", f"daemon.budget_hours={6 / 3600!r}"]
    finish(start(run, *args))
    assert events(run, "budget.exhausted")
    steps = events(run, "train.step")
    assert 0 < len(steps) < 400
    assert sum(e["step_s"] for e in steps) <= 6 + max(e["step_s"] for e in steps)
    assert json.loads((run / "report.json").read_text())["state"] == "budget_exhausted"


def test_when_no_checkpoint_beats_its_start_adapters_holds_the_adapters_grpo_started_from(grpo_template,
                                                                                             tmp_path):
    """A rate that wrecks the policy: no checkpoint reaches the SFT start's validation
    accuracy, so the morning's adapters are the SFT adapters, not the least bad wreck."""
    import mlx.core as mx
    import numpy as np

    run = copy_run(grpo_template, tmp_path / "run")
    finish(start(run, *GRPO, "--set", "train.learning_rate=0.5", "--set", "train.eval_sequences=60",
                 "--set", 'train.select="best"'))
    evals = events(run, "train.eval")
    assert evals[0]["step"] == 0 and evals[0]["val_accuracy"] > 0, evals
    assert max(e["val_accuracy"] for e in evals[1:]) < evals[0]["val_accuracy"], evals
    kept, started = (mx.load(str(d / "adapters.safetensors")) for d in (run / "adapters", run / "sft" / "adapters"))
    assert kept.keys() == started.keys()
    assert all(np.array_equal(np.array(kept[k]), np.array(started[k])) for k in kept)
    selected = json.loads((run / "adapters" / "adapter_config.json").read_text())["selected"]
    assert selected["step"] == 0 and "started from" in selected["rule"]
    assert "adapters/ holds the adapters GRPO started from" in cli("status", run=run).stdout


def test_grpo_adapters_are_ordinary_lora_adapters(grpo_reference, tmp_path):
    run = grpo_reference["dir"]
    out = tmp_path / "peft"
    assert cli("export", "--format", "peft", "--out", str(out), run=run).returncode == 0
    assert (out / "adapter_model.safetensors").is_file()
    result = cli("eval", "--limit", "4", "--max-new-tokens", "24", "--no-base", run=run)
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout


def test_a_stop_request_during_grpo_is_acted_on(grpo_template, tmp_path):
    run = copy_run(grpo_template, tmp_path / "run")
    proc = start(run, *GRPO[:-2], "--set", "train.max_steps=400")
    wait_for(step_logged(run, 2), proc, "two GRPO steps")
    assert cli("stop", run=run).returncode == 0
    finish(proc)
    assert events(run, "daemon.stop")[-1]["reason"] == "stopped by the user"


def test_a_grpo_step_is_planned_from_the_prepared_prompts_and_refused_before_loading(grpo_template, tmp_path):
    run = copy_run(grpo_template, tmp_path / "run")
    prepared = cli("prepare", *GRPO, run=run)
    assert prepared.returncode == 0, prepared.stderr
    line = next(ln for ln in prepared.stderr.splitlines() if ln.startswith("memory plan:"))
    assert line.startswith("memory plan: GRPO, at its ") and "(the prepared data's longest)" in line, line
    plan = events(run, "memory.plan")[-1]
    assert (plan["method"], plan["group_size"], plan["max_new_tokens"]) == ("grpo", 4, 40) and plan["fits"]
    assert 0 < plan["prompt_tokens"] < 1024

    refused = cli("run", *GRPO, "--set", "daemon.memory_limit_gb=0.001", run=run)
    assert refused.returncode == 78, refused.stderr
    assert "error: memory plan: GRPO, at its " in refused.stderr and "the training step will not fit" in refused.stderr
    this_start = events(run)[max(i for i, e in enumerate(events(run)) if e["event"] == "daemon.start"):]
    assert "model.load.start" not in [e["event"] for e in this_start]  # refused before anything heavy
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
