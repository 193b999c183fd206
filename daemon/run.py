"""`run`: the training loop, top to bottom.

Given a run directory and its config: load the model, prepare tokens, add LoRA, resume
from the newest checkpoint that verifies, then take optimizer steps over the
deterministic data order, checkpointing at step boundaries at least every
`segment_minutes`, and write the final adapters in mlx-lm's format.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from daemon import __version__
from daemon.config import Config
from daemon.errors import TemporaryFailure
from daemon.logs import close_logging, setup_logging

DEBUG_ROWS = 10
DEBUG_STEPS = 4


@dataclass
class RunResult:
    exit_code: int
    steps: int
    first_loss: float | None
    last_loss: float | None
    adapters: Path | None


def model_dir(cfg: Config, run_dir: Path) -> Path:
    path = Path(cfg.model.path).expanduser()
    return path if path.is_absolute() else run_dir / path


def debug_config(cfg: Config) -> Config:
    """Given a config, return the `--debug` variant: the first 10 rows, a few steps."""
    data = replace(cfg.data, limit=DEBUG_ROWS)
    train = replace(cfg.train, epochs=1, max_steps=min(cfg.train.max_steps or DEBUG_STEPS, DEBUG_STEPS))
    return replace(cfg, data=data, train=train)


def memory_fields() -> dict:
    import mlx.core as mx
    import psutil

    gb = 1024 ** 3
    return {"mem_active_gb": round(mx.get_active_memory() / gb, 3), "mem_peak_gb": round(mx.get_peak_memory() / gb, 3),
            "rss_gb": round(psutil.Process().memory_info().rss / gb, 3),
            "sys_available_gb": round(psutil.virtual_memory().available / gb, 3)}


def run_training(run_dir: Path, cfg: Config, debug: bool = False, progress: bool | None = None) -> RunResult:
    """Given a run directory and a validated config, train (resuming when a checkpoint
    exists) and return the RunResult; raise InputError (exit 78) for a bad model, dataset,
    target list or a checkpoint of another configuration, TemporaryFailure (exit 75) when
    a checkpoint cannot be written."""
    import mlx.nn as nn
    from tqdm import tqdm

    from checkpoints.store import cleanup_temporaries, find_latest_valid, prune
    from daemon.batches import Schedule, epoch_order, step_micro_batches
    from daemon.checkpointing import Progress, fingerprint, restore_training_checkpoint, save_training_checkpoint
    from daemon.model import adapter_config, apply_lora, load_base, save_adapters, total_count, trainable_count
    from daemon.prepare import prepare_tokens
    from daemon.trainer import make_optimizer, masked_loss, train_step

    if debug:
        cfg = debug_config(cfg)
        shutil.rmtree(run_dir / "debug", ignore_errors=True)  # a debug run always starts from scratch
    ckpt_root = run_dir / ("debug/checkpoints" if debug else "checkpoints")
    show_bar = sys.stderr.isatty() if progress is None else progress
    log = setup_logging(run_dir, run_dir.resolve().name, quiet_events={"train.step"} if show_bar else set())
    log.info("daemon.start", pid=os.getpid(), version=__version__, run_dir=str(run_dir.resolve()), debug=debug)
    try:
        mdir = model_dir(cfg, run_dir)
        log.info("model.load.start", path=str(mdir))
        model, tokenizer, _ = load_base(mdir)
        cache = prepare_tokens(cfg.data, run_dir, mdir, tokenizer, log, progress=show_bar)
        keys = apply_lora(model, cfg)
        trainable, total = trainable_count(model), total_count(model)
        log.info("model.lora", trainable_params=trainable, total_params=total, keys=keys, rank=cfg.lora.rank,
                 scale=cfg.lora_scale, dropout=cfg.lora.dropout, layers=len(model.layers))
        print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%), "
              f"LoRA rank {cfg.lora.rank} on {', '.join(keys)} of {len(model.layers)} layers", file=sys.stderr)

        schedule = Schedule(len(cache), cfg.train.batch_size, cfg.train.grad_accumulation_steps,
                            cfg.train.epochs, cfg.train.max_steps)
        optimizer = make_optimizer(cfg.train.learning_rate)
        fp = fingerprint(cfg, mdir, cache.meta["key"])

        # Resume: the newest checkpoint that verifies; torn ones are logged and skipped.
        for leftover in cleanup_temporaries(ckpt_root):
            log.info("checkpoint.cleaned", path=str(leftover))
        resumed = find_latest_valid(ckpt_root, on_rejected=lambda path, why: log.warning(
            "checkpoint.rejected", path=str(path), why=why))
        state = Progress()
        if resumed is not None:
            _, state = restore_training_checkpoint(resumed.path, model, optimizer, fp)
            log.info("resume", from_step=state.global_step, path=str(resumed.path),
                     epoch=schedule.cursor(state.global_step)[0], tokens_seen=state.tokens_seen)
        last_saved = state.global_step if resumed else -1
        protect = {resumed.path} if resumed else set()

        def checkpoint() -> None:
            nonlocal last_saved, last_save_time
            epoch, position = schedule.cursor(state.global_step)
            t0 = time.monotonic()
            try:
                info = save_training_checkpoint(ckpt_root, model, optimizer, state, epoch, position, fp, cfg)
            except OSError as exc:
                log.error("checkpoint.failed", step=state.global_step, errno=exc.errno, error=str(exc))
                raise TemporaryFailure(f"checkpoint at step {state.global_step} could not be written: {exc}; "
                                       "earlier checkpoints are intact") from exc
            log.info("checkpoint.saved", step=info.step, path=str(info.path), bytes=info.bytes,
                     seconds=round(time.monotonic() - t0, 4))
            last_saved, last_save_time = state.global_step, time.monotonic()
            prune(ckpt_root, cfg.daemon.keep_checkpoints, protect=protect,
                  on_pruned=lambda i: log.info("checkpoint.pruned", step=i.step, path=str(i.path)))

        model.train()  # dropout active
        loss_and_grad = nn.value_and_grad(model, masked_loss)
        log.info("train.start", sequences=len(cache), steps_per_epoch=schedule.steps_per_epoch,
                 total_steps=schedule.total_steps, sequences_per_step=schedule.sequences_per_step,
                 start_step=state.global_step)
        first = last = None
        order_epoch, order = -1, None
        last_save_time = time.monotonic()
        segment_s = cfg.daemon.segment_minutes * 60
        every = cfg.daemon.checkpoint_every_steps
        bar = tqdm(total=schedule.total_steps, initial=state.global_step, desc="training", unit="step",
                   disable=not show_bar, dynamic_ncols=True)
        for step in range(state.global_step, schedule.total_steps):
            epoch, _ = schedule.cursor(step)
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_order(len(cache), cfg.train.seed, epoch)
            t0 = time.monotonic()
            result = train_step(model, optimizer, cache, step_micro_batches(schedule, order, step),
                                cfg.train.seed, step, loss_and_grad)
            step_s = time.monotonic() - t0
            state.record(result.loss, result.tokens)
            state.train_seconds += step_s
            first = result.loss if first is None else first
            last = result.loss
            log.info("train.step", step=state.global_step, epoch=epoch, loss=result.loss,
                     lr=float(optimizer.learning_rate.item()), tokens=result.tokens,
                     tok_per_s=round(result.tokens / step_s, 1), step_s=round(step_s, 4), **memory_fields())
            bar.set_postfix_str(f"epoch={epoch} loss={result.loss:.3f} tok/s={result.tokens / step_s:,.0f}")
            bar.update(1)
            if (every and state.global_step % every == 0) or time.monotonic() - last_save_time >= segment_s:
                checkpoint()
        bar.close()
        if last_saved != state.global_step:
            checkpoint()  # the finished state is a checkpoint too: a restart then does nothing

        out = run_dir / ("debug/adapters" if debug else "adapters")
        weights = save_adapters(model, out, adapter_config(cfg, len(model.layers), keys))
        log.info("train.done", steps=state.global_step, first_loss=first, last_loss=last, adapters=str(out),
                 train_seconds=round(state.train_seconds, 2), tokens_seen=state.tokens_seen)
        log.info("daemon.stop", reason="finished", exit_code=0)
        return RunResult(0, state.global_step, first, last, weights.parent)
    except BaseException as exc:
        log.error("daemon.stop", reason="error", error=f"{type(exc).__name__}: {exc}",
                  exit_code=getattr(exc, "exit_code", 1))
        raise
    finally:
        close_logging()
