"""Set-up of a training run: everything the loop needs, in named steps.

`setup_session` converts and loads the base model, tokenizes the data (or reuses the
token cache), adds LoRA, makes the schedule and the optimizer, and resumes from the
newest checkpoint that verifies. In a distributed job every rank runs it; the
collectives (marked "all ranks") happen in the same order on each, and rank 0's step,
adapters and Adam state are copied to the others bit for bit.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mathlora_checkpoints.fsio import remove_dead_temporaries
from mathlora_checkpoints.store import CheckpointInfo, cleanup_temporaries, find_latest_valid, load_checkpoint
from mathlora_daemon.config import Config
from mathlora_daemon.errors import InputError
from mathlora_daemon.modelio.convert import ensure_model
from mathlora_daemon.modelio.loading import check_adapter_dir
from mathlora_daemon.rundir import RunDir
from mathlora_daemon.runtime.memory import GIB, apply_limits
from mathlora_daemon.runtime.signals import Flags
from mathlora_daemon.runtime.world import World, barrier, broadcast_arrays, check_agreement, gather_ints
from mathlora_daemon.training.batches import Schedule
from mathlora_daemon.training.cache import TokenCache
from mathlora_daemon.training.checkpointing import Progress, fingerprint, restore_training_checkpoint
from mathlora_daemon.training.grpo import GRPOStep
from mathlora_daemon.training.memory_plan import device_kind, plan_memory_limit
from mathlora_daemon.training.model import (
    CACHE_ATTENTION_TYPES,
    apply_lora,
    load_base,
    total_count,
    trainable_count,
    use_grad_checkpoint,
)
from mathlora_daemon.training.packing import PackedRows
from mathlora_daemon.training.prepare import prepare_tokens
from mathlora_daemon.training.step import _update, make_optimizer, train_step, use_kernel_cache
from mathlora_daemon.training.template import PromptFormat


@dataclass
class Session:
    """A run ready to train: the model with LoRA, its data, optimizer and progress."""

    cfg: Config
    run: RunDir
    world: World
    model_dir: Path
    model: object
    tokenizer: object
    cache: TokenCache
    keys: list[str]
    schedule: Schedule
    optimizer: object
    fingerprint: dict
    progress: Progress
    resumed: CheckpointInfo | None
    prompt_format: PromptFormat
    problems: list | None = None  # GRPO's training rows (problem, answer, kind); None for SFT
    grpo: object = None  # training/grpo.py GRPOStep when train.method = "grpo"
    packs: object = None  # training/packing.py PackedRows when data.pack: what a step's items index

    @property
    def items(self):
        """What the schedule counts and a step's indices point into: packed rows, or the
        token cache's sequences."""
        return self.packs if self.packs is not None else self.cache

    @property
    def order_lengths(self):
        """What a step's items are ordered and grouped by: the sequences' lengths (SFT),
        or one per problem (GRPO: a problem's completions have no length yet)."""

        return self.items.lengths if self.problems is None else np.ones(len(self.problems), dtype=np.int64)

    def take_step(self, step: int, micro_batches, lr: float, should_abort):
        """One optimizer step of the run's method: its result, or None when a stop
        abandoned it (the state is still at the last boundary)."""
        train = self.cfg.train
        if self.grpo is not None:
            indices = [int(i) for i in np.concatenate(micro_batches)]
            # After an out-of-memory split (training/oom.py) the update takes fewer rows at a time.
            return self.grpo(step, indices, lr, train.max_grad_norm,
                             rows=max(1, train.batch_size // self.progress.batch_split))

        return train_step(self.model, self.optimizer, self.items, micro_batches, train.seed, step,
                          should_abort=should_abort, world=self.world, lr=lr, max_grad_norm=train.max_grad_norm,
                          mask_prompt=train.mask_prompt)


def setup_session(run: RunDir, cfg: Config, log, heartbeat, world: World, show_bar: bool) -> Session:
    """Given the run directory, the config, the log, the heartbeat and the World, return
    the Session; raise InputError (exit 78) for a bad model, dataset, target list or a
    checkpoint of another configuration."""
    _setup_device(run, cfg, log, world)
    model_dir, model, tokenizer, cache = _setup_model_and_data(run, cfg, log, heartbeat, world, show_bar)
    keys = _setup_lora(model, cfg, log, world)
    problems = _setup_problems(cfg, cache, world)
    packs = _setup_packing(cfg, model, cache, world, log)
    schedule, optimizer, fp = _setup_optimizer(cfg, packs if packs is not None else cache, model_dir, world,
                                               problems)
    resumed, progress = _resume(run, model, optimizer, schedule, fp, log, world)
    reference = None
    if problems is not None and resumed is not None:
        reference = _saved_reference(resumed)
    elif problems is not None and cfg.rl.init_adapters:
        reference = _setup_init_adapters(run, model, cfg, log)
    fmt = PromptFormat.of(cfg.data.template, tokenizer)
    session = Session(cfg, run, world, model_dir, model, tokenizer, cache, keys, schedule, optimizer, fp, progress,
                      resumed, fmt, problems, packs=packs)
    if problems is not None:
        session.grpo = _setup_grpo(session, reference)
    return session


def _saved_reference(resumed: CheckpointInfo) -> dict | None:
    """GRPO's reference adapters as the checkpoint keeps them (None: the base model)."""

    _state, files = load_checkpoint(resumed.path)
    return dict(mx.load(str(files["reference"]))) if "reference" in files else None


def _setup_problems(cfg: Config, cache: TokenCache, world: World):
    """GRPO's training rows: the problems with a reference answer (None for SFT)."""
    if cfg.train.method != "grpo":
        return None
    if world.distributed:
        raise InputError("train.method = \"grpo\" runs in one process; data-parallel GRPO (mlx.launch) is not "
                         "supported yet: start `run` without `launch`")
    problems = cache.train_problems()
    if not problems:
        raise InputError(f"train.method = \"grpo\": no training row of {cfg.data.name!r} has a reference answer "
                         f"(a non-empty '{cfg.data.answer_field}' field, or a solution ending in \\boxed{{...}} or a "
                         "\"Final Answer\" line)")
    return problems


def _setup_packing(cfg: Config, model, cache: TokenCache, world: World, log):
    """data.pack: the training sequences as packed rows (None when off)."""
    if not cfg.data.pack:
        return None

    kind = getattr(model, "model_type", None)
    if kind not in CACHE_ATTENTION_TYPES:
        raise InputError(f"data.pack = true: the {kind!r} architecture is not supported (its attention must take "
                         f"the mask from its cache: {', '.join(CACHE_ATTENTION_TYPES)}); set data.pack = false")
    if world.distributed:
        raise InputError("data.pack = true runs in one process; data-parallel packing (mlx.launch) is not supported "
                         "yet: set data.pack = false or start `run` without `launch`")
    packs = PackedRows.of(cache, cfg.data.max_seq_len + 1, log)
    log.info("data.pack", rows=len(packs), sequences=len(cache), capacity=packs.capacity,
             padding=round(packs.padding_share, 4))
    return packs


def _setup_init_adapters(run: RunDir, model, cfg: Config, log) -> None:
    """Start GRPO from trained (SFT) adapters: rl.init_adapters, relative to the run dir."""

    path = run.model(cfg.rl.init_adapters)  # the same rule: relative to the run directory unless absolute
    check_adapter_dir(path, option="rl.init_adapters")
    weights = mx.load(str(path / "adapters.safetensors"))
    expected = {k for k, _ in tree_flatten(model.trainable_parameters())}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
        raise InputError(f"rl.init_adapters {path}: its LoRA weights do not fit this run's lora settings (missing "
                         f"{missing}, unexpected {extra}): use the same lora.rank and lora.targets as the run that "
                         "made them")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.trainable_parameters())
    log.info("rl.init_adapters", path=str(path), tensors=len(weights))
    return dict(weights)


def _setup_grpo(s: Session, reference: dict | None):
    # The loop replaces these two with the runtime's (a stop raises out of the rollouts).
    idle = Flags()
    return GRPOStep(s.model, s.optimizer, s.tokenizer, s.prompt_format, s.problems, s.cfg.rl, s.cfg.train,
                    interruptible=idle.interruptible, should_abort=lambda: False, update=_update,
                    reference=reference)


def _setup_device(run: RunDir, cfg: Config, log, world: World) -> None:
    log.info("memory.limits", **apply_limits(cfg.daemon.memory_limit_gb, wired_limit=True))
    kernels = use_kernel_cache(run.kernel_cache) if world.leader else None  # the other ranks write nothing here
    if kernels:
        log.info("train.kernel_cache", path=str(kernels))


def _setup_model_and_data(run: RunDir, cfg: Config, log, heartbeat, world: World, show_bar: bool):
    if not world.leader:
        barrier(world)  # all ranks: rank 0 converts and tokenizes first; on its machine the others reuse both
    model_dir = ensure_model(cfg, run, log)  # converts model.name into model.path when it is missing
    limit = plan_memory_limit(cfg, model_dir, device_kind(), run.checkpoints, world.size)
    if limit:  # before the weights load: MLX waits for queued work rather than hold freed buffers
        log.info("memory.limits", **apply_limits(limit / GIB, wired_limit=False),
                 source="daemon.memory_limit_from_plan: the memory plan's estimate + 20%")
    log.info("model.load.start", path=str(model_dir))
    model, tokenizer, _ = load_base(model_dir)
    heartbeat.update(phase="preparing")
    cache = prepare_tokens(cfg.data, run, model_dir, tokenizer, log, progress=show_bar,
                           train_problems=cfg.train.method == "grpo")
    if world.leader:
        barrier(world)
    return model_dir, model, tokenizer, cache


def _setup_lora(model, cfg: Config, log, world: World) -> list[str]:
    keys = apply_lora(model, cfg)
    if cfg.train.grad_checkpoint:
        use_grad_checkpoint(model)
    trainable, total = trainable_count(model), total_count(model)
    log.info("model.lora", trainable_params=trainable, total_params=total, keys=keys, lora_rank=cfg.lora.rank,
             scale=cfg.lora_scale, dropout=cfg.lora.dropout, layers=len(model.layers),
             grad_checkpoint=cfg.train.grad_checkpoint)
    if world.leader:
        print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%), "
              f"LoRA rank {cfg.lora.rank} on {', '.join(keys)} of {len(model.layers)} layers", file=sys.stderr)
    return keys


def _setup_optimizer(cfg: Config, items, model_dir: Path, world: World, problems=None):
    if problems is None:
        schedule = Schedule(len(items), cfg.train.batch_size, cfg.train.grad_accumulation_steps, cfg.train.epochs,
                            cfg.train.max_steps)
    else:  # GRPO: a step takes rl.prompts_per_step problems (each sampled rl.group_size times)
        schedule = Schedule(len(problems), cfg.rl.prompts_per_step, 1, cfg.train.epochs, cfg.train.max_steps)
    optimizer = make_optimizer(cfg.train.learning_rate, cfg.train.weight_decay)
    fp = fingerprint(cfg, model_dir, items.meta["key"])
    check_agreement(world, "configuration fingerprint", json.dumps(fp, sort_keys=True))  # all ranks
    return schedule, optimizer, fp


def _resume(run: RunDir, model, optimizer, schedule: Schedule, fp: dict, log,
            world: World) -> tuple[CheckpointInfo | None, Progress]:
    """Rank 0 resumes from the newest checkpoint that verifies (torn ones are logged and
    skipped); in a distributed job every rank then takes rank 0's step, adapters and Adam
    state, a fresh start too, so no rank depends on its own initialisation."""

    resumed, progress = None, Progress()
    if world.leader:
        for leftover in cleanup_temporaries(run.checkpoints):
            log.info("checkpoint.cleaned", path=str(leftover))
        # A kill while the final adapters were written leaves the writer's temporary file.
        for leftover in remove_dead_temporaries(run.adapters):
            log.info("checkpoint.cleaned", path=str(leftover))
        resumed = find_latest_valid(run.checkpoints, on_rejected=lambda path, why: log.warning(
            "checkpoint.rejected", path=str(path), why=why))
    if resumed is not None:
        saved, progress = restore_training_checkpoint(resumed.path, model, optimizer, fp)
        log.info("resume", from_step=progress.global_step, path=str(resumed.path),
                 epoch=schedule.cursor(progress.global_step)[0], tokens_seen=progress.tokens_seen,
                 world_size=world.size, saved_world_size=saved.get("world_size", 1))
    if world.distributed:  # all ranks
        step, length = gather_ints(world, [progress.global_step, progress.schedule_length or 0])[0]
        progress.global_step, progress.schedule_length = step, length or None
        optimizer.init(model.trainable_parameters())
        params = broadcast_arrays(world, dict(tree_flatten(model.trainable_parameters())))
        moments = broadcast_arrays(world, dict(tree_flatten(optimizer.state)))
        if not world.leader:
            model.load_weights(list(params.items()), strict=False)
            optimizer.state = tree_unflatten(list(moments.items()))
    return resumed, progress
