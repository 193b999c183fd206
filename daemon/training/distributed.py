"""Data parallelism inside one optimizer step: which rows each rank computes, and the
sum of their gradients.

What the ranks share, and how:

- the data: every optimizer step's global batch (the same micro-batches a single process
  would take, from the same global cursor) is cut into one disjoint share per rank by
  `shard_step`: whole micro-batches when their number divides by the world size, else
  the rows of every micro-batch;
- the mathematics: each share's loss is divided by its micro-batch's *global* token
  count, the gradient sums are added across ranks with `all_sum` (`sum_tree`), so the
  update is the one a single process would make up to float summation order;
- the decisions and the state: runtime/world.py (collectives; rank 0's adapters and
  optimizer state copied bit for bit) and runtime/boundary.py (stops and pauses at the
  same boundary on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mathlora_daemon.runtime.world import World

# --- sharding one optimizer step --------------------------------------------------------

@dataclass(frozen=True)
class Share:
    """One rank's part of one micro-batch: its rows, and the target-token count of the
    whole micro-batch (the loss denominator every rank uses for it)."""

    micro: int  # index of the micro-batch in the step (seeds its dropout)
    indices: np.ndarray
    denominator: int


def target_tokens(lengths: np.ndarray, starts: np.ndarray | None = None) -> int:
    """Given sequence lengths (and their prompt lengths, when only what follows the
    prompt is trained), return how many next-token targets they hold."""
    lengths = np.asarray(lengths, dtype=np.int64)
    skipped = 0 if starts is None else np.maximum(np.asarray(starts, dtype=np.int64) - 1, 0)
    return int(np.maximum(lengths - 1 - skipped, 0).sum())


def shard_step(micro_batches: list[np.ndarray], lengths: np.ndarray, rank: int, size: int,
               starts: np.ndarray | None = None) -> list[Share]:
    """Given one step's micro-batches (sequence indices), every sequence's length and a
    rank of `size`, return that rank's shares. The shares of all ranks are disjoint and
    together hold every row once. Whole micro-batches go round-robin when their number
    divides by `size` (each rank computes exactly what a single process computes for
    them); otherwise every micro-batch's rows are dealt round-robin, and a rank may get
    empty shares (kept, so every rank takes the same number of micro-steps)."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} of world size {size}")
    denominators = [target_tokens(lengths[m], None if starts is None else starts[m]) for m in micro_batches]
    if len(micro_batches) % size == 0:
        return [Share(m, micro_batches[m], denominators[m]) for m in range(rank, len(micro_batches), size)]
    return [Share(m, batch[rank::size], denominators[m]) for m, batch in enumerate(micro_batches)]


def sum_tree(world: World, tree):
    """Given a tree of gradients, return their element-wise sum across ranks: one
    all_sum per dtype over the concatenated leaves (LoRA has ~100 small tensors; one
    message each would be latency-bound). Usable inside mx.compile."""
    if not world.distributed:
        return tree
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    leaves = tree_flatten(tree)
    out = []
    for dtype in sorted({v.dtype for _, v in leaves}, key=str):
        group = [(k, v) for k, v in leaves if v.dtype == dtype]
        total = mx.distributed.all_sum(mx.concatenate([v.reshape(-1) for _, v in group]), group=world.group)
        offset = 0
        for k, v in group:
            out.append((k, total[offset: offset + v.size].reshape(v.shape)))
            offset += v.size
    return tree_unflatten(out)
