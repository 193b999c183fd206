"""`run`: what launchd starts, up to the first step.

`run_command` holds the run directory's lock and applies the guards that decide, before
anything heavy is loaded, whether this start should train at all (crash loop, repeated
config error, spent budget, outside the window); then training/loop.py's `train` sets
up, trains and wraps up.

Started by `mlx.launch`, every rank runs this same command. Rank 0 does everything above;
the other ranks (`_run_worker`) hold no lock and write nothing into the run directory:
they wait for rank 0's go (`_StartGate`), load the same model and data, take rank 0's
adapters and optimizer state, and compute their share of every step
(training/distributed.py). Stops, pauses and the budget act at the same step boundary on
all ranks (runtime/boundary.py).
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from mathlora_daemon import __version__, testhooks
from mathlora_daemon.config import Config, load_config
from mathlora_daemon.errors import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_OK, EXIT_TEMPFAIL, InputError, TemporaryFailure
from mathlora_daemon.rundir import RunDir, unwritable_error
from mathlora_daemon.runtime import crashguard
from mathlora_daemon.runtime.logs import LOGGER_NAME, close_logging, setup_logging
from mathlora_daemon.runtime.world import GO, World, init_world, start_handshake
from mathlora_daemon.training.loop import train
from mathlora_daemon.training.stages import read_stage, stage_config, staged, train_in_stages

DEBUG_ROWS = 10
DEBUG_STEPS = 4


def debug_config(cfg: Config) -> Config:
    """Given a config, return the `--debug` variant: the first 10 rows, a few steps, no
    budget or window."""
    data = replace(cfg.data, limit=DEBUG_ROWS)
    training = replace(cfg.train, epochs=1, max_steps=min(cfg.train.max_steps or DEBUG_STEPS, DEBUG_STEPS))
    daemon = replace(cfg.daemon, window="", pause_on_battery=False, prevent_sleep=False)
    return replace(cfg, data=data, train=training, daemon=daemon)


class _StartGate:
    """Rank 0's half of the start handshake. The other ranks wait for rank 0's guards
    (lock, crash loop, budget, window) before loading anything; `open` lets them train,
    `release` sends them rank 0's exit code instead. It happens exactly once."""

    def __init__(self, world: World):
        self.world, self.done = world, not world.distributed

    def open(self) -> None:
        """Start every rank; raise InputError / TemporaryFailure when a rank cannot."""
        self.done = True
        statuses = start_handshake(self.world, GO)
        failed = [(rank, code) for rank, code in enumerate(statuses) if code != GO]
        if failed:
            what = "; ".join(f"rank {rank} exits {code}" for rank, code in failed)
            error = InputError if any(code == EXIT_CONFIG for _, code in failed) else TemporaryFailure
            raise error(f"the distributed job cannot start: {what} (its own output says why)")

    def release(self, exit_code: int) -> None:
        if self.done:
            return
        self.done = True
        try:
            start_handshake(self.world, exit_code)
        except (RuntimeError, TemporaryFailure):
            pass  # a rank is already gone; rank 0's own exit status stands


def run_command(run: RunDir, config_path: Path | None, overrides: list[str], progress: bool | None = None,
                final_eval=None, page_figures=None) -> int:
    """Given the run directory (`run.debug`: the `run --debug` variant), the config file
    and `--set` overrides, run the daemon and return its exit code (docs/DESIGN.md, "Exit
    codes"); a second daemon on the same run directory gets 75 and changes nothing. Under
    mlx.launch, rank 0 runs this and the other ranks run `_run_worker`. `page_figures`
    (evaluation/plot.py, passed in by the CLI like `final_eval`) draws the plot of the
    report page (runtime/report_page.py)."""
    if not run.root.is_dir():
        raise InputError(f"--run-dir {run.root}: no such directory")
    world = init_world()
    if not world.leader:
        return _run_worker(run, config_path, overrides, world)
    gate = _StartGate(world)
    exit_code = 1
    try:
        exit_code = _run_leader(run, config_path, overrides, progress, world, gate, final_eval, page_figures)
        return exit_code
    except InputError:
        exit_code = EXIT_CONFIG
        raise
    except TemporaryFailure:
        exit_code = EXIT_TEMPFAIL
        raise
    finally:
        gate.release(exit_code)


def _cannot_write(run: RunDir, error: InputError | TemporaryFailure, guarded: bool, config_path: Path | None,
                  overrides: list[str]) -> int:
    """The run directory cannot be written: a temporary cause (a full disk) is 75; any
    other (permissions, a read-only mount, a file where a directory belongs) is 78, and
    since the crash guard cannot record it in the run directory, it is recorded in the
    user's state directory so launchd's next start ends the loop with 0."""
    if isinstance(error, TemporaryFailure):
        raise error
    reason = str(error)
    repeated = crashguard.repeated_outside_failure(run, reason) if guarded else None
    if repeated:
        print(f"mathlora-daemon run: not starting: {repeated}\nfix it, then start again "
              f"(`mathlora-daemon run --run-dir {shlex.quote(str(run.root))}`, or reload the service)", file=sys.stderr)
        return EXIT_OK
    crashguard.record_outside_failure(run, reason, time.time())
    if guarded:
        _notify_failure(run, config_path, overrides, reason)
    raise error


def _notify_failure(run: RunDir, config_path: Path | None, overrides: list[str], reason: str) -> None:
    """Tell about a failure that ended a guarded start before its log existed."""
    from mathlora_daemon.runtime.notify import Notifier, notify_settings

    settings = notify_settings(config_path, overrides)
    if settings is not None:
        Notifier(settings, run).send("failed", reason)


def _run_worker(run: RunDir, config_path: Path | None, overrides: list[str], world: World) -> int:
    """A rank other than 0: no lock, no files written into the run directory; logs go to
    its stderr (mlx.launch prefixes nothing, so every line carries `rank`)."""
    from mathlora_daemon.runtime.budget import Budget
    from mathlora_daemon.runtime.heartbeat import NullHeartbeat

    log = setup_logging(None, run.root.resolve().name).bind(rank=world.rank, world_size=world.size)
    try:
        cfg = load_config(config_path, overrides)
    except InputError as exc:
        start_handshake(world, EXIT_CONFIG)
        raise InputError(f"rank {world.rank}: {exc}") from exc
    statuses = start_handshake(world, GO)
    if any(code != GO for code in statuses):
        code = statuses[0] if statuses[0] != GO else EXIT_TEMPFAIL
        log.info("daemon.stop", reason="rank 0 did not start training", exit_code=code)
        return code
    if run.debug:
        cfg = debug_config(cfg)
    # Rank 0 alone owns the budget and the window; this rank brings its signals, memory and power.
    cfg = replace(cfg, daemon=replace(cfg.daemon, window=""))
    try:
        result = train(run, cfg, log, NullHeartbeat(), Budget(float("inf"), 0.0), None, overrides, progress=False,
                       world=world)
    finally:
        close_logging()
    return result.exit_code


def _run_leader(run: RunDir, config_path: Path | None, overrides: list[str], progress: bool | None,
                world: World, gate: _StartGate, final_eval=None, page_figures=None) -> int:
    """Rank 0 (or the only process): lock, guards, then train. A `--debug` run keeps
    everything it writes (lock, status, log, crash records, budget, report) under
    `debug/` (RunDir.scratch): the real run is never touched. The report page is kept
    (every checkpoint, every end but a crash or a second Ctrl-C) for the run, not --debug."""
    from mathlora_daemon.runtime.budget import Budget, initial_used, read_used_seconds
    from mathlora_daemon.runtime.heartbeat import Heartbeat
    from mathlora_daemon.runtime.lock import LockHeld, acquire_lock
    from mathlora_daemon.runtime.notify import Notifier
    from mathlora_daemon.runtime.report import finished_already, pointer, training_identity, write_report
    from mathlora_daemon.runtime.report_page import Page
    from mathlora_daemon.runtime.schedule import inside, next_start, parse_window
    from mathlora_daemon.training.oom import died_of_memory

    debug = run.debug  # then its lock, state, log and crash records are under run.scratch (debug/)
    config_text = config_path.read_text(errors="replace") if config_path and config_path.is_file() else None
    chash = crashguard.config_hash(config_text, overrides)
    # launchd restarts us after every non-zero exit; the guard ends such loops. A start
    # from a terminal is a person trying again (after fixing data, freeing memory ...).
    guarded = not debug and not sys.stdin.isatty()
    unwritable = unwritable_error(replace(run, debug=False))  # the run directory itself, --debug or not
    if unwritable is not None:
        return _cannot_write(run, unwritable, guarded, config_path, overrides)
    crashguard.clear_outside_failure(run)
    if debug:
        run.scratch.mkdir(exist_ok=True)
    try:
        lock = acquire_lock(run)
    except LockHeld as exc:
        print(f"mathlora-daemon run: {exc}; not starting a second daemon", file=sys.stderr)
        return EXIT_TEMPFAIL
    with lock:
        started_unix = time.time()
        crashes = crashguard.begin_start(run, os.getpid(), started_unix)
        if not guarded:
            crashguard.clear_failure(run)
        try:
            cfg = load_config(config_path, overrides)
        except InputError as exc:
            failure = crashguard.read_failure(run)
            if failure and failure.get("kind") == "config" and failure.get("config_hash") == chash:
                print(f"mathlora-daemon run: not starting: the configuration error recorded earlier is unchanged "
                      f"(fix {config_path} and start again):\n{exc}", file=sys.stderr)
                crashguard.record_clean_exit(run, EXIT_OK)
                return EXIT_OK
            crashguard.record_failure(run, str(exc), "config", chash, time.time())
            crashguard.record_clean_exit(run, EXIT_CONFIG)
            _quietly(write_report, run, "failed", f"configuration error: {exc}", None, None)
            if guarded:
                _notify_failure(run, config_path, overrides, f"configuration error: {exc}")
            raise
        if debug:
            cfg = debug_config(cfg)
        used = 0.0 if debug else initial_used(*read_used_seconds(run))
        budget = Budget(float("inf") if debug else cfg.daemon.budget_hours * 3600, used)
        identity = training_identity(cfg)
        done = None if debug else finished_already(run, identity, budget.exhausted)
        if done is not None:
            # Nothing left to do (launchd at every login, the systemd timer): answer at
            # once, without loading the model, and leave the report and adapters as they are.
            what = "finished" if done["state"] == "finished" else "spent its training budget"
            print(f"mathlora-daemon run: this run {what} at step {done.get('step')}; nothing to do. "
                  f"{pointer(done, run)}. To train further raise "
                  f"{'train.epochs or train.max_steps' if done['state'] == 'finished' else 'daemon.budget_hours'}, "
                  "or start a new run directory.", file=sys.stderr)
            crashguard.record_clean_exit(run, EXIT_OK)
            return EXIT_OK
        log = setup_logging(run, run.root.resolve().name, quiet_events=_quiet(progress))
        if world.distributed:
            log = log.bind(rank=0, world_size=world.size)
        # Before this start's heartbeat replaces it: did the last start die of memory?
        death = died_of_memory(run, cfg.daemon.memory_warning_available_gb)
        heartbeat = Heartbeat(run, run.root.resolve().name, os.getpid(), cfg.daemon.budget_hours * 3600)
        page = None if debug else Page(run, page_figures, heartbeat, log)
        notifier = None if debug else Notifier(cfg.notify, run, log)
        if notifier is not None:
            logging.getLogger(LOGGER_NAME).addHandler(notifier)  # hears a new best
        exit_code = EXIT_CONFIG
        try:
            log.info("daemon.start", pid=os.getpid(), version=__version__, run_dir=str(run.root.resolve()),
                     debug=debug, crashed_starts_before=crashes, **world.describe())
            reason = crashguard.decide(run, crashes, cfg.daemon.max_crash_restarts, chash) if guarded else None
            if reason:
                if crashguard.read_failure(run) is None:
                    crashguard.record_failure(run, reason, "crash_loop", chash, time.time())
                heartbeat.update(state="failed", phase="done", reason=reason)
                log.error("daemon.failed", reason=reason)
                _quietly(write_report, run, "failed", reason, None, None)
                exit_code = EXIT_OK  # launchd must stop restarting us
                return exit_code
            heartbeat.update(budget_used_s=budget.used_s, budget_total_s=budget.total_s,
                             budget_left_s=budget.left_s, window=cfg.daemon.window)
            window = parse_window(cfg.daemon.window)
            if not budget.exhausted and not inside(window, datetime.now()):
                opens = next_start(window, datetime.now())
                log.info("schedule.outside_window", window=cfg.daemon.window, next_start=opens.isoformat())
                heartbeat.update(state="stopped", phase="done",
                                 reason=f"outside the training window {cfg.daemon.window}; opens {opens:%H:%M}")
                exit_code = EXIT_OK
                return exit_code
            if staged(cfg) and world.distributed:
                raise InputError('train.method = "sft+grpo" runs in one process (its GRPO stage cannot be '
                                 'data-parallel yet): start `run` without `launch`')
            if not budget.exhausted:  # before anything heavy loads: will a step fit? (78 naming what would)
                from mathlora_daemon.training.memory_plan import check_memory

                stage = read_stage(run)["stage"]
                # A two-stage night is planned for both stages: the GRPO one must fit too.
                for planned in ([stage] if not staged(cfg) or stage == "grpo" else [stage, "grpo"]):
                    check_memory(stage_config(cfg, run, planned), run.model(cfg.model.path), log,
                                 run.checkpoints, ranks=world.size, cache_root=run.cache)
            # A spent budget still goes on when the adapters or the final eval of the
            # last step are missing (a kill as the budget ran out): the loop stops at
            # once and the end is written.
            gate.open()

            def train_stage(stage_cfg, stage_budget, stage=None):
                return train(run, stage_cfg, log, heartbeat, stage_budget, config_path, overrides, progress, world,
                             final_eval, page, death, stage)

            result = train_in_stages(run, cfg, budget, log, heartbeat, train_stage) if staged(cfg) else \
                train_stage(cfg, budget)
            testhooks.hold_point("exit", result.steps)
            if result.report and result.state in ("finished", "budget_exhausted"):
                print_report(result.report, file=sys.stdout)
            exit_code = result.exit_code
            return exit_code
        except InputError as exc:
            log.error("daemon.stop", reason="error", error=str(exc), exit_code=EXIT_CONFIG)
            crashguard.record_failure(run, str(exc), "config", chash, time.time())
            heartbeat.update(state="failed", phase="done", reason=str(exc))
            _quietly(write_report, run, "failed", str(exc), None, None)
            raise
        except TemporaryFailure as exc:
            log.error("daemon.stop", reason="temporary failure", error=str(exc), exit_code=EXIT_TEMPFAIL)
            heartbeat.update(state="stopped", phase="done",
                             reason=f"temporary failure (exit 75; launchd and systemd start it again): {exc}")
            exit_code = EXIT_TEMPFAIL
            raise
        except KeyboardInterrupt:
            # The second Ctrl-C: exit at once, without a checkpoint of the unfinished step.
            from mathlora_daemon.runtime.status import SECOND_CTRL_C

            heartbeat.update(state="stopped", phase="done", reason=SECOND_CTRL_C)
            exit_code = EXIT_INTERRUPTED
            raise
        finally:
            if exit_code in (EXIT_OK, EXIT_CONFIG, EXIT_TEMPFAIL, EXIT_INTERRUPTED):
                # Each write may meet the full disk that ended the run: the exit's own
                # message must stand, not a second "No space left on device".
                _quietly(crashguard.record_clean_exit, run, exit_code)
                heartbeat.update(pid=os.getpid())
                heartbeat.stop()  # the final state is on disk before the lock is released
                error = sys.exc_info()[1]  # the page after a crash would say running; a 2nd Ctrl-C is at once
                if page is not None and (error is None or isinstance(error, (InputError, TemporaryFailure))):
                    page.refresh(final=True)  # never raises
                if notifier is not None:
                    notifier.send_end(started_unix)  # the end this start wrote, if it wrote one; never raises
            if notifier is not None:
                logging.getLogger(LOGGER_NAME).removeHandler(notifier)
            close_logging()


def _quietly(write, *args) -> None:
    """A bookkeeping write on the way out that must not replace the exit's own error."""
    try:
        write(*args)
    except OSError:
        pass


def _quiet(progress: bool | None) -> set[str]:
    from mathlora_daemon.training.reporter import show_progress_bar

    return {"train.step"} if show_progress_bar(progress) else set()


def print_report(report: dict, file) -> None:
    """The end of a foreground run: the same summary `status` gives on a finished run."""
    from mathlora_daemon.runtime.status import report_lines

    print("\n".join(report_lines(report)), file=file)
