"""`run`: the training loop, top to bottom.

Given a run directory and its config: load the model, prepare tokens, add LoRA, then
take optimizer steps over the deterministic data order, logging each one, and write the
final adapters in mlx-lm's format.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from daemon import __version__
from daemon.config import Config
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
    """Given a run directory and a validated config, train and return the RunResult;
    raise InputError (exit 78) for a bad model, dataset or target list."""
    import mlx.nn as nn
    from tqdm import tqdm

    from daemon.batches import Schedule, epoch_order, step_micro_batches
    from daemon.model import adapter_config, apply_lora, load_base, save_adapters, total_count, trainable_count
    from daemon.prepare import prepare_tokens
    from daemon.trainer import make_optimizer, masked_loss, train_step

    if debug:
        cfg = debug_config(cfg)
    show_bar = sys.stderr.isatty() if progress is None else progress
    log = setup_logging(run_dir, run_dir.resolve().name, quiet_events={"train.step"} if show_bar else set())
    started = time.monotonic()
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
        model.train()  # dropout active
        loss_and_grad = nn.value_and_grad(model, masked_loss)
        log.info("train.start", sequences=len(cache), steps_per_epoch=schedule.steps_per_epoch,
                 total_steps=schedule.total_steps, sequences_per_step=schedule.sequences_per_step)

        first = last = None
        order_epoch, order = -1, None
        bar = tqdm(total=schedule.total_steps, desc="training", unit="step", disable=not show_bar, dynamic_ncols=True)
        for step in range(schedule.total_steps):
            epoch, _ = schedule.cursor(step)
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_order(len(cache), cfg.train.seed, epoch)
            t0 = time.monotonic()
            result = train_step(model, optimizer, cache, step_micro_batches(schedule, order, step),
                                cfg.train.seed, step, loss_and_grad)
            step_s = time.monotonic() - t0
            first = result.loss if first is None else first
            last = result.loss
            log.info("train.step", step=step + 1, epoch=epoch, loss=round(result.loss, 6),
                     lr=float(optimizer.learning_rate.item()), tokens=result.tokens,
                     tok_per_s=round(result.tokens / step_s, 1), step_s=round(step_s, 4), **memory_fields())
            bar.set_postfix_str(f"epoch={epoch} loss={result.loss:.3f} tok/s={result.tokens / step_s:,.0f}")
            bar.update(1)
        bar.close()

        out = run_dir / ("debug/adapters" if debug else "adapters")
        weights = save_adapters(model, out, adapter_config(cfg, len(model.layers), keys))
        seconds = time.monotonic() - started
        log.info("train.done", steps=schedule.total_steps, first_loss=first, last_loss=last, adapters=str(out),
                 seconds=round(seconds, 2))
        log.info("daemon.stop", reason="finished", exit_code=0)
        return RunResult(0, schedule.total_steps, first, last, weights.parent)
    except BaseException as exc:
        log.error("daemon.stop", reason="error", error=f"{type(exc).__name__}: {exc}",
                  exit_code=getattr(exc, "exit_code", 1))
        raise
    finally:
        close_logging()
