"""Deterministic data order and padded batches.

The order of every epoch is a permutation derived from (seed, epoch) alone, and an
optimizer step's micro-batches are derived from (epoch, step within epoch) alone. So the
data cursor is just (epoch, position), and a resumed run sees exactly the batches an
uninterrupted run would have seen.

With `train.group_by_length` the epoch's permutation is regrouped, again from (seed,
epoch) and the sequence lengths alone: windows of GROUP_WINDOW_STEPS steps' worth of
sequences are sorted by length and cut into steps, and the steps of a window are
shuffled. A step's micro-batches then hold sequences of similar length (little padding)
while the run still visits every length throughout the epoch.

Padded shapes: a micro-batch feeds the model `tokens[:, :-1]`, and that input length is
rounded up to a length bucket (multiples of 64, at most MAX_BUCKETS buckets up to
max_seq_len), so few compiled traces serve every length and full chunks stay at exactly
max_seq_len positions.
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


PAD_MULTIPLE = 64  # the smallest bucket step: GPU kernels like multiples of 64
MAX_BUCKETS = 16  # at most this many input lengths (compiled traces) per batch size
GROUP_WINDOW_STEPS = 32  # group_by_length sorts this many steps' worth of sequences together


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """Given the number of sequences, the seed and an epoch, return that epoch's order."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def group_by_length(order: np.ndarray, lengths: np.ndarray, sequences_per_step: int, seed: int,
                    epoch: int) -> np.ndarray:
    """Given an epoch's order, every sequence's length, the sequences per optimizer step,
    the seed and the epoch, return the order regrouped so that each step holds sequences
    of similar length (longest first within a step).

    Each window of GROUP_WINDOW_STEPS steps' worth of the order is sorted by length
    (stable, so ties keep the permutation's order), cut into steps, and its full steps
    are shuffled from (seed, epoch, window); a short last step stays last, so every step
    starts at a multiple of `sequences_per_step` as Schedule.cursor assumes.
    """
    window = sequences_per_step * GROUP_WINDOW_STEPS
    out = []
    for w, start in enumerate(range(0, len(order), window)):
        part = order[start:start + window]
        part = part[np.argsort(-np.asarray(lengths)[part], kind="stable")]
        steps = [part[i:i + sequences_per_step] for i in range(0, len(part), sequences_per_step)]
        full = [s for s in steps if len(s) == sequences_per_step]
        shuffled = np.random.default_rng([seed, epoch, w]).permutation(len(full))
        out.extend(full[i] for i in shuffled)
        out.extend(steps[len(full):])
    return np.concatenate(out) if out else order[:0]


def training_order(lengths: np.ndarray, seed: int, epoch: int, sequences_per_step: int,
                   grouped: bool) -> np.ndarray:
    """Given every sequence's length, the seed, an epoch, the sequences per step and
    whether to group by length, return the order in which that epoch visits them."""
    order = epoch_order(len(lengths), seed, epoch)
    return group_by_length(order, lengths, sequences_per_step, seed, epoch) if grouped else order


def bucket_step(max_seq_len: int) -> int:
    """Given max_seq_len, return the width of the input-length buckets: a multiple of
    PAD_MULTIPLE giving at most MAX_BUCKETS buckets (64 up to max_seq_len 1024, 256 at 4096)."""
    return max(PAD_MULTIPLE, -(-max_seq_len // (MAX_BUCKETS * PAD_MULTIPLE)) * PAD_MULTIPLE)


def bucket_length(positions: int, max_seq_len: int) -> int:
    """Given the model-input length a micro-batch needs (its longest sequence minus one)
    and max_seq_len, return the padded input length: rounded up to the bucket step, but
    never past max_seq_len when the input fits in it (a full chunk stays max_seq_len).
    Without a known max_seq_len (0) it rounds up to PAD_MULTIPLE."""
    step = bucket_step(max_seq_len) if max_seq_len else PAD_MULTIPLE
    rounded = -(-positions // step) * step
    return min(rounded, max_seq_len) if max_seq_len >= positions else rounded


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
