"""This process's place among the ranks of a data-parallel job, and the collectives.

`mlx.launch` starts the same `mathlora-daemon run` once per rank and tells each process,
through its environment, where the others are (MLX_RANK + MLX_HOSTFILE for the ring
backend, the MPI, NCCL or JACCL variables for the others). `init_world` turns that into a
`World`; without those variables it is the single process every other start uses, and
no collective is ever called.

The collectives the runtime and training use are here (gather, any, barrier, the start
handshake, agreement on the configuration, the bit-exact broadcast of rank 0's state).
Every rank must call them in the same order; a backend failure ("[ring] connection to a
peer was lost") becomes TemporaryFailure (exit 75), so a dead rank ends the job instead
of hanging it, and a restart of the whole job resumes from rank 0's last checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mathlora_daemon import testhooks
from mathlora_daemon.errors import InputError, TemporaryFailure

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
def collective(world: World, name: str = "collective"):
    """Run a collective; a backend failure becomes TemporaryFailure (peer_lost_error).
    (The tests record `name` in order, to pin that every rank calls the same ones.)"""
    testhooks.trace_collective(name)
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

    with collective(world, "gather_ints"):
        return mx.distributed.all_gather(mx.array([values], dtype=mx.int64), group=world.group).tolist()


def any_true(world: World, flag: bool) -> bool:
    """Given this rank's flag, return whether any rank's is set (a collective)."""
    if not world.distributed:
        return flag
    import mlx.core as mx

    with collective(world, "any_true"):
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
    with collective(world, "broadcast_arrays"):
        mx.eval(out)
    return out
