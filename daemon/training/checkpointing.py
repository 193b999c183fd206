"""Trainer state <-> checkpoint files: what is saved, and putting it back.

A checkpoint holds (see docs/DESIGN.md, "Checkpoint contract"):
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
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from mathlora_checkpoints import fsio
from mathlora_checkpoints.store import CheckpointInfo, load_checkpoint, prune, save_checkpoint
from mathlora_daemon import testhooks
from mathlora_daemon.config import FINGERPRINT_KEYS, Config
from mathlora_daemon.errors import InputError, TemporaryFailure

# adapters/ of a GRPO run that no checkpoint improved on (the rule in adapter_config.json
# and the morning report; its step is 0)
STARTING_ADAPTERS = "the adapters GRPO started from (no checkpoint beat them on validation)"

RECENT_LOSSES = 100
RECENT_MEAN_STEPS = 10  # "the mean of the last 10 steps" in status and the morning report

# Fields whose change makes a checkpoint meaningless for this run: the config keys
# declared with fingerprint=True (config.py), plus the identities computed here (the
# base model's config; the token cache, whose key hashes the data, the tokenizer and the
# prompt format). Everything else (budget,
# window, segment length, retention, power, logging, epochs, max_steps, grad_checkpoint)
# may change between restarts.
FINGERPRINT_FIELDS = FINGERPRINT_KEYS + ("base_model", "token_cache")


@dataclass
class Progress:
    """What the loop knows besides tensors; saved in trainer_state.json."""

    global_step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    recent_losses: list[float] = field(default_factory=list)
    best_loss: float | None = None
    first_loss: float | None = None  # the run's first step, for the morning report
    schedule_length: int | None = None  # fixed once (training/lr.py); None until then
    schedule_source: str | None = None  # "steps" or "budget"
    # The evidence that sizes a budget-bound schedule (training/lr.py), gathered across
    # starts: steps whose budget cost is known, and that cost, as of the last checkpoint
    # (the steps a kill loses since then are timed again when they are re-done).
    timed_steps: int = 0
    timed_seconds: float = 0.0
    # (global step, budget seconds used) where this start's timing began; not saved.
    timing_since: tuple[int, float] | None = field(default=None, repr=False, compare=False)
    base_eval_loss: float | None = None  # validation loss of the base model (before step 1)
    eval_loss: float | None = None  # validation loss at the last evaluation
    eval_step: int | None = None
    best_eval_loss: float | None = None
    best_eval_step: int | None = None
    evals_since_best: int = 0
    eval_history: list[list] = field(default_factory=list)  # [step, validation loss] at every evaluation
    stopped_early: str | None = None  # why early stopping ended the run (a restart takes no more steps)
    eval_pending: bool = False  # this step's scheduled evaluation was cut short by a stop: the next start runs it
    # GRPO: each step's mean reward (the last RECENT_LOSSES) and the run's first, for
    # status and the morning report.
    recent_rewards: list[float] = field(default_factory=list)
    first_reward: float | None = None
    # Each micro-batch is cut into this many (training/oom.py): 1 until a step ran out of memory.
    batch_split: int = 1

    def record(self, loss: float, tokens: int, reward: float | None = None) -> None:
        if reward is not None:
            self.first_reward = reward if self.first_reward is None else self.first_reward
            self.recent_rewards = (self.recent_rewards + [reward])[-RECENT_LOSSES:]
        if self.global_step == 0:
            self.first_loss = loss
        self.global_step += 1
        self.tokens_seen += tokens
        self.recent_losses = (self.recent_losses + [loss])[-RECENT_LOSSES:]
        self.best_loss = loss if self.best_loss is None else min(self.best_loss, loss)

    def timing(self, used_s: float, charged_through: int) -> tuple[int, float]:
        """Given the budget's seconds used, charged for every step up to global step
        `charged_through`, return the evidence across starts: (steps timed, their
        seconds), the earlier starts' plus this one's since `timing_since`."""
        if self.timing_since is None:
            return self.timed_steps, self.timed_seconds
        step, used = self.timing_since
        return self.timed_steps + max(0, charged_through - step), self.timed_seconds + max(0.0, used_s - used)

    def recent_mean(self) -> float | None:
        """The mean training loss of the last RECENT_MEAN_STEPS steps (None before any)."""
        recent = self.recent_losses[-RECENT_MEAN_STEPS:]
        return sum(recent) / len(recent) if recent else None

    def record_eval(self, loss: float) -> bool:
        """Given the validation loss at the current step, keep it; return whether it is
        a new best."""
        step = self.global_step
        self.eval_loss, self.eval_step = loss, step
        self.eval_history.append([step, loss])
        if step == 0:  # the base model: what the adapters are measured against, not a candidate
            self.base_eval_loss = loss
            return False
        best = self.best_eval_loss is None or loss < self.best_eval_loss
        if best:
            self.best_eval_loss, self.best_eval_step, self.evals_since_best = loss, step, 0
        else:
            self.evals_since_best += 1
        return best

    def to_state(self) -> dict:
        """The parts of trainer_state.json this object owns."""
        losses = self.recent_losses
        # The Checkpointer sets train_seconds to the budget used, charged through this step.
        timed_steps, timed_seconds = self.timing(self.train_seconds, self.global_step)
        return {
            "loss": {"last": losses[-1] if losses else None, "recent": losses,
                     "recent_mean": sum(losses) / len(losses) if losses else None, "best": self.best_loss,
                     "first": self.first_loss},
            "schedule": {"length": self.schedule_length, "source": self.schedule_source,
                         "timed_steps": timed_steps, "timed_seconds": round(timed_seconds, 6)},
            "eval": {"loss": self.eval_loss, "step": self.eval_step, "base": self.base_eval_loss,
                     "best": self.best_eval_loss, "best_step": self.best_eval_step,
                     "since_best": self.evals_since_best, "history": self.eval_history,
                     "stopped_early": self.stopped_early, "pending": self.eval_pending},
            "rl": {"recent_rewards": self.recent_rewards, "first_reward": self.first_reward},
            "memory": {"batch_split": self.batch_split},
            # The store records this one in the manifest, for retention by validation loss.
            "eval_loss": self.eval_loss if self.eval_step == self.global_step else None,
        }

    @classmethod
    def from_state(cls, state: dict) -> "Progress":
        loss, schedule, ev = state.get("loss") or {}, state.get("schedule") or {}, state.get("eval") or {}
        return cls(global_step=state["global_step"], tokens_seen=state["tokens_seen"],
                   train_seconds=state["train_seconds"], recent_losses=list(loss.get("recent") or []),
                   best_loss=loss.get("best"), first_loss=loss.get("first"), schedule_length=schedule.get("length"),
                   schedule_source=schedule.get("source"), timed_steps=int(schedule.get("timed_steps") or 0),
                   timed_seconds=float(schedule.get("timed_seconds") or 0.0),
                   base_eval_loss=ev.get("base"), eval_loss=ev.get("loss"),
                   eval_step=ev.get("step"), best_eval_loss=ev.get("best"), best_eval_step=ev.get("best_step"),
                   evals_since_best=int(ev.get("since_best") or 0), eval_history=list(ev.get("history") or []),
                   stopped_early=ev.get("stopped_early"), eval_pending=bool(ev.get("pending")),
                   recent_rewards=list((state.get("rl") or {}).get("recent_rewards") or []),
                   first_reward=(state.get("rl") or {}).get("first_reward"),
                   batch_split=max(1, int((state.get("memory") or {}).get("batch_split") or 1)))


def fingerprint(cfg: Config, model_dir: Path, cache_key: str) -> dict:
    """Given the config, the model directory and the token cache key, return the values
    that must not change across a resume (see FINGERPRINT_FIELDS)."""
    config_json = model_dir / "config.json"
    values = {
        "base_model": hashlib.sha256(config_json.read_bytes()).hexdigest()[:16] if config_json.exists() else None,
        "token_cache": cache_key,
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
            for name in sorted(set(saved) | set(current))
            if saved.get(name) != current.get(name) and not _added_since(name, saved, current)]


def _added_since(name: str, saved: dict, current: dict) -> bool:
    """A key a newer version added to the fingerprint, at its default: the checkpoint was
    made with that default's behaviour (an upgrade mid-run must not refuse the resume)."""
    import dataclasses

    from mathlora_daemon.config import KEYS

    declared = KEYS.get(name)
    if name in saved or declared is None:
        return False
    default = declared.default if declared.default is not dataclasses.MISSING else declared.default_factory()
    return current.get(name) == default


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for dist in ("mathlora-daemon", "mlx", "mlx-lm", "numpy", "safetensors"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _safetensors_bytes(arrays: dict) -> bytes:
    """Given name -> array, return the safetensors file's bytes, the same bytes for the
    same arrays whatever order the dict was built in. mx.save_safetensors sorts the
    header's names but lays the tensors' data out in the order of its internal hash
    map, which follows the insertion order: a resumed optimizer (its state rebuilt from
    the file) would store the same tensors at other offsets. Inserting in sorted order
    fixes the layout (tests/unit/training/test_checkpointing.py)."""
    buf = io.BytesIO()
    mx.save_safetensors(buf, dict(sorted(arrays.items())), metadata={"format": "mlx"})
    return buf.getvalue()


def save_training_checkpoint(root: Path, model: nn.Module, optimizer: optim.Optimizer, progress: Progress,
                             epoch: int, position: int, fp: dict, cfg: Config,
                             world_size: int = 1, reference: dict | None = None) -> CheckpointInfo:
    """Given the checkpoint root, the model, optimizer and loop progress at an optimizer
    step boundary, write checkpoint `step-<global step>` atomically and return it; raise
    OSError (e.g. ENOSPC) with every earlier checkpoint left intact."""
    step = progress.global_step
    groups = {"adapters": _safetensors_bytes(dict(tree_flatten(model.trainable_parameters()))),
              "optimizer": _safetensors_bytes(dict(tree_flatten(optimizer.state)))}
    if reference is not None:  # GRPO started from trained adapters: its KL reference (training/grpo.py)
        groups["reference"] = _safetensors_bytes(reference)
    state = {
        "global_step": step, "epoch": epoch, "position": position, "tokens_seen": progress.tokens_seen,
        "train_seconds": progress.train_seconds, **progress.to_state(),
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
    return state, Progress.from_state(state)


def describe(info: CheckpointInfo) -> dict:
    """Given a CheckpointInfo, return a JSON-ready dict for logs and the CLI."""
    return {"step": info.step, "path": str(info.path), "bytes": info.bytes, "eval_loss": info.eval_loss,
            "created": info.created}


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)


class Checkpointer:
    """Saves the run's state at an optimizer-step boundary, as the checkpoint contract
    above says, prunes by the retention rule and selects the best adapters at the end
    (docs/DESIGN.md, "Checkpoint contract"). It only saves, prunes and selects (loading
    is `restore_training_checkpoint`, which the Session calls): it measures nothing and
    tells the user through the Reporter (training/reporter.py).

    State it reads at each save: the model's adapters, the optimizer's state, the loop's
    Progress (step, tokens, losses, validation history, the schedule's length), the
    cursor that the schedule derives from the step, and the budget's seconds used.
    Retention never removes the best checkpoint nor the one resumed from. Only rank 0
    writes; on the other ranks `save` does nothing. The live daemon settings (retention,
    segment length, checkpoint interval) are read at each use: a config reload may
    change them.
    """

    def __init__(self, session, runtime, reporter, clock=time.monotonic):
        """Given the Session (training/session.py: the run's checkpoints directory, model,
        optimizer, progress, schedule, fingerprint, config, where it resumed, its World),
        the Runtime (runtime/boundary.py: the budget and the live [daemon] settings) and
        the Reporter that tells what was saved and pruned, or could not be."""
        s = session
        self.root, self.model, self.optimizer, self.progress = s.run.checkpoints, s.model, s.optimizer, s.progress
        self.schedule, self.fp, self.cfg, self.budget = s.schedule, s.fingerprint, s.cfg, runtime.budget
        self.reporter = reporter
        self.settings = lambda: runtime.cfg.daemon  # a config reload may change retention and cadence
        self.world_size, self.leader = s.world.size, s.world.leader
        self.clock = clock
        # GRPO's reference adapters, kept in every checkpoint (None: SFT, or GRPO from the base).
        self.reference = lambda: s.grpo.reference if s.grpo is not None else None
        self.protect = {s.resumed.path} if s.resumed else set()  # pruning never removes what we resumed from
        self.last_step = s.progress.global_step if s.resumed else -1
        self.last_time = self.clock()

    def due(self) -> bool:
        """Whether the step just taken ends a segment: every `checkpoint_every_steps`
        steps (when set) or `segment_minutes` after the last checkpoint."""
        d = self.settings()
        every = d.checkpoint_every_steps
        return bool(every and self.progress.global_step % every == 0) or \
            self.clock() - self.last_time >= d.segment_minutes * 60

    def save(self) -> None:
        """Checkpoint the current step boundary (once per step), then prune; raise
        TemporaryFailure (exit 75) when it cannot be written, every earlier one intact."""
        step = self.progress.global_step
        if self.last_step == step or not self.leader:
            return
        epoch, position = self.schedule.cursor(step)
        self.progress.train_seconds = self.budget.used_s
        self.reporter.on_phase("checkpointing")
        t0 = time.monotonic()
        try:
            info = save_training_checkpoint(self.root, self.model, self.optimizer, self.progress, epoch, position,
                                            self.fp, self.cfg, world_size=self.world_size,
                                            reference=self.reference())
        except OSError as exc:
            self.reporter.on_checkpoint_failed(step, exc)
            raise TemporaryFailure(f"checkpoint at step {step} could not be written to {self.root}: "
                                   f"{exc.strerror or exc}; earlier checkpoints are intact") from exc
        self.last_step, self.last_time = step, self.clock()
        protect = set(self.protect)
        if self.progress.best_eval_step is not None:
            # The best may have been measured after its checkpoint was written (a
            # deferred evaluation): its manifest does not say so, the progress does.
            from mathlora_checkpoints.store import step_dir_name

            protect.add(self.root / step_dir_name(self.progress.best_eval_step))
        pruned = []
        prune(self.root, self.settings().keep_checkpoints, protect=protect, on_pruned=pruned.append)
        self.reporter.on_checkpoint(info, time.monotonic() - t0, pruned)

    def best_adapters(self, start: dict | None = None) -> tuple[dict | None, dict | None]:
        """(the adapters of the checkpoint with the lowest validation loss, what it was),
        or (None, None) when there is none better than the current state or it cannot
        be read (then the current adapters stand). `start`: the adapters training began
        from (GRPO from adapters), the best when validation found no checkpoint better
        than them (step 0)."""
        p = self.progress
        if start is not None and p.base_eval_loss is not None and p.best_eval_loss is not None \
                and p.best_eval_loss >= p.base_eval_loss:
            return dict(start), {"rule": STARTING_ADAPTERS, "step": 0, "val_loss": p.base_eval_loss}
        if p.best_eval_step is None or p.best_eval_step == p.global_step:
            return None, None
        from mathlora_checkpoints.store import step_dir_name, verify_checkpoint

        path = self.root / step_dir_name(p.best_eval_step)
        problem = verify_checkpoint(path) if path.is_dir() else "not kept"
        if problem:
            self.reporter.on_best_unavailable(p.best_eval_step, problem)
            return None, None
        _state, files = load_checkpoint(path)
        return dict(mx.load(str(files["adapters"]))), {"rule": "lowest validation loss", "step": p.best_eval_step,
                                                       "val_loss": p.best_eval_loss, "path": str(path)}
