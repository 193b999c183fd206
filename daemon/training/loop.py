"""The training loop: set up, take optimizer steps until done or told to stop, wrap up.

`train` sets the run up (signals, the control-file watcher, the sleep inhibitor, the
Session: model, data, optimizer, resume), runs `loop`, and on every way out leaves a
checkpoint, the adapters and the final status. `loop` is the part to read: at each
step boundary the runtime decides whether to go on, pause (after a checkpoint) or
stop; the step itself is training/step.py's; the Reporter tells the user; at a
segment's end the Evaluator validates and the Checkpointer saves.

In a distributed job every rank runs this; the collectives happen in the same order on
every rank (the runtime's boundary look, the step's abort check and all_sums, the
session's set-up), and only rank 0 writes into the run directory.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mathlora_daemon import __version__, testhooks
from mathlora_daemon.config import Config
from mathlora_daemon.errors import EXIT_INTERRUPTED, EXIT_OK, InputError, TemporaryFailure
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime import signals
from mathlora_daemon.runtime.boundary import Runtime
from mathlora_daemon.runtime.control import FileWatcher
from mathlora_daemon.runtime.memory import apply_limits
from mathlora_daemon.runtime.power import SleepInhibitor
from mathlora_daemon.runtime.report import training_identity, write_report
from mathlora_daemon.runtime.signals import Interrupted
from mathlora_daemon.runtime.trackers import Trackers, tracker_config
from mathlora_daemon.runtime.world import SINGLE, World, any_true, gather_ints, lost_peer, peer_lost_error
from mathlora_daemon.training.batches import step_micro_batches, training_order
from mathlora_daemon.training.checkpointing import Checkpointer
from mathlora_daemon.training.lr import LRPlan
from mathlora_daemon.training.model import adapter_config, save_adapters
from mathlora_daemon.training.oom import split_after_death, take_step_splitting
from mathlora_daemon.training.reporter import Reporter, show_progress_bar
from mathlora_daemon.training.session import setup_session
from mathlora_daemon.training.validation import Evaluator, Validator


@dataclass
class RunResult:
    exit_code: int
    steps: int
    first_loss: float | None
    last_loss: float | None
    adapters: Path | None
    state: str = "finished"
    report: dict | None = None


def loop(session, runtime, evaluator, checkpointer, reporter, should_abort, lr_plan):
    """Take optimizer steps from the session's progress to the schedule's end; return
    the runtime's Stop when training must end first, else None. The model, optimizer and
    progress are left at an optimizer-step boundary either way."""

    s, train = session, session.cfg.train
    order_epoch, order = -1, None
    runtime.account(training=False)  # loading and preparing do not count against the budget
    if s.progress.global_step == 0 or s.progress.eval_pending:
        # The base model's validation loss (what the adapters must beat), or the
        # evaluation a stop cut short at the checkpoint this start resumed from.
        evaluator.measure()
    for step in range(s.progress.global_step, s.schedule.total_steps):
        stop = runtime.boundary(checkpointer.save)  # a requested checkpoint: no validation pass
        if stop:
            return stop
        epoch, _ = s.schedule.cursor(step)
        if epoch != order_epoch:
            order_epoch, order = epoch, training_order(s.order_lengths, train.seed, epoch,
                                                       s.schedule.sequences_per_step, train.group_by_length)
        started = time.monotonic()
        result = take_step_splitting(s, step, step_micro_batches(s.schedule, order, step), lr_plan.lr(step),
                                     should_abort, reporter.log)
        if result is None:  # stopped between two micro-batches: the state is still at the last boundary
            return runtime.boundary(checkpointer.save)
        # Building compiled traces (the first step, a new length bucket) is set-up, not training.
        runtime.not_training(result.compile_s)
        s.progress.record(result.loss, result.tokens, getattr(result, "reward_mean", None))
        reporter.on_step(epoch, result, max(time.monotonic() - started - result.compile_s, 1e-9))
        lr_plan.after_step()
        if checkpointer.due():
            runtime.account(training=True)
            evaluator.measure()
            checkpointer.save()
    runtime.account(training=True)
    return runtime.stop_reason() if runtime.finished_early else None


def train(run: RunDir, cfg: Config, log, heartbeat, budget, config_path: Path | None, overrides: list[str],
          progress: bool | None = None, world: World = SINGLE,
          final_eval=None, page=None, death: dict | None = None, stage=None) -> RunResult:
    """Given a locked run directory (`run.debug`: the `run --debug` variant, which starts
    from scratch under `debug/`), a validated config and the runtime's pieces, train
    until done, stopped, out of budget or window; return the RunResult. Raise InputError
    (exit 78) for a bad model, dataset, target list or a checkpoint of another
    configuration, TemporaryFailure (exit 75) when a checkpoint cannot be written.

    `final_eval(model, tokenizer, problems, n, template)` (evaluation/evaluate.py, passed
    in by the CLI) answers validation problems with and without the adapters at the end
    of a run when train.final_eval asks for it. `page` (runtime/report_page.py's Page, rank
    0 only) is refreshed after every checkpoint. `stage` (training/stages.py's Stage) is
    the stage of an "sft+grpo" run this call trains (None: a one-method run)."""

    if run.debug and world.leader:
        for folder in (run.checkpoints, run.adapters):  # a debug run always starts from scratch
            shutil.rmtree(folder, ignore_errors=True)
    show_bar = show_progress_bar(progress)
    with ExitStack() as stack:
        flags = signals.Flags()
        stack.callback(signals.install(flags, on_signal=lambda name: log.info("signal.received", signal=name)))
        heartbeat.update(state="running", phase="loading", started_at=datetime.now().astimezone().isoformat(),
                         version=__version__, world_size=world.size, log_path=str(run.log_file))
        heartbeat.start(10.0, live_fields=lambda: {"budget_used_s": round(budget.used_s, 1),
                                                   "budget_left_s": round(budget.left_s, 1)})
        watcher = _setup_watcher(stack, run, None if run.debug else config_path, flags) if world.leader else None
        if flags.stop.is_set() and not world.distributed:
            # Stopped while starting (a logout as launchd started us): nothing was trained
            # since the newest checkpoint, so there is nothing to load or save.
            return _stopped_before_training(log, heartbeat, budget, flags)
        try:
            s = setup_session(run, cfg, log, heartbeat, world, show_bar)
            split_after_death(s.progress, death, log)  # the last start was killed for memory: smaller micro-batches
            runtime = Runtime(run, cfg, config_path, overrides, log, flags, heartbeat, budget,
                              take_control=watcher.take_control if watcher else list,
                              poll_control=watcher.poll if watcher else None, world=world,
                              view=stage.view if stage else None, budget_total=stage.budget_total if stage else None)
            reporter = Reporter(s, runtime, show_bar, page)
            stack.callback(reporter.close)
            evaluator = Evaluator(s.progress, Validator.of(s, cfg.train) if world.leader else None, reporter,
                                  cfg.train.early_stop_evals, runtime.finish_early, flags.interruptible)
            checkpointer = Checkpointer(s, runtime, reporter)
            lr_plan = LRPlan(cfg.train, s.schedule.total_steps, s.progress, budget, log,
                             agree=lambda length: gather_ints(world, [length])[0][0])
            _setup_trackers(stack, run, cfg, s.progress.global_step, log, world, stage.step_offset if stage else 0)
            inhibitor = _setup_sleep_inhibitor(stack, cfg, log)
            runtime.on_config_change = lambda old, new: _apply_reloaded(old.daemon, new.daemon, inhibitor, log)
            s.model.train()  # dropout active
            log.info("train.start", sequences=len(s.cache), rows=len(s.items), steps_per_epoch=s.schedule.steps_per_epoch,
                     total_steps=s.schedule.total_steps, sequences_per_step=s.schedule.sequences_per_step,
                     start_step=s.progress.global_step, budget_used_s=round(budget.used_s, 1),
                     budget_total_s=budget.total_s)
            heartbeat.update(phase="training", total_steps=s.schedule.total_steps, step=s.progress.global_step)
            if s.progress.stopped_early and cfg.train.early_stop_evals:
                # Early stopping ended this run before: it stays finished (set early_stop_evals = 0 to go on).
                runtime.finish_early(s.progress.stopped_early)
            # A stop must be seen by every rank between the same two micro-batches (all ranks).
            should_abort = flags.stop.is_set if not world.distributed else (
                lambda: any_true(world, flags.stop.is_set()))
            if s.grpo is not None:  # a stop raises out of the rollouts, or abandons the step before its update
                s.grpo.interruptible, s.grpo.should_abort = flags.interruptible, should_abort
                heartbeat.update(method="grpo")
            stop = loop(s, runtime, evaluator, checkpointer, reporter, should_abort, lr_plan)
            reporter.close()
            # Every way out leaves its state as a checkpoint; the run's last step is
            # evaluated like any scheduled checkpoint, a requested exit saves at once.
            if stop is None and checkpointer.last_step != s.progress.global_step:
                evaluator.measure()
            checkpointer.save()
            runtime.account(training=True)
            return _finish(s, run, log, heartbeat, budget, reporter, checkpointer, stop, flags, final_eval)
        except KeyboardInterrupt:
            log.error("daemon.stop", reason="interrupted by a second Ctrl-C: no checkpoint of the unfinished step",
                      exit_code=EXIT_INTERRUPTED)
            raise
        except BaseException as exc:
            if world.distributed and lost_peer(exc):  # e.g. "[ring] connection to a peer was lost" in a step
                raise peer_lost_error(world, exc) from exc
            if not isinstance(exc, (InputError, TemporaryFailure)):
                log.error("daemon.stop", reason="crash", error=f"{type(exc).__name__}: {exc}", exit_code=1)
            raise


def _stopped_before_training(log, heartbeat, budget, flags) -> RunResult:
    fields = {"reason": flags.stop_reason, "exit_code": EXIT_OK, "step": None,
              "signal_to_exit_s": round(time.monotonic() - flags.signal_at, 3) if flags.signal_at else None}
    log.info("daemon.stop", **fields)
    heartbeat.update(state="stopped", phase="done", reason=f"{flags.stop_reason} while starting; nothing trained")
    return RunResult(EXIT_OK, 0, None, None, None, "stopped")


def _setup_watcher(stack: ExitStack, run: RunDir, config_path: Path | None, flags):
    """Rank 0 watches the control file and the config; it passes stops and pauses on."""

    watcher = FileWatcher(run, config_path, on_control=flags.request_control, on_config=flags.request_reload)
    watcher.prime()
    watcher.start()
    stack.callback(watcher.stop)
    return watcher


def _setup_trackers(stack: ExitStack, run: RunDir, cfg: Config, start_step: int, log, world: World,
                    step_offset: int = 0) -> None:
    """TensorBoard, W&B, MLflow ([report]): rank 0 mirrors the log's figures into them,
    `step_offset` steps along (the GRPO stage of "sft+grpo": after the SFT steps)."""
    r = cfg.report
    if not world.leader or not (r.tensorboard or r.wandb_project or r.mlflow_uri):
        return

    trackers = Trackers(run, r, tracker_config(cfg), start_step, log, step_offset)
    trackers.attach()
    stack.callback(trackers.close)


def _setup_sleep_inhibitor(stack: ExitStack, cfg: Config, log) -> None:
    inhibitor = SleepInhibitor()
    stack.callback(inhibitor.stop)
    if cfg.daemon.prevent_sleep:
        inhibitor.start(os.getpid())
        log.info("power.prevent_sleep", **inhibitor.describe())
    return inhibitor


def _apply_reloaded(old, new, inhibitor, log) -> None:
    """The reloaded [daemon] keys that act outside the runtime's boundary (the boundary
    applies the budget, window, thresholds; the Checkpointer reads its cadence and
    retention live): MLX's memory limit and the sleep inhibitor."""

    if new.memory_limit_gb != old.memory_limit_gb:  # 0: MLX's own default comes back
        log.info("memory.limits", memory_limit_gb=new.memory_limit_gb,
                 **apply_limits(new.memory_limit_gb, wired_limit=False), reloaded=True)
    if new.prevent_sleep != old.prevent_sleep:
        if new.prevent_sleep:
            inhibitor.start(os.getpid())
            log.info("power.prevent_sleep", **inhibitor.describe(), reloaded=True)
        else:
            inhibitor.stop()
            log.info("power.allow_sleep", reloaded=True)


def _finish(s, run: RunDir, log, heartbeat, budget, reporter, checkpointer, stop, flags, final_eval) -> RunResult:
    """Write the adapters (the best by validation loss, or the last), evaluate them at
    the run's end (finished, or its budget spent: train.final_eval, its time not charged
    to the budget), and tell how training ended: the log, the status and the morning
    report (report.json, which later starts keep)."""

    step, p, cfg = s.progress.global_step, s.progress, s.cfg
    final_state = stop.state if stop else "finished"
    reason = stop.reason if stop else "finished"
    report = {}
    last_loss = reporter.last_loss if reporter.last_loss is not None else (
        p.recent_losses[-1] if p.recent_losses else None)  # a start that resumed at the final step took none
    if s.world.leader:
        start = s.grpo.reference if s.grpo is not None else None  # GRPO from adapters: a candidate too
        weights, selected = checkpointer.best_adapters(start) if cfg.train.select == "best" else (None, None)
        if weights is not None:
            s.model.load_weights(list(weights.items()), strict=False)
        else:  # the current state: the last step, which may be the best too
            best_now = cfg.train.select == "best" and p.best_eval_step == step
            selected = {"rule": "lowest validation loss" if best_now else "last", "step": step,
                        "val_loss": p.eval_loss if p.eval_step == step else None}
        try:
            save_adapters(s.model, run.adapters, adapter_config(cfg, len(s.model.layers), s.keys,
                                                                s.prompt_format.describe(), selected))
        except OSError as exc:
            raise TemporaryFailure(f"the final adapters could not be written to {run.adapters}: "
                                   f"{exc.strerror or exc}; checkpoint step {step} is intact and the next start "
                                   "writes them") from exc
        report = morning_report(p, run.adapters, selected, step)
        report["run_dir"] = str(run.root)
        if final_state in ("finished", "budget_exhausted") and cfg.train.final_eval and final_eval is not None \
                and s.cache.validation:
            heartbeat.update(phase="evaluating")
            try:
                with flags.interruptible():
                    testhooks.hold_point("final_eval", step)
                    report["final_eval"] = final_eval(s.model, s.tokenizer, s.cache.validation.problems(),
                                                      cfg.train.final_eval, cfg.data.template)
                log.info("train.final_eval", **report["final_eval"])
            except Interrupted as exc:
                # The adapters are written; the next start answers the problems (nothing else).
                report["final_eval_pending"] = True
                log.warning("train.final_eval.interrupted", reason=str(exc), step=step)
    if stop and stop.event:
        log.info(stop.event, reason=reason, step=step, budget_used_s=round(budget.used_s, 1),
                 budget_total_s=budget.total_s)
    if final_state == "finished" and s.world.leader:
        log.info("train.done", steps=step, first_loss=p.first_loss, last_loss=last_loss,
                 recent_loss=report.get("recent_loss"), adapters=str(run.adapters),
                 train_seconds=round(budget.used_s, 2), tokens_seen=p.tokens_seen, **reporter.totals(),
                 **{k: report[k] for k in ("selected_step", "best_val_loss", "base_val_loss") if k in report})
    fields = {"reason": reason, "exit_code": EXIT_OK, "step": step}
    if flags.signal_at is not None:
        fields["signal_to_exit_s"] = round(time.monotonic() - flags.signal_at, 3)
    if s.world.leader:
        try:
            write_report(run, final_state, reason, step, report, identity=training_identity(cfg),
                         budget_used_s=round(budget.used_s, 1), budget_total_s=budget.total_s)
        except OSError as exc:
            raise TemporaryFailure(f"the morning report could not be written to {run.report_file}: "
                                   f"{exc.strerror or exc}; checkpoint step {step} and the adapters are intact") from exc
    log.info("daemon.stop", **fields)
    heartbeat.update(state=final_state, phase="done", reason=reason, step=step,
                     budget_used_s=round(budget.used_s, 1), budget_left_s=round(budget.left_s, 1), report=report)
    return RunResult(EXIT_OK, step, p.first_loss, last_loss, run.adapters, final_state, report)


def morning_report(p, adapters: Path, selected: dict, step: int) -> dict:
    """What the run did, for `status` and the end of a foreground run: where the adapters
    are and which step they are, the validation loss of the base and of the best step,
    and the training loss of the run's first step against its recent steps."""
    report = {"adapters": str(adapters), "steps": step, "selected_step": selected["step"],
              "selected_rule": selected["rule"],
              "first_loss": p.first_loss, "recent_loss": p.recent_mean()}
    if p.base_eval_loss is not None:
        report["base_val_loss"] = p.base_eval_loss
    if p.best_eval_loss is not None:
        report["best_val_loss"], report["best_val_step"] = p.best_eval_loss, p.best_eval_step
    if p.first_reward is not None:  # GRPO: validation is greedy accuracy (its "loss" is 1 - accuracy)
        report["method"] = "grpo"
        report["first_reward"] = p.first_reward
        report["recent_reward"] = sum(p.recent_rewards[-10:]) / len(p.recent_rewards[-10:])
        for name in ("base", "best"):
            if report.get(f"{name}_val_loss") is not None:
                report[f"{name}_val_accuracy"] = 1.0 - report[f"{name}_val_loss"]
    return report
