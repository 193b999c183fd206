"""`run`: what launchd starts, top to bottom.

`run_command` holds the run directory's lock and applies the guards that decide, before
anything heavy is loaded, whether this start should train at all (crash loop, repeated
config error, spent budget, outside the window). `train` then loads the model and data,
adds LoRA, resumes from the newest checkpoint that verifies, and takes optimizer steps,
asking the runtime at every step boundary whether to go on, pause or stop; it checkpoints
at least every `segment_minutes` and on every exit, and writes the adapters.

Started by `mlx.launch`, every rank runs this same command. Rank 0 does everything above;
the other ranks (`_run_worker`) hold no lock and write nothing into the run directory:
they wait for rank 0's go (`_StartGate`), load the same model and data, take rank 0's
adapters and optimizer state, and compute their share of every step
(daemon/distributed.py). Stops, pauses and the budget act at the same step boundary on
all ranks (daemon/runtime.py).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from daemon import __version__, crashguard
from daemon.config import Config, load_config
from daemon.distributed import GO, SINGLE, World, init_world, start_handshake
from daemon.errors import EXIT_CONFIG, EXIT_OK, EXIT_TEMPFAIL, InputError, TemporaryFailure
from daemon.logs import LOG_FILE, close_logging, setup_logging
from checkpoints.fsio import ensure_private_dir

DEBUG_ROWS = 10
DEBUG_STEPS = 4
KERNEL_CACHE = Path("cache") / "mlx-kernels"


@dataclass
class RunResult:
    exit_code: int
    steps: int
    first_loss: float | None
    last_loss: float | None
    adapters: Path | None
    state: str = "finished"


def model_dir(cfg: Config, run_dir: Path) -> Path:
    path = Path(cfg.model.path).expanduser()
    return path if path.is_absolute() else run_dir / path


def use_kernel_cache(run_dir: Path) -> Path | None:
    """On CUDA, keep the kernels MLX compiles on first use (minutes for a 4-bit model) in
    the run directory, so that a restart, even after a reboot, loads them instead of
    compiling again; return that folder, or None (not CUDA, or MLX_PTX_CACHE_DIR set by
    the user). The folder is per MLX version and GPU: a kernel is never loaded by
    another MLX or for another chip. Call before MLX compiles anything."""
    import re

    import mlx.core as mx

    if "MLX_PTX_CACHE_DIR" in os.environ or not mx.cuda.is_available():
        return None
    gpu = re.sub(r"[^A-Za-z0-9.]+", "-", str(mx.device_info().get("device_name") or "gpu")).strip("-")
    path = run_dir / KERNEL_CACHE / f"mlx-{mx.__version__}-{gpu}"
    ensure_private_dir(path)
    os.environ["MLX_PTX_CACHE_DIR"] = str(path)
    return path


def debug_config(cfg: Config) -> Config:
    """Given a config, return the `--debug` variant: the first 10 rows, a few steps, no
    budget or window."""
    data = replace(cfg.data, limit=DEBUG_ROWS)
    train = replace(cfg.train, epochs=1, max_steps=min(cfg.train.max_steps or DEBUG_STEPS, DEBUG_STEPS))
    daemon = replace(cfg.daemon, window="", pause_on_battery=False, prevent_sleep=False)
    return replace(cfg, data=data, train=train, daemon=daemon)


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


def run_command(run_dir: Path, config_path: Path | None, overrides: list[str], debug: bool = False,
                progress: bool | None = None) -> int:
    """Given the run directory, the config file and `--set` overrides, run the daemon and
    return its exit code (DESIGN.md "Exit codes"); a second daemon on the same run
    directory gets 75 and changes nothing. Under mlx.launch, rank 0 runs this and the
    other ranks run `_run_worker`."""
    if not run_dir.is_dir():
        raise InputError(f"--run-dir {run_dir}: no such directory")
    world = init_world()
    if not world.leader:
        return _run_worker(run_dir, config_path, overrides, debug, world)
    gate = _StartGate(world)
    exit_code = 1
    try:
        exit_code = _run_leader(run_dir, config_path, overrides, debug, progress, world, gate)
        return exit_code
    except InputError:
        exit_code = EXIT_CONFIG
        raise
    except TemporaryFailure:
        exit_code = EXIT_TEMPFAIL
        raise
    finally:
        gate.release(exit_code)


def _run_worker(run_dir: Path, config_path: Path | None, overrides: list[str], debug: bool, world: World) -> int:
    """A rank other than 0: no lock, no files written into the run directory; logs go to
    its stderr (mlx.launch prefixes nothing, so every line carries `rank`)."""
    from daemon.budget import Budget
    from daemon.status import NullHeartbeat

    log = setup_logging(None, run_dir.resolve().name).bind(rank=world.rank, world_size=world.size)
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
    if debug:
        cfg = debug_config(cfg)
    # Rank 0 alone owns the budget and the window; this rank brings its signals, memory and power.
    cfg = replace(cfg, daemon=replace(cfg.daemon, window=""))
    try:
        result = train(run_dir, cfg, log, NullHeartbeat(), Budget(float("inf"), 0.0), None, overrides, debug,
                       progress=False, world=world)
    finally:
        close_logging()
    return result.exit_code


def _run_leader(run_dir: Path, config_path: Path | None, overrides: list[str], debug: bool,
                progress: bool | None, world: World, gate: _StartGate) -> int:
    """Rank 0 (or the only process): lock, guards, then train."""
    from daemon.budget import Budget, initial_used, read_used_seconds
    from daemon.lock import LockHeld, acquire_lock
    from daemon.schedule import inside, next_start, parse_window
    from daemon.status import Heartbeat

    config_text = config_path.read_text(errors="replace") if config_path and config_path.is_file() else None
    chash = crashguard.config_hash(config_text, overrides)
    try:
        lock = acquire_lock(run_dir)
    except LockHeld as exc:
        print(f"mathlora-daemon run: {exc}; not starting a second daemon", file=sys.stderr)
        return EXIT_TEMPFAIL
    with lock:
        crashes = crashguard.begin_start(run_dir, os.getpid(), time.time())
        # launchd restarts us after every non-zero exit; the guard ends such loops. A start
        # from a terminal is a person trying again (after fixing data, freeing memory ...).
        guarded = not debug and not sys.stdin.isatty()
        if not guarded:
            crashguard.clear_failure(run_dir)
        try:
            cfg = load_config(config_path, overrides)
        except InputError as exc:
            failure = crashguard.read_failure(run_dir)
            if failure and failure.get("kind") == "config" and failure.get("config_hash") == chash:
                print(f"mathlora-daemon run: not starting: the configuration error recorded earlier is unchanged "
                      f"(fix {config_path} and start again):\n{exc}", file=sys.stderr)
                crashguard.record_clean_exit(run_dir, EXIT_OK)
                return EXIT_OK
            crashguard.record_failure(run_dir, str(exc), "config", chash, time.time())
            crashguard.record_clean_exit(run_dir, EXIT_CONFIG)
            raise
        if debug:
            cfg = debug_config(cfg)
        log = setup_logging(run_dir, run_dir.resolve().name, quiet_events=_quiet(progress))
        if world.distributed:
            log = log.bind(rank=0, world_size=world.size)
        heartbeat = Heartbeat(run_dir, run_dir.resolve().name, os.getpid(), cfg.daemon.budget_hours * 3600)
        exit_code = EXIT_CONFIG
        try:
            log.info("daemon.start", pid=os.getpid(), version=__version__, run_dir=str(run_dir.resolve()),
                     debug=debug, crashed_starts_before=crashes, **world.describe())
            reason = crashguard.decide(run_dir, crashes, cfg.daemon.max_crash_restarts, chash) if guarded else None
            if reason:
                if crashguard.read_failure(run_dir) is None:
                    crashguard.record_failure(run_dir, reason, "crash_loop", chash, time.time())
                heartbeat.update(state="failed", phase="done", reason=reason)
                log.error("daemon.failed", reason=reason)
                exit_code = EXIT_OK  # launchd must stop restarting us
                return exit_code
            used = 0.0 if debug else initial_used(*read_used_seconds(run_dir))
            budget = Budget(float("inf") if debug else cfg.daemon.budget_hours * 3600, used)
            heartbeat.update(budget_used_s=budget.used_s, budget_total_s=budget.total_s,
                             budget_left_s=budget.left_s, window=cfg.daemon.window)
            if budget.exhausted:
                log.info("budget.exhausted", budget_used_s=round(budget.used_s, 1), budget_total_s=budget.total_s)
                heartbeat.update(state="budget_exhausted", phase="done", reason="training budget spent")
                exit_code = EXIT_OK
                return exit_code
            window = parse_window(cfg.daemon.window)
            if not inside(window, datetime.now()):
                opens = next_start(window, datetime.now())
                log.info("schedule.outside_window", window=cfg.daemon.window, next_start=opens.isoformat())
                heartbeat.update(state="stopped", phase="done",
                                 reason=f"outside the training window {cfg.daemon.window}; opens {opens:%H:%M}")
                exit_code = EXIT_OK
                return exit_code
            gate.open()
            result = train(run_dir, cfg, log, heartbeat, budget, config_path, overrides, debug, progress, world)
            exit_code = result.exit_code
            return exit_code
        except InputError as exc:
            log.error("daemon.stop", reason="error", error=str(exc), exit_code=EXIT_CONFIG)
            crashguard.record_failure(run_dir, str(exc), "config", chash, time.time())
            heartbeat.update(state="failed", phase="done", reason=str(exc))
            raise
        except TemporaryFailure as exc:
            log.error("daemon.stop", reason="temporary failure", error=str(exc), exit_code=EXIT_TEMPFAIL)
            exit_code = EXIT_TEMPFAIL
            raise
        finally:
            if exit_code in (EXIT_OK, EXIT_CONFIG, EXIT_TEMPFAIL):
                crashguard.record_clean_exit(run_dir, exit_code)
                heartbeat.update(pid=os.getpid())
                heartbeat.stop()  # the final state is on disk before the lock is released
            close_logging()


def _quiet(progress: bool | None) -> set[str]:
    show_bar = sys.stderr.isatty() if progress is None else progress
    return {"train.step"} if show_bar else set()


def train(run_dir: Path, cfg: Config, log, heartbeat, budget, config_path: Path | None, overrides: list[str],
          debug: bool = False, progress: bool | None = None, world: World = SINGLE) -> RunResult:
    """Given a locked run directory, a validated config and the runtime's pieces, train
    until done, stopped, out of budget or window; return the RunResult. Raise InputError
    (exit 78) for a bad model, dataset, target list or a checkpoint of another
    configuration, TemporaryFailure (exit 75) when a checkpoint cannot be written.

    In a distributed `world` every rank runs this; the collectives (marked "all ranks")
    happen in the same order on each, and only rank 0 touches checkpoints, adapters,
    status and the control file."""
    import json

    from mlx.utils import tree_flatten, tree_unflatten
    from tqdm import tqdm

    from checkpoints.store import cleanup_temporaries, find_latest_valid, prune
    from daemon import signals
    from daemon.batches import Schedule, step_micro_batches, training_order
    from daemon.checkpointing import Progress, fingerprint, restore_training_checkpoint, save_training_checkpoint
    from daemon.control import FileWatcher
    from daemon.convert import ensure_model
    from daemon.distributed import (any_true, barrier, broadcast_arrays, check_agreement, gather_ints, lost_peer,
                                    peer_lost_error)
    from daemon.memory import apply_limits
    from daemon.model import (adapter_config, apply_lora, load_base, save_adapters, total_count, trainable_count,
                              use_grad_checkpoint)
    from daemon.power import SleepInhibitor
    from daemon.prepare import prepare_tokens
    from daemon.runtime import Runtime
    from daemon.trainer import make_optimizer, train_step

    leader = world.leader
    if debug and leader:
        shutil.rmtree(run_dir / "debug", ignore_errors=True)  # a debug run always starts from scratch
    ckpt_root = run_dir / ("debug/checkpoints" if debug else "checkpoints")
    show_bar = sys.stderr.isatty() if progress is None else progress
    flags = signals.Flags()
    restore_signals = signals.install(flags, on_signal=lambda name: log.info("signal.received", signal=name))
    heartbeat.update(state="running", phase="loading", started_at=datetime.now().astimezone().isoformat(),
                     version=__version__, world_size=world.size, log_path=str(run_dir / LOG_FILE))
    heartbeat.start(10.0, live_fields=lambda: {"budget_used_s": round(budget.used_s, 1),
                                               "budget_left_s": round(budget.left_s, 1)})
    watcher = None
    if leader:  # the control file and config edits are rank 0's; it passes stops and pauses on
        watcher = FileWatcher(run_dir, None if debug else config_path, on_control=flags.request_control,
                              on_config=flags.request_reload)
        watcher.prime()
        watcher.start()
    inhibitor = SleepInhibitor()
    try:
        log.info("memory.limits", **apply_limits(cfg.daemon.memory_limit_gb, wired_limit=True))
        kernels = use_kernel_cache(run_dir) if leader else None  # other ranks write nothing here
        if kernels:
            log.info("train.kernel_cache", path=str(kernels))
        if not leader:
            barrier(world)  # all ranks: rank 0 converts and tokenizes first; on its machine the others reuse both
        mdir = ensure_model(cfg, run_dir, log)  # converts model.name into model.path when it is missing
        log.info("model.load.start", path=str(mdir))
        model, tokenizer, _ = load_base(mdir)
        heartbeat.update(phase="preparing")
        cache = prepare_tokens(cfg.data, run_dir, mdir, tokenizer, log, progress=show_bar)
        if leader:
            barrier(world)
        keys = apply_lora(model, cfg)
        if cfg.train.grad_checkpoint:
            use_grad_checkpoint(model)
        trainable, total = trainable_count(model), total_count(model)
        log.info("model.lora", trainable_params=trainable, total_params=total, keys=keys, lora_rank=cfg.lora.rank,
                 scale=cfg.lora_scale, dropout=cfg.lora.dropout, layers=len(model.layers),
                 grad_checkpoint=cfg.train.grad_checkpoint)
        if leader:
            print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%), "
                  f"LoRA rank {cfg.lora.rank} on {', '.join(keys)} of {len(model.layers)} layers", file=sys.stderr)

        schedule = Schedule(len(cache), cfg.train.batch_size, cfg.train.grad_accumulation_steps,
                            cfg.train.epochs, cfg.train.max_steps)
        optimizer = make_optimizer(cfg.train.learning_rate)
        fp = fingerprint(cfg, mdir, cache.meta["key"])
        check_agreement(world, "configuration fingerprint", json.dumps(fp, sort_keys=True))  # all ranks

        # Resume (rank 0): the newest checkpoint that verifies; torn ones are logged and skipped.
        resumed, state = None, Progress()
        if leader:
            for leftover in cleanup_temporaries(ckpt_root):
                log.info("checkpoint.cleaned", path=str(leftover))
            resumed = find_latest_valid(ckpt_root, on_rejected=lambda path, why: log.warning(
                "checkpoint.rejected", path=str(path), why=why))
        if resumed is not None:
            saved, state = restore_training_checkpoint(resumed.path, model, optimizer, fp)
            log.info("resume", from_step=state.global_step, path=str(resumed.path),
                     epoch=schedule.cursor(state.global_step)[0], tokens_seen=state.tokens_seen,
                     world_size=world.size, saved_world_size=saved.get("world_size", 1))
        if world.distributed:
            # All ranks: rank 0's step, adapters and Adam state, bit for bit (a fresh start too,
            # so no rank depends on its own initialisation).
            state.global_step = gather_ints(world, [state.global_step])[0][0]
            optimizer.init(model.trainable_parameters())
            params = broadcast_arrays(world, dict(tree_flatten(model.trainable_parameters())))
            moments = broadcast_arrays(world, dict(tree_flatten(optimizer.state)))
            if not leader:
                model.load_weights(list(params.items()), strict=False)
                optimizer.state = tree_unflatten(list(moments.items()))
        last_saved = state.global_step if resumed else -1
        protect = {resumed.path} if resumed else set()
        runtime = Runtime(run_dir, cfg, config_path, overrides, log, flags, heartbeat, budget,
                          take_control=watcher.take_control if watcher else list, world=world)

        def checkpoint() -> None:
            """Checkpoint the current step boundary (once), then prune; rank 0 only."""
            nonlocal last_saved, last_save_time
            if last_saved == state.global_step or not leader:
                return
            epoch, position = schedule.cursor(state.global_step)
            state.train_seconds = budget.used_s
            heartbeat.update(phase="checkpointing")
            t0 = time.monotonic()
            try:
                info = save_training_checkpoint(ckpt_root, model, optimizer, state, epoch, position, fp, cfg,
                                                world_size=world.size)
            except OSError as exc:
                log.error("checkpoint.failed", step=state.global_step, errno=exc.errno, error=str(exc))
                raise TemporaryFailure(f"checkpoint at step {state.global_step} could not be written: {exc}; "
                                       "earlier checkpoints are intact") from exc
            log.info("checkpoint.saved", step=info.step, path=str(info.path), bytes=info.bytes,
                     seconds=round(time.monotonic() - t0, 4))
            last_saved, last_save_time = state.global_step, time.monotonic()
            heartbeat.update(phase="training", last_checkpoint_step=info.step,
                             last_checkpoint_at=datetime.now().astimezone().isoformat())
            prune(ckpt_root, runtime.cfg.daemon.keep_checkpoints, protect=protect,
                  on_pruned=lambda i: log.info("checkpoint.pruned", step=i.step, path=str(i.path)))

        if cfg.daemon.prevent_sleep:
            inhibitor.start(os.getpid())
            log.info("power.prevent_sleep", **inhibitor.describe())
        model.train()  # dropout active
        log.info("train.start", sequences=len(cache), steps_per_epoch=schedule.steps_per_epoch,
                 total_steps=schedule.total_steps, sequences_per_step=schedule.sequences_per_step,
                 start_step=state.global_step, budget_used_s=round(budget.used_s, 1), budget_total_s=budget.total_s)
        heartbeat.update(phase="training", total_steps=schedule.total_steps, step=state.global_step)
        first = last = None
        stop = None
        totals = _Totals()
        order_epoch, order = -1, None
        last_save_time = last_beat = time.monotonic()
        bar = tqdm(total=schedule.total_steps, initial=state.global_step, unit="step",
                   disable=not (show_bar and leader), dynamic_ncols=True)
        # A stop must be seen by every rank between the same two micro-batches (all ranks).
        should_abort = flags.stop.is_set if not world.distributed else lambda: any_true(world, flags.stop.is_set())
        runtime.account(training=False)  # loading and preparing do not count against the budget
        for step in range(state.global_step, schedule.total_steps):
            stop = runtime.boundary(checkpoint)
            if stop:
                break
            epoch, _ = schedule.cursor(step)
            if epoch != order_epoch:
                order_epoch, order = epoch, training_order(cache.lengths, cfg.train.seed, epoch,
                                                           schedule.sequences_per_step, cfg.train.group_by_length)
            t0 = time.monotonic()
            # The compiled step (daemon/trainer.py), the same function for a fresh and a resumed run.
            result = train_step(model, optimizer, cache, step_micro_batches(schedule, order, step),
                                cfg.train.seed, step, should_abort=should_abort, world=world)
            if result is None:  # stop requested mid-step: the state is still at the last boundary
                stop = runtime.boundary(checkpoint)
                break
            # Building compiled traces (the first step, a new length bucket) is set-up, not training.
            step_s = max(time.monotonic() - t0 - result.compile_s, 1e-9)
            runtime.not_training(result.compile_s)
            totals.add(result)
            state.record(result.loss, result.tokens)
            if result.traces and leader:
                log.info("train.compiled", step=state.global_step, seconds=round(result.compile_s, 3),
                         traces=result.traces, traces_total=totals.traces, budgeted=False)
            if not leader:
                continue  # the other ranks log, report and checkpoint nothing
            if state.global_step == (resumed.step if resumed else 0) + 1:
                crashguard.record_progress(run_dir)
            first = result.loss if first is None else first
            last = result.loss
            mem = runtime.last_memory.as_fields() if runtime.last_memory else {}
            log.info("train.step", step=state.global_step, epoch=epoch, loss=result.loss,
                     lr=float(optimizer.learning_rate.item()), tokens=result.tokens,
                     tok_per_s=round(result.tokens / step_s, 1), step_s=round(step_s, 4),
                     padding=round(result.padding_share, 4),
                     budget_used_s=round(budget.used_s + step_s, 1),
                     budget_left_s=round(max(budget.total_s - budget.used_s - step_s, 0), 1), **mem)
            heartbeat.update(step=state.global_step, epoch=epoch, loss=result.loss, step_s=round(step_s, 4),
                             recent_mean_loss=sum(state.recent_losses) / len(state.recent_losses),
                             tok_per_s=round(result.tokens / step_s, 1), memory=mem)
            if time.monotonic() - last_beat >= 1.0:  # status is current, and a crash refunds < 1 s + a step
                heartbeat.update(budget_used_s=round(budget.used_s + step_s, 1))
                _write_quietly(heartbeat)
                last_beat = time.monotonic()
            if not bar.disable:  # the bar redraws at most ten times a second, not at every step
                bar.set_description_str(_bar_prefix(runtime, budget), refresh=False)
                bar.set_postfix_str(f"loss={result.loss:.3f} used={budget.used_s / 3600:.2f}h "
                                    f"left={budget.left_s / 3600:.2f}h tok/s={result.tokens / step_s:,.0f}",
                                    refresh=False)
                bar.update(1)
            every = runtime.cfg.daemon.checkpoint_every_steps
            if (every and state.global_step % every == 0) or \
                    time.monotonic() - last_save_time >= runtime.cfg.daemon.segment_minutes * 60:
                runtime.account(training=True)
                checkpoint()
        else:
            runtime.account(training=True)
        bar.close()
        checkpoint()  # every exit path leaves its state as a checkpoint
        runtime.account(training=True)

        out = run_dir / ("debug/adapters" if debug else "adapters")
        if leader:
            save_adapters(model, out, adapter_config(cfg, len(model.layers), keys))
        final_state = stop.state if stop else "finished"
        if stop and stop.event:
            log.info(stop.event, reason=stop.reason, step=state.global_step,
                     budget_used_s=round(budget.used_s, 1), budget_total_s=budget.total_s)
        if stop is None and leader:
            log.info("train.done", steps=state.global_step, first_loss=first, last_loss=last, adapters=str(out),
                     train_seconds=round(budget.used_s, 2), tokens_seen=state.tokens_seen, **totals.describe())
        fields = {"reason": stop.reason if stop else "finished", "exit_code": EXIT_OK, "step": state.global_step}
        if flags.signal_at is not None:
            fields["signal_to_exit_s"] = round(time.monotonic() - flags.signal_at, 3)
        log.info("daemon.stop", **fields)
        heartbeat.update(state=final_state, phase="done", reason=fields["reason"], step=state.global_step,
                         budget_used_s=round(budget.used_s, 1), budget_left_s=round(budget.left_s, 1))
        return RunResult(EXIT_OK, state.global_step, first, last, out, final_state)
    except BaseException as exc:
        if world.distributed and lost_peer(exc):  # e.g. "[ring] connection to a peer was lost" in a step
            raise peer_lost_error(world, exc) from exc
        if not isinstance(exc, (InputError, TemporaryFailure)):
            log.error("daemon.stop", reason="crash", error=f"{type(exc).__name__}: {exc}", exit_code=1)
        raise
    finally:
        inhibitor.stop()
        if watcher:
            watcher.stop()
        restore_signals()


class _Totals:
    """This start's compiled traces, compile time and padding, for `train.done`."""

    def __init__(self):
        self.traces, self.compile_s, self.tokens, self.positions = 0, 0.0, 0, 0

    def add(self, result) -> None:
        self.traces += len(result.traces)
        self.compile_s += result.compile_s
        self.tokens += result.tokens
        self.positions += result.positions

    def describe(self) -> dict:
        padding = 1.0 - self.tokens / self.positions if self.positions else 0.0
        return {"traces": self.traces, "compile_s": round(self.compile_s, 3), "padding": round(padding, 4)}


def _write_quietly(heartbeat) -> None:
    try:
        heartbeat.write()
    except OSError:
        pass  # a full disk must not stop training; the heartbeat thread retries, checkpoints report


def _bar_prefix(runtime, budget) -> str:
    """`[ends 07:00]`: when the window closes or the budget runs out, whichever is first."""
    ends = [t for t in (runtime.window_ends(),) if t is not None]
    if budget.left_s != float("inf"):
        ends.append(datetime.now() + (datetime.fromtimestamp(budget.left_s) - datetime.fromtimestamp(0)))
    return f"[ends {min(ends):%H:%M}]" if ends else "training"
