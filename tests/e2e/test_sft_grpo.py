"""train.method = "sft+grpo" through the real daemon: one run, SFT then GRPO, one budget.

The SFT stage ends at its max_steps (deterministic) or at rl.sft_share of the budget; GRPO
then starts from the SFT stage's adapters, which are also its reference. A SIGKILL at the
switch (between the stage record and the move of the SFT checkpoints) and one in the
GRPO stage's rollouts resume to the very adapters and rewards of a run never killed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runs import cli, events, finish, kill_at, sha, start

STEPS = 4
STAGED = ("--set", 'train.method="sft+grpo"', "--set", "rl.group_size=4", "--set", "rl.prompts_per_step=2",
          "--set", "rl.max_new_tokens=32", "--set", f"train.max_steps={STEPS}", "--set",
          "daemon.checkpoint_every_steps=2", "--set", "train.learning_rate=5e-4", "--set", "rl.learning_rate=2e-4",
          "--set", "train.warmup_steps=0", "--set", "train.eval_sequences=8", "--set", "train.final_eval=0",
          "--set", "daemon.keep_checkpoints=10",
          # The last steps' adapters, compared bit for bit after a kill: with "best", a GRPO
          # stage that never beat its start would end with the SFT stage's adapters.
          "--set", 'train.select="last"')


@pytest.fixture(scope="session")
def staged_template(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("staged") / "run"
    assert cli("demo", "--run-dir", str(run), "--prepare-only").returncode == 0
    return run


def copy_run(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def staged_reference(staged_template, tmp_path_factory) -> dict:
    run = copy_run(staged_template, tmp_path_factory.mktemp("staged-ref") / "run")
    finish(start(run, *STAGED))
    return {"dir": run, "adapters": sha(run / "adapters" / "adapters.safetensors"),
            "sft_adapters": sha(run / "stages" / "sft" / "adapters" / "adapters.safetensors"),
            "rewards": {e["step"]: e["reward_mean"] for e in events(run, "rl.step")}}


def test_one_run_trains_sft_then_grpo_from_its_adapters(staged_reference):
    run = staged_reference["dir"]
    switch = events(run, "train.stage")
    assert len(switch) == 1 and switch[0]["stage"] == "grpo" and switch[0]["steps"] == STEPS
    log = events(run)
    at = log.index(next(e for e in log if e["event"] == "train.stage"))
    # SFT steps before the switch, GRPO steps (rewards) after it, each stage from step 1.
    assert [e["step"] for e in log[:at] if e["event"] == "train.step"] == list(range(1, STEPS + 1))
    assert not [e for e in log[:at] if e["event"] == "rl.step"]
    assert [e["step"] for e in log[at:] if e["event"] == "rl.step"] == list(range(1, STEPS + 1))
    # GRPO started from the SFT stage's adapters, which are its reference: no KL at its first step.
    assert [e for e in log[at:] if e["event"] == "rl.init_adapters"][0]["path"].endswith("stages/sft/adapters")
    assert [e for e in log[at:] if e["event"] == "rl.step"][0]["kl"] == 0.0
    # The SFT stage's checkpoints moved aside; checkpoints/ holds GRPO's series.
    assert sorted(p.name for p in (run / "stages" / "sft" / "checkpoints").glob("step-*"))
    assert all((p / "reference.safetensors").is_file() for p in (run / "checkpoints").glob("step-*"))
    assert staged_reference["adapters"] != staged_reference["sft_adapters"]
    # The morning report and status tell both stages.
    report = json.loads((run / "report.json").read_text())
    assert report["state"] == "finished"
    assert report["report"]["stages"]["sft"]["steps"] == STEPS
    assert report["report"]["stages"]["grpo"]["steps"] == STEPS
    text = cli("status", run=run).stdout
    assert f"{STEPS} SFT steps, then GRPO from" in text and "val acc" in text
    assert json.loads(cli("status", "--json", run=run).stdout)["stage"].startswith("grpo")
    # A finished run has nothing to do at the next start (launchd at every login).
    again = start(run, *STAGED)
    assert again.wait(timeout=120) == 0
    assert "nothing to do" in again.stderr.read()
    assert len(events(run, "train.stage")) == 1


@pytest.mark.parametrize("point", [f"stage@{STEPS}", "rollout@3"])
def test_sigkill_across_the_switch_resumes_to_the_same_adapters(staged_template, staged_reference, tmp_path,
                                                                point):
    run = copy_run(staged_template, tmp_path / "run")
    kill_at(run, point, tmp_path, *STAGED)
    finish(start(run, *STAGED))
    assert sha(run / "adapters" / "adapters.safetensors") == staged_reference["adapters"]
    assert sha(run / "stages" / "sft" / "adapters" / "adapters.safetensors") == staged_reference["sft_adapters"]
    for e in events(run, "rl.step"):
        assert e["reward_mean"] == staged_reference["rewards"][e["step"]], e
    assert len(events(run, "train.stage")) == 1  # the switch happened once; the next start finished it


def test_the_budget_is_shared_by_the_stages(staged_template, tmp_path):
    run = copy_run(staged_template, tmp_path / "run")
    budget_s = 16.0
    args = [*STAGED, "--set", "train.max_steps=100000", "--set", f"daemon.budget_hours={budget_s / 3600!r}",
            "--set", "rl.sft_share=0.4", "--set", "train.eval_sequences=0"]
    finish(start(run, *args))
    switch = events(run, "train.stage")
    assert len(switch) == 1
    assert 0.4 * budget_s <= switch[0]["budget_used_s"] <= 0.4 * budget_s + 3
    assert events(run, "rl.step")
    report = json.loads((run / "report.json").read_text())
    assert report["state"] == "budget_exhausted"
    assert report["budget_used_s"] <= budget_s + max(e["step_s"] for e in events(run, "train.step"))
    assert report["budget_total_s"] == pytest.approx(budget_s)
