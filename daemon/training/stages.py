"""`train.method = "sft+grpo"`: one night, two stages, one budget.

SFT first teaches the format (the boxed answer) and what the rows know; GRPO then learns
from whether the answers are right, starting from the SFT stage's selected adapters
(also its reference policy: the KL term keeps GRPO near what SFT learned, not near the
untrained base). One run directory, one budget, one `run` command that launchd restarts:

- the SFT stage trains `rl.sft_share` of `daemon.budget_hours` (sooner when its epochs,
  max_steps or early stopping end it), as `train.method = "sft"` with its checkpoints,
  validation loss and best adapters, and no final evaluation;
- the switch (`switch_to_grpo`) keeps the SFT stage's adapters in `stages/sft/adapters/`,
  writes `state/stage.json` ("grpo", with the SFT stage's figures), then moves its
  checkpoints to `stages/sft/checkpoints/`, so `checkpoints/` holds the GRPO stage's
  series. Each write is atomic and the start finishes a switch a kill interrupted;
- the GRPO stage trains as `train.method = "grpo"` with `rl.init_adapters` at the SFT
  adapters, `rl.learning_rate` (else train.learning_rate), until the budget's end.

A stop, pause, window or crash in either stage resumes that stage bit-exactly, as a run of
its method does; `state/stage.json` decides which. The budget counter is the run's own
throughout, so the stage split never gives time back.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, replace

from mathlora_checkpoints.fsio import atomic_write_text, ensure_private_dir
from mathlora_checkpoints.store import read_json_object
from mathlora_daemon import testhooks
from mathlora_daemon.config import Config
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.budget import Budget
from mathlora_daemon.runtime.report import read_report, training_identity, write_report

STAGED = "sft+grpo"
SFT, GRPO = "sft", "grpo"


def staged(cfg: Config) -> bool:
    """Whether the run trains in two stages."""
    return cfg.train.method == STAGED


def read_stage(run: RunDir) -> dict:
    """The stage record: {"stage": "sft"} until the switch, then {"stage": "grpo", "sft": {...}}."""
    record = read_json_object(run.stage_file)
    if not record or record.get("stage") not in (SFT, GRPO):
        return {"stage": SFT}
    return record


def stage_config(cfg: Config, run: RunDir, stage: str) -> Config:
    """Given the run's config, return the one its `stage` trains with: method "sft"
    (without the final evaluation, which belongs to the run's end) or method "grpo" from
    the SFT stage's adapters at `rl.learning_rate`."""
    if not staged(cfg):
        return cfg
    if stage == SFT:
        return replace(cfg, train=replace(cfg.train, method=SFT, final_eval=0))
    return replace(cfg, train=replace(cfg.train, method=GRPO, learning_rate=cfg.rl.learning_rate or
                                      cfg.train.learning_rate),
                   data=replace(cfg.data, pack=False), rl=replace(cfg.rl, init_adapters=str(run.sft_stage_adapters)))


@dataclass(frozen=True)
class Stage:
    """The stage a start trains: how it sees the run's config and its budget's total
    (training/loop.py hands both to the runtime, for config reloads), and where its steps
    stand on the trackers' axis (the GRPO stage's after the SFT stage's)."""

    run: RunDir
    name: str
    step_offset: int = 0

    def view(self, cfg: Config) -> Config:
        return stage_config(cfg, self.run, self.name)

    def budget_total(self, cfg: Config) -> float:
        share = cfg.rl.sft_share if self.name == SFT else 1.0  # `cfg` is the stage's view (method "sft")
        return share * cfg.daemon.budget_hours * 3600


def sft_budget(cfg: Config, budget: Budget) -> Budget:
    """The SFT stage's budget: the run's used seconds against `rl.sft_share` of its total."""
    return Budget(cfg.rl.sft_share * budget.total_s, budget.used_s)


def ends_stage(state: str) -> bool:
    """Whether an SFT stage that ended in `state` is done (its share spent, or finished)."""
    return state in ("finished", "budget_exhausted")


def switch_to_grpo(run: RunDir, result, budget: Budget, log) -> dict:
    """Given the SFT stage's RunResult (finished or its share spent) and the budget, keep
    its adapters, record the switch and move its checkpoints aside; return the record."""
    kept = run.sft_stage_adapters
    ensure_private_dir(run.sft_stage)
    staging = kept.with_name(kept.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(run.adapters, staging)
    shutil.rmtree(kept, ignore_errors=True)
    os.replace(staging, kept)
    report = result.report or {}
    sft = {"steps": result.steps, "ended": result.state, "budget_used_s": round(budget.used_s, 1),
           "adapters": str(kept), "switched_unix": time.time(),
           **{k: report[k] for k in ("selected_step", "selected_rule", "base_val_loss", "best_val_loss",
                                     "best_val_step", "first_loss", "recent_loss") if k in report}}
    record = {"stage": GRPO, "sft": sft}
    ensure_private_dir(run.stage_file.parent)
    atomic_write_text(run.stage_file, json.dumps(record, indent=2, sort_keys=True) + "\n")
    log.info("train.stage", stage=GRPO, previous=SFT, **{k: v for k, v in sft.items() if k != "switched_unix"})
    testhooks.hold_point("stage", result.steps)  # a kill between the record and the move
    finish_switch(run)
    return record


def finish_switch(run: RunDir) -> None:
    """Move the SFT stage's checkpoints out of `checkpoints/` (a kill may have come
    between the stage record and the move): the GRPO stage starts its own series there."""
    moved = run.sft_stage_checkpoints
    if run.checkpoints.is_dir() and not moved.exists():
        ensure_private_dir(run.sft_stage)
        os.replace(run.checkpoints, moved)


def train_in_stages(run: RunDir, cfg: Config, budget: Budget, log, heartbeat, train_stage):
    """Given the run, its config (method "sft+grpo"), the run's budget, the log, the
    heartbeat and `train_stage(stage_cfg, stage_budget, stage)` (training/loop.py's train),
    train the current stage, and after the SFT stage the GRPO stage in the same start;
    return the last stage's RunResult."""
    record = read_stage(run)
    if record["stage"] == SFT:
        heartbeat.update(stage=f"sft (1 of 2, to {100 * cfg.rl.sft_share:.0f}% of the budget)")
        sub = sft_budget(cfg, budget)
        result = train_stage(stage_config(cfg, run, SFT), sub, Stage(run, SFT))
        budget.used_s = max(budget.used_s, sub.used_s)
        if not ends_stage(result.state) or budget.exhausted:
            return result
        record = switch_to_grpo(run, result, budget, log)
        # The SFT stage's end is not the run's: its status fields go, the writer restarts.
        heartbeat.stop()
        heartbeat.update(state="running", phase="loading", reason=None, report=None)
    else:
        finish_switch(run)
        budget.used_s = max(budget.used_s, float(record.get("sft", {}).get("budget_used_s") or 0.0))
    heartbeat.update(stage="grpo (2 of 2, from the SFT stage's adapters)")
    sft_steps = record.get("sft", {}).get("steps")
    result = train_stage(stage_config(cfg, run, GRPO), budget,
                         Stage(run, GRPO, step_offset=sft_steps if isinstance(sft_steps, int) else 0))
    if result.report:
        result.report["stages"] = {"sft": record.get("sft", {}), "grpo": {"steps": result.steps}}
        _amend_report(run, cfg, result.report)
    return result


def _amend_report(run: RunDir, cfg: Config, report: dict) -> None:
    """The GRPO stage wrote the run's end as its own: give it both stages' figures and
    the run's identity (what tells a later start that the run is finished)."""
    body = read_report(run)
    if body is None:
        return
    write_report(run, body["state"], body["reason"], body.get("step"), report, identity=training_identity(cfg),
                 budget_used_s=body.get("budget_used_s"), budget_total_s=body.get("budget_total_s"),
                 now=body.get("ended_unix"))
