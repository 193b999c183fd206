"""Data parallelism across processes and machines, through MLX's own engine.

`mlx.launch` starts the same `mathlora-daemon run` once per rank and tells each process,
through its environment, where the others are (MLX_RANK + MLX_HOSTFILE for the ring
backend, the MPI, NCCL or JACCL variables for the others). `init_world` turns that into a
`World`; without those variables it is the single process every other start uses.

What the ranks share, and how:

- the data: every optimizer step's global batch (the same micro-batches a single process
  would take, from the same global cursor) is cut into one disjoint share per rank by
  `shard_step`: whole micro-batches when their number divides by the world size, else
  the rows of every micro-batch;
- the mathematics: each share's loss is divided by its micro-batch's *global* token
  count, the gradient sums are added across ranks with `all_sum` (`sum_tree`), so the
  update is the one a single process would make up to float summation order;
- the decisions: at every step boundary each rank contributes its own stop/pause wishes
  (`exchange_wishes`), and all ranks act on the union, so a stop on rank 0 (or a signal
  on any rank) stops every rank at the same boundary;
- the state: rank 0 alone reads and writes checkpoints; `broadcast_arrays` copies its
  adapters and optimizer state to the others bit for bit, so every rank resumes from the
  same checkpoint even when the other machines hold no copy of it.

A rank that dies makes the others' next collective fail ("[ring] connection to a peer was
lost"), so the job ends with non-zero exits instead of hanging, and a restart of the whole
job resumes from rank 0's last checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daemon.errors import InputError, TemporaryFailure

# Set by mlx.launch (or mpirun) for the backends MLX supports; any of them means "distributed".
LAUNCH_VARS = ("MLX_HOSTFILE", "MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_JACCL_COORDINATOR",
               "MLX_IBV_DEVICES")

GO = -1  # start handshake: this rank is ready to train (anything else is the exit code it wants)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks: rank 0 of 1 unless started by mlx.launch."""

    rank: int = 0
    size: int = 1
    group: object = None  # mx.distributed.Group when size > 1
    backend: str = ""

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def describe(self) -> dict:
        return {"world_size": self.size, "rank": self.rank, "backend": self.backend or None}


SINGLE = World()


def launched(environ=None) -> bool:
    """Whether the environment says this process is one rank of a launched job."""
    env = os.environ if environ is None else environ
    if any(env.get(name) for name in LAUNCH_VARS if name != "MLX_HOSTFILE"):
        return True
    hostfile = env.get("MLX_HOSTFILE")
    # mlx.launch with one host writes an empty hostfile: a world of one.
    return bool(hostfile) and Path(hostfile).is_file() and bool(Path(hostfile).read_text().strip())


def init_world(environ=None) -> World:
    """Given the environment, return this process's World. Raise InputError when
    MLX_HOSTFILE names a file that does not exist, TemporaryFailure (launchd retries)
    when the ranks cannot reach each other."""
    env = os.environ if environ is None else environ
    hostfile = env.get("MLX_HOSTFILE")
    if hostfile and not Path(hostfile).is_file():
        raise InputError(f"MLX_HOSTFILE={hostfile}: no such file (set by mlx.launch; unset it to train in one "
                         "process)")
    if not launched(env):
        return SINGLE
    import mlx.core as mx

    try:
        group = mx.distributed.init(strict=True, backend=env.get("MLX_DISTRIBUTED_BACKEND", "any"))
    except (RuntimeError, ValueError) as exc:
        raise TemporaryFailure(f"could not join the distributed job (rank {env.get('MLX_RANK', '?')}, "
                               f"MLX_HOSTFILE={hostfile}): {exc}") from exc
    backend = "ring" if hostfile else ("nccl" if env.get("MLX_WORLD_SIZE") else "mpi")
    return World(rank=group.rank(), size=group.size(), group=group, backend=backend)


# --- sharding one optimizer step --------------------------------------------------------

@dataclass(frozen=True)
class Share:
    """One rank's part of one micro-batch: its rows, and the target-token count of the
    whole micro-batch (the loss denominator every rank uses for it)."""

    micro: int  # index of the micro-batch in the step (seeds its dropout)
    indices: np.ndarray
    denominator: int


def target_tokens(lengths: np.ndarray) -> int:
    """Given sequence lengths, return how many next-token targets they hold."""
    return int(np.maximum(np.asarray(lengths, dtype=np.int64) - 1, 0).sum())


def shard_step(micro_batches: list[np.ndarray], lengths: np.ndarray, rank: int, size: int) -> list[Share]:
    """Given one step's micro-batches (sequence indices), every sequence's length and a
    rank of `size`, return that rank's shares. The shares of all ranks are disjoint and
    together hold every row once. Whole micro-batches go round-robin when their number
    divides by `size` (each rank computes exactly what a single process computes for
    them); otherwise every micro-batch's rows are dealt round-robin, and a rank may get
    empty shares (kept, so every rank takes the same number of micro-steps)."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} of world size {size}")
    denominators = [target_tokens(lengths[m]) for m in micro_batches]
    if len(micro_batches) % size == 0:
        return [Share(m, micro_batches[m], denominators[m]) for m in range(rank, len(micro_batches), size)]
    return [Share(m, batch[rank::size], denominators[m]) for m, batch in enumerate(micro_batches)]


# --- collectives -----------------------------------------------------------------------

BACKEND_TAGS = ("[ring]", "[nccl]", "[mpi]", "[jaccl]", "[distributed]")


def lost_peer(exc: BaseException) -> bool:
    """Whether an exception is MLX's distributed backend failing (a rank died, or the
    network between the machines dropped)."""
    return isinstance(exc, RuntimeError) and any(tag in str(exc) for tag in BACKEND_TAGS)


def peer_lost_error(world: World, exc: BaseException) -> TemporaryFailure:
    """Given a backend failure, return the TemporaryFailure (exit 75) this rank exits with:
    the job restarts as a whole and resumes from rank 0's last checkpoint."""
    return TemporaryFailure(f"rank {world.rank} of {world.size} lost contact with the other ranks ({exc}); a rank "
                            "died or the network dropped. Restart the whole job: it resumes from rank 0's last "
                            "checkpoint")


@contextmanager
def collective(world: World):
    """Run a collective; a backend failure becomes TemporaryFailure (peer_lost_error)."""
    try:
        yield
    except RuntimeError as exc:
        if lost_peer(exc):
            raise peer_lost_error(world, exc) from exc
        raise

def gather_ints(world: World, values: list[int]) -> list[list[int]]:
    """Given this rank's integers, return every rank's (row r = rank r), in one all_gather."""
    if not world.distributed:
        return [list(values)]
    import mlx.core as mx

    with collective(world):
        return mx.distributed.all_gather(mx.array([values], dtype=mx.int64), group=world.group).tolist()


def any_true(world: World, flag: bool) -> bool:
    """Given this rank's flag, return whether any rank's is set (a collective)."""
    if not world.distributed:
        return flag
    import mlx.core as mx

    with collective(world):
        return bool(mx.distributed.all_max(mx.array([int(flag)], dtype=mx.int32), group=world.group).item())


def barrier(world: World) -> None:
    """Return once every rank has called it."""
    gather_ints(world, [0])


def start_handshake(world: World, status: int) -> list[int]:
    """Given this rank's start status (GO, or the exit code it is about to return),
    return every rank's; the ranks train only when all are GO."""
    return [row[0] for row in gather_ints(world, [status])]


def check_agreement(world: World, what: str, text: str) -> None:
    """Given a description and this rank's value of something all ranks must share (the
    configuration fingerprint: model, data, token cache, LoRA settings), raise
    InputError naming the ranks that differ from rank 0."""
    if not world.distributed:
        return
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], dtype=np.int64)
    rows = gather_ints(world, [int(digest[0])])
    odd = [rank for rank, row in enumerate(rows) if row != rows[0]]
    if odd:
        raise InputError(f"ranks {', '.join(map(str, odd))} disagree with rank 0 on the {what}: every machine of "
                         "a distributed job needs the same model, data, mathlora.toml and package versions")


def broadcast_arrays(world: World, arrays: dict) -> dict:
    """Given name -> mx.array (the same names, shapes and dtypes on every rank), return
    rank 0's values on every rank, bit for bit (an all_gather per dtype, not a sum, so
    even -0.0 survives)."""
    if not world.distributed or not arrays:
        return dict(arrays)
    import mlx.core as mx

    names = sorted(arrays)
    out = {}
    for dtype in sorted({arrays[n].dtype for n in names}, key=str):
        group = [n for n in names if arrays[n].dtype == dtype]
        flat = mx.concatenate([arrays[n].reshape(-1) for n in group])
        mine = mx.distributed.all_gather(flat[None], group=world.group)[0]  # rank 0's row
        offset = 0
        for n in group:
            size = arrays[n].size
            out[n] = mine[offset: offset + size].reshape(arrays[n].shape)
            offset += size
    with collective(world):
        mx.eval(out)
    return out


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
