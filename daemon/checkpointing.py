"""Trainer state <-> checkpoint files: what is saved, and putting it back.

A checkpoint holds (see DESIGN.md "Checkpoint contract"):
- `adapters.safetensors`: the LoRA weights, mlx-lm key names;
- `optimizer.safetensors`: the full flattened Adam state (moments, step, learning rate);
- `trainer_state.json`: global step, epoch and position in that epoch's order (the data
  cursor), tokens seen, training seconds used, a loss summary, the RNG scheme, the config
  fingerprint, package versions and the world size that wrote it.
Randomness is re-derived from (seed, step, micro-batch) before every micro-batch
(`batches.step_seed`) and the data order from (seed, epoch), so these files are
everything a bit-exact resume needs. A checkpoint of a distributed job is the same
files (rank 0 writes them) and resumes under any world size.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from checkpoints import fsio
from checkpoints.store import CheckpointInfo, load_checkpoint, save_checkpoint
from daemon import template, testhooks
from daemon.config import Config
from daemon.errors import InputError

RECENT_LOSSES = 100

# Fields whose change makes a checkpoint meaningless for this run. Everything else
# (budget, window, segment length, retention, power, logging, epochs, max_steps) may
# change between restarts.
FINGERPRINT_FIELDS = (
    "model.name", "model.quantize_bits", "base_model", "lora.rank", "lora.alpha", "lora.dropout", "lora.targets",
    "data.name", "data.subset", "data.split", "data.problem_field", "data.solution_field", "data.max_seq_len",
    "data.limit", "token_cache", "template", "train.batch_size", "train.grad_accumulation_steps",
    "train.learning_rate", "train.seed", "train.group_by_length",
)
# Not in it: train.grad_checkpoint. It changes what is kept in memory, not what is
# computed (bit-identical on the CPU, tests/test_bench.py), so after an out-of-memory
# exit a run may resume with it switched on.


@dataclass
class Progress:
    """What the loop knows besides tensors; saved in trainer_state.json."""

    global_step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    recent_losses: list[float] = field(default_factory=list)
    best_loss: float | None = None

    def record(self, loss: float, tokens: int) -> None:
        self.global_step += 1
        self.tokens_seen += tokens
        self.recent_losses = (self.recent_losses + [loss])[-RECENT_LOSSES:]
        self.best_loss = loss if self.best_loss is None else min(self.best_loss, loss)


def fingerprint(cfg: Config, model_dir: Path, cache_key: str) -> dict:
    """Given the config, the model directory and the token cache key, return the values
    that must not change across a resume (see FINGERPRINT_FIELDS)."""
    config_json = model_dir / "config.json"
    values = {
        "base_model": hashlib.sha256(config_json.read_bytes()).hexdigest()[:16] if config_json.exists() else None,
        "token_cache": cache_key,
        "template": template.TEMPLATE_ID,
    }
    for name in FINGERPRINT_FIELDS:
        if "." in name:
            section, key = name.split(".")
            values[name] = getattr(getattr(cfg, section), key)
    return {name: values[name] for name in FINGERPRINT_FIELDS}


def fingerprint_conflicts(saved: dict, current: dict) -> list[str]:
    """Given a saved and a current fingerprint, return 'field: saved -> current' for each
    field that differs (fields unknown to either side are compared too)."""
    return [f"{name}: {saved.get(name)!r} -> {current.get(name)!r}"
            for name in sorted(set(saved) | set(current)) if saved.get(name) != current.get(name)]


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for dist in ("mathlora-daemon", "mlx", "mlx-lm", "numpy", "safetensors"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _safetensors_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    mx.save_safetensors(buf, arrays, metadata={"format": "mlx"})
    return buf.getvalue()


def save_training_checkpoint(root: Path, model: nn.Module, optimizer: optim.Optimizer, progress: Progress,
                             epoch: int, position: int, fp: dict, cfg: Config,
                             world_size: int = 1) -> CheckpointInfo:
    """Given the checkpoint root, the model, optimizer and loop progress at an optimizer
    step boundary, write checkpoint `step-<global step>` atomically and return it; raise
    OSError (e.g. ENOSPC) with every earlier checkpoint left intact."""
    step = progress.global_step
    groups = {"adapters": _safetensors_bytes(dict(tree_flatten(model.trainable_parameters()))),
              "optimizer": _safetensors_bytes(dict(tree_flatten(optimizer.state)))}
    losses = progress.recent_losses
    state = {
        "global_step": step, "epoch": epoch, "position": position, "tokens_seen": progress.tokens_seen,
        "train_seconds": progress.train_seconds,
        "loss": {"last": losses[-1] if losses else None, "recent": losses,
                 "recent_mean": sum(losses) / len(losses) if losses else None, "best": progress.best_loss},
        "rng": {"scheme": "mx.random.seed(SeedSequence([train.seed, global_step, micro_batch])) before every "
                          "micro-batch; data order from default_rng([train.seed, epoch])", "seed": cfg.train.seed},
        "world_size": world_size,  # informational: any world size may resume it
        "fingerprint": fp, "versions": package_versions(),
    }
    writer = testhooks.failing_writer(step, _held_writer(step))
    return save_checkpoint(root, step, groups, state, writer=writer)


def _held_writer(step: int):
    """The durable writer, with the crash tests' hold point after the first file."""
    def write(path: Path, data: bytes) -> None:
        fsio.write_bytes_durable(path, data)
        testhooks.hold_point("save", step)
    return write


def restore_training_checkpoint(path: Path, model: nn.Module, optimizer: optim.Optimizer,
                                current_fp: dict) -> tuple[dict, Progress]:
    """Given a verified checkpoint directory, a model with LoRA applied, its optimizer and
    the current fingerprint, load adapters and optimizer state in place and return
    (trainer state, Progress); raise InputError naming every conflicting field when the
    checkpoint belongs to a different configuration."""
    state, files = load_checkpoint(path)
    conflicts = fingerprint_conflicts(state.get("fingerprint", {}), current_fp)
    if conflicts:
        raise InputError(f"checkpoint {path} was made with a different configuration; these fields differ "
                         f"(checkpoint -> now): {'; '.join(conflicts)}. Restore the old values, or start a new "
                         "run directory (or move checkpoints/ away) to train from scratch.")
    model.load_weights(list(mx.load(str(files["adapters"])).items()), strict=False)
    optimizer.init(model.trainable_parameters())
    optimizer.state = tree_unflatten(list(mx.load(str(files["optimizer"])).items()))
    mx.eval(model.trainable_parameters(), optimizer.state)
    loss = state.get("loss", {})
    progress = Progress(global_step=state["global_step"], tokens_seen=state["tokens_seen"],
                        train_seconds=state["train_seconds"], recent_losses=list(loss.get("recent") or []),
                        best_loss=loss.get("best"))
    return state, progress


def describe(info: CheckpointInfo) -> dict:
    """Given a CheckpointInfo, return a JSON-ready dict for logs and the CLI."""
    return {"step": info.step, "path": str(info.path), "bytes": info.bytes, "eval_loss": info.eval_loss,
            "created": info.created}


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
