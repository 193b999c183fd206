"""Deterministic data order and padded batches.

The order of every epoch is a permutation derived from (seed, epoch) alone, and an
optimizer step's micro-batches are derived from (epoch, step within epoch) alone. So the
data cursor is just (epoch, position), and a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Schedule:
    """How many sequences make an optimizer step and how many steps make the run."""

    sequences: int
    batch_size: int
    grad_accumulation_steps: int
    epochs: int
    max_steps: int = 0

    @property
    def sequences_per_step(self) -> int:
        return self.batch_size * self.grad_accumulation_steps

    @property
    def steps_per_epoch(self) -> int:
        # The last step of an epoch may hold fewer micro-batches; none is dropped.
        return math.ceil(self.sequences / self.sequences_per_step)

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total

    def cursor(self, global_step: int) -> tuple[int, int]:
        """Given a global step count, return (epoch, position in that epoch's order)."""
        epoch, within = divmod(global_step, self.steps_per_epoch)
        return epoch, within * self.sequences_per_step


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Given the number of sequences, the seed and an epoch, return that epoch's order."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def step_micro_batches(schedule: Schedule, order: np.ndarray, global_step: int) -> list[np.ndarray]:
    """Given the schedule, the current epoch's order and a global step, return the
    sequence indices of each micro-batch of that optimizer step."""
    _, start = schedule.cursor(global_step)
    chunk = order[start: start + schedule.sequences_per_step]
    return [chunk[i: i + schedule.batch_size] for i in range(0, len(chunk), schedule.batch_size)]


def pad_batch(sequences: list[np.ndarray], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Given token sequences, return (tokens [B, L] int32 right-padded, lengths [B])."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int32)
    out = np.full((len(sequences), int(lengths.max())), pad_id, dtype=np.int32)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = seq
    return out, lengths


def step_seed(seed: int, global_step: int, micro: int | None = None) -> int:
    """Given the run seed, a global step and (optionally) a micro-batch's index within
    that step, return the RNG seed for it.

    MLX's global RNG cannot be restored in place, so randomness (dropout) is re-derived
    from (seed, step, micro-batch) instead of carried over from history. Seeding every
    micro-batch, not only every step, makes a micro-batch's dropout independent of which
    rank of a distributed job computes it and of what that rank computed before.
    """
    entropy = [seed, global_step] if micro is None else [seed, global_step, micro]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])
