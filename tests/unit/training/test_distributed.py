"""daemon/distributed.py and the distributed parts of the trainer and runtime, in one
process: how a step is cut into shares, that the shares' losses and gradients add up to
the single-process ones, how the ranks' wishes merge at a boundary, and how the
environment left by mlx.launch is read. The real multi-process runs are in
test_distributed_e2e.py.
"""

from __future__ import annotations

from datetime import datetime

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mathlora_daemon.config import Config
from mathlora_daemon.errors import InputError
from mathlora_daemon.runtime.boundary import WAIT_MEMORY, WAIT_POWER, Runtime
from mathlora_daemon.runtime.budget import AwakeClock, Budget
from mathlora_daemon.runtime.memory import MemoryReading
from mathlora_daemon.runtime.power import PowerState
from mathlora_daemon.runtime.signals import Flags
from mathlora_daemon.runtime.world import (
    SINGLE,
    World,
    any_true,
    broadcast_arrays,
    check_agreement,
    gather_ints,
    init_world,
    launched,
    lost_peer,
)
from mathlora_daemon.training.distributed import shard_step, target_tokens
from mathlora_daemon.training.model import apply_lora, load_base
from mathlora_daemon.training.step import masked_loss, share_loss

from fakes import RecordingHeartbeat, RecordingLog

LENGTHS = np.array([5, 9, 3, 7, 12, 4, 6, 8, 10, 2, 11, 5], dtype=np.int64)


def micro_batches(count: int, batch: int) -> list[np.ndarray]:
    order = np.random.default_rng(0).permutation(count * batch)
    return [order[i: i + batch] for i in range(0, count * batch, batch)]


@pytest.mark.parametrize("count,batch,size", [(4, 3, 2), (4, 3, 4), (3, 4, 2), (1, 4, 2), (2, 3, 4), (1, 2, 3),
                                              (3, 4, 1)])
def test_the_shares_of_all_ranks_hold_every_row_once(count, batch, size):
    micro = micro_batches(count, batch)
    shares = [shard_step(micro, LENGTHS, rank, size) for rank in range(size)]
    rows = np.concatenate([s.indices for per_rank in shares for s in per_rank])
    assert sorted(rows.tolist()) == sorted(np.concatenate(micro).tolist())  # disjoint and complete
    assert len({len(per_rank) for per_rank in shares}) == 1  # every rank takes as many micro-steps
    for per_rank in shares:
        for share in per_rank:  # the denominator is always the whole micro-batch's target count
            assert share.denominator == target_tokens(LENGTHS[micro[share.micro]])
            assert set(share.indices.tolist()) <= set(micro[share.micro].tolist())


def test_whole_micro_batches_go_round_robin_when_their_number_divides():
    micro = micro_batches(4, 3)
    ranks = [shard_step(micro, LENGTHS, rank, 2) for rank in range(2)]
    assert [s.micro for s in ranks[0]] == [0, 2] and [s.micro for s in ranks[1]] == [1, 3]
    assert all(np.array_equal(s.indices, micro[s.micro]) for r in ranks for s in r)


def test_otherwise_the_rows_of_every_micro_batch_are_dealt_and_shares_may_be_empty():
    micro = micro_batches(1, 2)
    ranks = [shard_step(micro, LENGTHS, rank, 3) for rank in range(3)]
    assert [len(r[0].indices) for r in ranks] == [1, 1, 0]
    with pytest.raises(ValueError):
        shard_step(micro, LENGTHS, 3, 3)


def test_target_tokens_counts_next_token_targets():
    assert target_tokens(np.array([5, 1, 0, 3])) == 4 + 0 + 0 + 2


@pytest.mark.parametrize("masked", [False, True])
def test_shares_add_up_to_the_single_process_loss_and_gradient(masked, tiny_model_dir):
    model, _, _ = load_base(tiny_model_dir)
    apply_lora(model, Config())
    model.train(False)
    rng = np.random.default_rng(1)
    lengths = np.array([7, 12, 4, 9])
    tokens = np.zeros((4, 12), dtype=np.int32)
    for row, n in enumerate(lengths):
        tokens[row, :n] = rng.integers(3, 200, size=n)
    starts = None if not masked else np.array([3, 5, 0, 2])  # prompt lengths: only what follows is trained
    whole_fn = nn.value_and_grad(model, masked_loss)
    (whole, _), whole_grads = whole_fn(model, mx.array(tokens), mx.array(lengths),
                                       None if starts is None else mx.array(starts))

    share_fn = nn.value_and_grad(model, share_loss)
    denominator = mx.array(target_tokens(lengths, starts), mx.float32)
    parts = [share_fn(model, mx.array(tokens[rows]), mx.array(lengths[rows]),
                      None if starts is None else mx.array(starts[rows]), denominator)
             for rows in ([0, 2], [1, 3])]  # two ranks' rows of one micro-batch
    total = sum(loss for (loss, _), _ in parts)
    assert abs(total.item() - whole.item()) < 1e-5
    summed = dict(tree_flatten(parts[0][1]))
    for key, value in tree_flatten(parts[1][1]):
        summed[key] = summed[key] + value
    for key, value in tree_flatten(whole_grads):
        np.testing.assert_allclose(np.array(summed[key]), np.array(value), rtol=1e-4, atol=1e-6, err_msg=key)


def test_a_single_world_needs_no_collectives():
    assert gather_ints(SINGLE, [3, 4]) == [[3, 4]]
    assert any_true(SINGLE, True) and not any_true(SINGLE, False)
    arrays = {"a": mx.array([1.0, -0.0])}
    assert broadcast_arrays(SINGLE, arrays)["a"] is arrays["a"]
    check_agreement(SINGLE, "fingerprint", "anything")


def test_the_environment_decides_the_world(tmp_path):
    assert not launched({}) and init_world({}) is SINGLE
    empty = tmp_path / "hosts.json"
    empty.write_text("\n")  # what mlx.launch writes for a single host
    assert not launched({"MLX_HOSTFILE": str(empty), "MLX_RANK": "0"})
    assert init_world({"MLX_HOSTFILE": str(empty), "MLX_RANK": "0"}) is SINGLE
    ring = tmp_path / "ring.json"
    ring.write_text('[["127.0.0.1:5000"], ["127.0.0.1:5001"]]')
    assert launched({"MLX_HOSTFILE": str(ring), "MLX_RANK": "1"})
    assert launched({"MLX_WORLD_SIZE": "2"}) and launched({"OMPI_COMM_WORLD_SIZE": "4"})
    with pytest.raises(InputError, match="MLX_HOSTFILE=.*missing.json: no such file"):
        init_world({"MLX_HOSTFILE": str(tmp_path / "missing.json"), "MLX_RANK": "0"})


def test_backend_failures_are_recognised():
    assert lost_peer(RuntimeError("[ring] connection to a peer was lost"))
    assert not lost_peer(RuntimeError("[metal] out of memory")) and not lost_peer(ValueError("[ring]"))


# --- the boundary across ranks, with the collective injected ---------------------------

PLENTY = MemoryReading(mem_active_gb=0.1, mem_cache_gb=0.0, mem_peak_gb=0.1, rss_gb=0.2, sys_available_gb=20.0,
                       swap_used_gb=0.0)
NO_BATTERY = PowerState(on_battery=None, percent=None)


def ranked_runtime(rank: int, others: list[list[int]], **daemon) -> tuple[Runtime, list]:
    """A Runtime of `rank` in a world of len(others) + 1 whose collective returns this
    rank's row among the others' rows (what mx.distributed.all_gather would)."""
    cfg = Config()
    for key, value in daemon.items():
        setattr(cfg.daemon, key, value)
    sent = []

    def gather(world, values):
        sent.append(list(values))
        rows = [list(r) for r in others]
        rows.insert(rank, list(values))
        return rows

    world = World(rank=rank, size=len(others) + 1, group=object(), backend="ring")
    runtime = Runtime(run=None, cfg=cfg, config_path=None, overrides=[], log=RecordingLog(), flags=Flags(),
                      heartbeat=RecordingHeartbeat(), budget=Budget(cfg.daemon.budget_hours * 3600),
                      clock=AwakeClock(monotonic=lambda: 0.0, wall=lambda: 0.0), read_memory=lambda: PLENTY,
                      read_power=lambda: NO_BATTERY, now=lambda: datetime(2026, 11, 24, 23, 0), world=world,
                      gather=gather)
    return runtime, sent


def test_a_signal_on_another_rank_stops_this_one_at_the_same_boundary():
    runtime, sent = ranked_runtime(0, [[1, 0]])  # rank 1 got SIGTERM
    stop = runtime.boundary(lambda: None)
    assert sent == [[0, 0]]  # one collective per look, whatever the answer
    assert stop.state == "stopped" and stop.reason.startswith("rank 1: asked to stop")


def test_rank_0s_budget_stop_reaches_the_others():
    runtime, _ = ranked_runtime(1, [[2, 0]])
    stop = runtime.boundary(lambda: None)
    assert stop.state == "budget_exhausted" and "rank 0" in stop.reason


def test_this_ranks_own_stop_is_sent_and_kept():
    runtime, sent = ranked_runtime(1, [[0, 0], [0, 0]])
    runtime.flags.request_stop("signal SIGINT")
    stop = runtime.boundary(lambda: None)
    assert sent == [[1, 0]] and stop.reason == "signal SIGINT"


def test_a_wait_on_another_rank_holds_every_rank_until_it_clears():
    others = [[0, WAIT_MEMORY | WAIT_POWER]]
    runtime, sent = ranked_runtime(0, others)
    checkpoints = []
    runtime.flags.wake.set()  # each poll returns at once instead of after POLL_S

    def gather_then_clear(world, values):
        sent.append(list(values))
        rows = [list(values), list(others[0])]
        others[0] = [0, 0]  # rank 1 has memory again at its next look
        runtime.flags.wake.set()
        return rows

    runtime.gather = gather_then_clear
    assert runtime.boundary(lambda: checkpoints.append("saved")) is None
    assert checkpoints == ["saved"] and len(sent) == 2
    paused = [f for _, e, f in runtime.log.events if e == "daemon.paused"]
    assert paused and paused[0]["reason"] == "rank 1: memory is low"
    assert runtime.log.names()[-1] == "daemon.resumed"


def test_one_process_calls_no_collective():
    runtime, sent = ranked_runtime(0, [])
    runtime.world = SINGLE
    assert runtime.boundary(lambda: None) is None and sent == []
