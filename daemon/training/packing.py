"""Packed sequences (`data.pack`): rows of `max_seq_len` + 1 tokens holding several sequences.

Padding every sequence to its micro-batch's longest wastes the positions between each
sequence's end and the row's; with short rows (answer-only math, 20-80 tokens) most
computed positions are padding. Packing puts several whole sequences in one row:

- which sequences share a row is decided once from the training sequences' lengths
  (row by row, the last positions filled by an exact subset sum; best-fit decreasing where
  that needs fewer rows; deterministic: ties by index), and recorded in the token cache
  (`train/packs-<capacity>.npz`), so a resumed run, or a later version of this code, reads
  the very same rows; the data order then shuffles rows as it shuffles sequences;
- no token sees another sequence: the attention mask is block-diagonal and causal (each
  position's segment id against every key's); the positions are not restarted, which
  RoPE does not need: its attention scores depend only on the distance between two
  positions, and every attended pair lies in one sequence (a test checks a packed
  batch's loss and gradients against the same sequences unpacked);
- a target is trained when it follows a token of the same sequence (never across a
  boundary) and, with `train.mask_prompt`, is not part of that sequence's prompt.

The micro-batch a packed row makes is (tokens [B, L], segment ids [B, L] with 0 for
padding, trained-token flags [B, L]); training/step.py's loss takes it where an
unpacked batch passes (tokens, lengths [B], prompt lengths [B]). Validation loss is
measured on the unpacked validation sequences, as before.
"""

from __future__ import annotations

import bisect
import io
from dataclasses import dataclass
from functools import cached_property

import mlx.core as mx
import numpy as np

from mathlora_checkpoints.fsio import atomic_write_bytes
from mathlora_daemon.training.cache import TokenCache

FILL_WINDOW = 256  # the last positions of a row are filled by an exact search, not greedily


def pack_lengths(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Given sequence lengths (each <= capacity) and a row's capacity, return (members,
    offsets): row r holds sequences members[offsets[r]:offsets[r + 1]]. Whichever of two
    packings needs fewer rows (`_fill_rows`, else best-fit decreasing): best-fit leaves
    each row a gap smaller than the shortest sequence left, ~4% of the positions when no
    sequence is shorter than ~60 tokens (answer-only math, the demo's rows)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"a sequence of {int(lengths.max())} tokens does not fit a row of {capacity}")
    best_fit = _best_fit_decreasing(lengths, capacity)
    filled = _fill_rows(lengths, capacity)
    rows = filled if len(filled) < len(best_fit) else best_fit
    members = np.array([i for row in rows for i in row], dtype=np.int64)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(row) for row in rows], out=offsets[1:])
    return members, offsets


def _best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """The longest sequence first, each into the fullest row it still fits (ties by index)."""
    order = np.argsort(-lengths, kind="stable")
    free: list[tuple[int, int]] = []  # (space left, row), sorted: the fullest row that fits is found by bisection
    rows: list[list[int]] = []
    for i in order:
        n = int(lengths[i])
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(int(i))
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    return rows


def _fill_rows(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """One row at a time: the longest and the shortest sequences that fit, in turn,
    until at most FILL_WINDOW positions are left, then the remaining sequences whose
    lengths sum closest to the space left (a subset sum over lengths, exact). Of equal
    lengths the lowest index goes first, so the rows depend on the lengths alone."""
    if not len(lengths):
        return []
    counts = np.bincount(lengths, minlength=capacity + 1)
    order = np.argsort(lengths, kind="stable")
    starts = np.searchsorted(lengths[order], np.arange(capacity + 2))
    taken = np.zeros(capacity + 1, dtype=np.int64)  # per length, how many were placed
    rows: list[list[int]] = []
    window = min(capacity, FILL_WINDOW)

    def take(n: int, row: list[int]) -> None:
        row.append(int(order[starts[n] + taken[n]]))
        taken[n] += 1
        counts[n] -= 1

    left = len(lengths)
    while left:
        row, space = [], capacity
        while space > window:
            fitting = np.flatnonzero(counts[1:space + 1])
            if not len(fitting):
                break
            # The longest and the shortest in turn: what is left keeps every length, so the
            # exact fill of the last rows still finds sums that close them.
            n = int(fitting[-1 if len(row) % 2 == 0 else 0]) + 1
            take(n, row)
            space -= n
        for n in _closest_sum(counts, space):
            take(n, row)
            space -= n
        if not row:  # only sequences longer than the space: cannot happen with a fresh row
            raise AssertionError("packing made no progress")
        rows.append(row)
        left -= len(row)
    return rows


def _closest_sum(counts: np.ndarray, space: int) -> list[int]:
    """Lengths (each available counts[n] times) whose sum is the largest one <= space."""
    reach = np.zeros(space + 1, dtype=bool)
    reach[0] = True
    via = np.zeros(space + 1, dtype=np.int64)  # the length that first reached each sum
    for n in np.flatnonzero(counts[1:space + 1]) + 1:
        for _ in range(min(int(counts[n]), space // n)):
            new = np.zeros(space + 1, dtype=bool)
            new[n:] = reach[:-n]
            new &= ~reach
            if not new.any():
                break
            via[new] = n
            reach |= new
    out, total = [], int(np.flatnonzero(reach)[-1])
    while total:
        out.append(int(via[total]))
        total -= out[-1]
    return out


def _valid(members: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, capacity: int) -> bool:
    if members.ndim != 1 or offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(members):
        return False
    if len(members) != len(lengths) or not np.array_equal(np.sort(members), np.arange(len(lengths))):
        return False
    if np.any(np.diff(offsets) < 1):
        return False
    totals = np.add.reduceat(lengths[members], offsets[:-1]) if len(members) else np.zeros(0)
    return bool(np.all(totals <= capacity))


@dataclass
class PackedRows:
    """The training split seen as packed rows: what training/step.py's `_batch` and the
    data order need in place of the TokenCache (len, lengths, meta, a micro-batch)."""

    cache: TokenCache
    capacity: int
    members: np.ndarray
    offsets: np.ndarray

    @classmethod
    def of(cls, cache: TokenCache, capacity: int, log=None) -> PackedRows:
        """The cache's recorded rows for this capacity, made and recorded on first use."""
        path = cache.path / "train" / f"packs-{capacity}.npz"
        lengths = np.asarray(cache.lengths)
        try:
            with np.load(path, allow_pickle=False) as saved:
                members, offsets = saved["members"], saved["offsets"]
            if _valid(members, offsets, lengths, capacity):
                return cls(cache, capacity, members, offsets)
        except (OSError, ValueError, KeyError):
            pass
        members, offsets = pack_lengths(lengths, capacity)
        buffer = io.BytesIO()
        np.savez(buffer, members=members, offsets=offsets)
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as exc:  # a read-only cache still trains: the rows are a function of the lengths
            if log is not None:
                log.warning("data.pack.unrecorded", path=str(path), error=str(exc))
        return cls(cache, capacity, members, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @cached_property
    def lengths(self) -> np.ndarray:
        """Each row's tokens (its sequences' lengths summed)."""
        return np.add.reduceat(np.asarray(self.cache.lengths)[self.members], self.offsets[:-1]) \
            if len(self.members) else np.zeros(0, np.int64)

    @property
    def meta(self) -> dict:
        return self.cache.meta

    @property
    def padding_share(self) -> float:
        """The share of the rows' positions that hold no token."""
        return 1.0 - float(self.lengths.sum()) / (len(self) * self.capacity) if len(self) else 0.0

    def row(self, r: int) -> list[int]:
        return [int(i) for i in self.members[self.offsets[r]:self.offsets[r + 1]]]

    def batch(self, rows, pad_id: int, width: int, mask_prompt: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Given row indices, the pad id, the padded width and train.mask_prompt, return
        (tokens [B, width], segment ids [B, width] (1, 2, ... per sequence; 0 padding),
        trained-token flags [B, width] int32)."""
        tokens = np.full((len(rows), width), pad_id, dtype=np.int32)
        segments = np.zeros((len(rows), width), dtype=np.int32)
        trained = np.zeros((len(rows), width), dtype=np.int32)
        starts = self.cache.starts
        for b, r in enumerate(rows):
            at = 0
            for k, i in enumerate(self.row(int(r)), start=1):
                seq = self.cache.sequence(i)
                n = len(seq)
                tokens[b, at:at + n], segments[b, at:at + n] = seq, k
                trained[b, at + (int(starts[i]) if mask_prompt else 0):at + n] = 1
                at += n
        return tokens, segments, trained


class SegmentMask:
    """A stand-in for mlx-lm's KV cache that only hands the model its attention mask (the
    model's own attention code runs unchanged: RoPE offset 0, keys and values as they
    are). One object serves every layer."""

    offset = 0

    def __init__(self, mask: mx.array):
        self.mask = mask

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return keys, values

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        if window_size is not None:
            raise NotImplementedError("data.pack: sliding-window attention is not supported")
        return self.mask


def segment_mask(segments: mx.array) -> mx.array:
    """Given segment ids [B, L], return the block-diagonal causal mask [B, 1, L, L]
    (True: attend): a query sees the keys of its own segment up to itself; padding (0)
    sees padding, so no row of the softmax is empty."""
    n = segments.shape[1]
    causal = mx.arange(n)[None, :] <= mx.arange(n)[:, None]
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


def packed_targets(segments: mx.array, trained: mx.array) -> mx.array:
    """Which next-token targets are trained [B, L - 1]: token p + 1 follows token p in the
    same sequence and is a trained token (not padding, not a masked prompt)."""
    same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
    return same & (trained[:, 1:] > 0)
