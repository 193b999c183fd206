"""Tests for daemon.batches (schedule, deterministic order, micro-batches, padding) and
daemon.trainer (masked loss, gradient accumulation, deterministic steps)."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mathlora_daemon.config import load_config
from mathlora_daemon.training.batches import (
    GROUP_WINDOW_STEPS,
    Schedule,
    epoch_order,
    pad_batch,
    step_micro_batches,
    step_seed,
    training_order,
)
from mathlora_daemon.training.model import ADAPTER_WEIGHTS, adapter_config, apply_lora, load_base, save_adapters
from mathlora_daemon.training.step import make_optimizer, masked_loss, train_step

# --- schedule -----------------------------------------------------------------------------
from models import live_b


def test_schedule_with_partial_last_step():
    s = Schedule(sequences=10, batch_size=2, grad_accumulation_steps=3, epochs=3)
    assert s.sequences_per_step == 6
    assert s.steps_per_epoch == 2  # 6 + 4: the last step is partial, nothing dropped
    assert s.total_steps == 6


@pytest.mark.parametrize("sequences, bs, acc, per_epoch", [(1, 1, 8, 1), (8, 1, 8, 1), (9, 1, 8, 2), (16, 2, 4, 2),
                                                           (17, 2, 4, 3), (100, 4, 1, 25)])
def test_steps_per_epoch(sequences, bs, acc, per_epoch):
    assert Schedule(sequences, bs, acc, 1).steps_per_epoch == per_epoch


def test_total_steps_max_steps_cap():
    assert Schedule(10, 2, 3, 3, max_steps=4).total_steps == 4
    assert Schedule(10, 2, 3, 3, max_steps=6).total_steps == 6
    assert Schedule(10, 2, 3, 3, max_steps=100).total_steps == 6  # a cap never adds steps
    assert Schedule(10, 2, 3, 3, max_steps=0).total_steps == 6  # 0 = no cap


def test_cursor():
    s = Schedule(10, 2, 3, 3)
    assert [s.cursor(step) for step in range(6)] == [(0, 0), (0, 6), (1, 0), (1, 6), (2, 0), (2, 6)]


# --- order and micro-batches ------------------------------------------------------------------

def test_epoch_order_is_a_deterministic_permutation():
    a = epoch_order(50, seed=7, epoch=0)
    assert sorted(a.tolist()) == list(range(50))
    assert np.array_equal(a, epoch_order(50, seed=7, epoch=0))
    assert not np.array_equal(a, epoch_order(50, seed=7, epoch=1))
    assert not np.array_equal(a, epoch_order(50, seed=8, epoch=0))
    assert not np.array_equal(a, np.arange(50))


def test_epoch_orders_differ_across_many_epochs():
    orders = {tuple(epoch_order(20, seed=0, epoch=e)) for e in range(10)}
    assert len(orders) == 10


@pytest.mark.parametrize("n, bs, acc", [(10, 2, 3), (11, 2, 3), (7, 1, 8), (12, 3, 2), (5, 4, 1)])
def test_micro_batches_cover_each_epoch_exactly_once(n, bs, acc):
    s = Schedule(n, bs, acc, epochs=3)
    seen: dict[int, list[int]] = {}
    orders = {}
    for step in range(s.total_steps):
        epoch, _ = s.cursor(step)
        order = orders.setdefault(epoch, epoch_order(n, 0, epoch))
        batches = step_micro_batches(s, order, step)
        assert 1 <= len(batches) <= acc
        assert all(1 <= len(b) <= bs for b in batches)
        seen.setdefault(epoch, []).extend(int(i) for b in batches for i in b)
    assert sorted(seen) == [0, 1, 2]
    for epoch, indices in seen.items():
        assert sorted(indices) == list(range(n)), epoch
        assert indices == orders[epoch].tolist()  # in the epoch's order


def test_micro_batches_of_a_partial_step():
    s = Schedule(11, 2, 3, 1)
    order = np.arange(11)[::-1]
    assert [b.tolist() for b in step_micro_batches(s, order, 0)] == [[10, 9], [8, 7], [6, 5]]
    assert [b.tolist() for b in step_micro_batches(s, order, 1)] == [[4, 3], [2, 1], [0]]


# --- grouping by length -----------------------------------------------------------------------

def lengths_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, 1025, size=n)


@pytest.mark.parametrize("n, sps", [(1000, 8), (999, 8), (37, 4), (5, 8), (256, 1)])
def test_grouped_order_is_the_epochs_permutation_regrouped(n, sps):
    lengths = lengths_of(n)
    order = training_order(lengths, 3, 1, sps, grouped=True)
    assert sorted(order.tolist()) == list(range(n))  # every sequence once per epoch
    assert np.array_equal(order, training_order(lengths, 3, 1, sps, grouped=True))  # (seed, epoch) decide it all
    assert not np.array_equal(order, training_order(lengths, 3, 2, sps, grouped=True)) or n < 10
    assert np.array_equal(training_order(lengths, 3, 1, sps, grouped=False), epoch_order(n, 3, 1))
    window = sps * GROUP_WINDOW_STEPS
    for start in range(0, n, window):  # each window holds the same sequences as the permutation's
        assert sorted(order[start:start + window].tolist()) == sorted(epoch_order(n, 3, 1)[start:start + window])


def test_grouped_steps_hold_similar_lengths_longest_first():
    n, sps = 4096, 8
    lengths = lengths_of(n, seed=1)
    s = Schedule(n, 4, 2, 1)
    grouped, plain = training_order(lengths, 0, 0, sps, True), training_order(lengths, 0, 0, sps, False)

    def spread(order):  # mean over steps of (longest - shortest) in a step
        steps = [lengths[np.concatenate(step_micro_batches(s, order, k))] for k in range(s.total_steps)]
        assert all(list(step) == sorted(step, reverse=True) for step in steps) or order is plain
        return np.mean([step.max() - step.min() for step in steps])

    assert spread(grouped) < 0.1 * spread(plain)
    # The steps of a window are shuffled: the run does not walk from long to short sequences.
    firsts = [lengths[grouped[k * sps]] for k in range(GROUP_WINDOW_STEPS)]
    assert firsts != sorted(firsts, reverse=True)


def test_grouping_keeps_a_short_last_step_last():
    lengths = np.array([5, 900, 7, 800, 3, 1000, 2, 600, 4, 700, 999])  # 11 sequences, steps of 4
    order = training_order(lengths, 0, 0, 4, grouped=True)
    s = Schedule(11, 2, 2, 1)
    steps = [np.concatenate(step_micro_batches(s, order, k)) for k in range(s.total_steps)]
    assert [len(step) for step in steps] == [4, 4, 3]
    assert sorted(order.tolist()) == list(range(11))


def test_step_seed_depends_on_seed_and_step_only():
    assert step_seed(0, 5) == step_seed(0, 5)
    assert len({step_seed(0, step) for step in range(100)}) == 100
    assert step_seed(0, 5) != step_seed(1, 5)
    assert all(0 <= step_seed(s, g) < 2**32 for s in (0, 2**32 - 1) for g in (0, 10**9))


# --- padding -----------------------------------------------------------------------------------

def test_pad_batch_shapes_and_lengths():
    seqs = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10, 11, 12, 13])]
    tokens, lengths = pad_batch(seqs, pad_id=2)
    assert tokens.shape == (3, 5) and tokens.dtype == np.int32
    assert lengths.tolist() == [3, 1, 5]
    assert tokens.tolist() == [[5, 6, 7, 2, 2], [8, 2, 2, 2, 2], [9, 10, 11, 12, 13]]
    tokens, lengths = pad_batch([np.array([1, 2])])
    assert tokens.tolist() == [[1, 2]] and lengths.tolist() == [2]


# --- the model under training -------------------------------------------------------------------

def lora_model(model_dir, *overrides, lora_b_seed: int | None = None):
    model, tokenizer, _ = load_base(model_dir)
    cfg = load_config(None, list(overrides))
    keys = apply_lora(model, cfg)
    if lora_b_seed is not None:  # every LoRA weight takes part in the comparison (tests/models.py)
        live_b(model, lora_b_seed)
    model.train()
    return model, tokenizer, cfg, keys


def lora_weights(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def random_sequences(count: int, length: int, seed: int, vocab: int = 300) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.concatenate([[0], rng.integers(3, vocab, size=length - 1)]).astype(np.int32) for _ in range(count)]


def test_masked_loss_ignores_padding(tiny_model_dir):
    model, _, _, _ = lora_model(tiny_model_dir, lora_b_seed=0)
    model.eval()
    short, long = random_sequences(1, 9, seed=1)[0], random_sequences(1, 20, seed=2)[0]

    alone, n_alone = masked_loss(model, mx.array(short[None]), mx.array([len(short)]))
    assert int(n_alone.item()) == len(short) - 1
    for pad_id in (0, 2, 7):
        tokens, lengths = pad_batch([short, long], pad_id)
        single_padded = np.full((1, 20), pad_id, dtype=np.int32)
        single_padded[0, : len(short)] = short
        padded, n_padded = masked_loss(model, mx.array(single_padded), mx.array([len(short)]))
        assert int(n_padded.item()) == len(short) - 1
        assert abs(padded.item() - alone.item()) < 1e-5

        both, n_both = masked_loss(model, mx.array(tokens), mx.array(lengths))
        long_loss, n_long = masked_loss(model, mx.array(long[None]), mx.array([len(long)]))
        assert int(n_both.item()) == (len(short) - 1) + (len(long) - 1)
        # The batch loss is the mean over real target tokens of both sequences.
        expected = (alone.item() * (len(short) - 1) + long_loss.item() * (len(long) - 1)) / n_both.item()
        assert abs(both.item() - expected) < 1e-5


def test_masked_loss_is_the_mean_next_token_cross_entropy(tiny_model_dir):
    model, _, _, _ = lora_model(tiny_model_dir)
    model.eval()
    seq = random_sequences(1, 8, seed=3)[0]
    loss, _ = masked_loss(model, mx.array(seq[None]), mx.array([len(seq)]))
    logits = np.array(model(mx.array(seq[None, :-1])), dtype=np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = -np.mean(logp[np.arange(len(seq) - 1), seq[1:]])
    assert abs(loss.item() - expected) < 1e-4


@pytest.mark.parametrize("optimizer_name", ["sgd", "adam"])
def test_gradient_accumulation_equals_a_larger_batch(tiny_model_dir, make_token_cache, optimizer_name):
    seqs = random_sequences(2, 14, seed=4)
    cache = make_token_cache(seqs)

    def one_step(micro_batches):
        model, _, cfg, _ = lora_model(tiny_model_dir, "train.learning_rate=0.01", lora_b_seed=5)
        start = lora_weights(model)
        # SGD shows the gradient's scale (a sum instead of a mean would double it); Adam
        # is what the daemon uses.
        opt = optim.SGD(learning_rate=0.5) if optimizer_name == "sgd" else make_optimizer(cfg.train.learning_rate)
        result = train_step(model, opt, cache, [np.array(b) for b in micro_batches], cfg.train.seed, 0)
        return start, lora_weights(model), result

    start, batched, r_batched = one_step([[0, 1]])       # batch_size 2, accumulation 1
    _, accumulated, r_accumulated = one_step([[0], [1]])  # batch_size 1, accumulation 2
    assert batched.keys() == accumulated.keys()
    moved = max(np.abs(batched[k] - start[k]).max() for k in start)
    assert moved > 1e-3  # the step really changed the weights
    # Summed in another order, the gradients differ in their last bits. SGD passes that on
    # as it is; Adam's first step is lr * g / (|g| + eps), which for an element whose |g|
    # is near eps turns those bits into up to ~1e-4 of lr (seen on an AMD EPYC). A lost or
    # doubled micro-batch moves elements by O(lr).
    atol = 1e-6 if optimizer_name == "sgd" else 1e-3 * 0.01
    for key in batched:
        np.testing.assert_allclose(accumulated[key], batched[key], rtol=0, atol=atol, err_msg=key)
    assert abs(r_batched.loss - r_accumulated.loss) < 1e-5
    assert r_batched.tokens == r_accumulated.tokens == 2 * 13


def run_steps(model_dir, cache, steps: int, *overrides, out=None, disturb_rng: bool = False):
    model, _, cfg, keys = lora_model(model_dir, *overrides)
    schedule = Schedule(len(cache), cfg.train.batch_size, cfg.train.grad_accumulation_steps, cfg.train.epochs)
    optimizer = make_optimizer(cfg.train.learning_rate)
    losses = []
    for step in range(steps):
        if disturb_rng:  # anything else drawing random numbers (an eval, a restart) in between
            mx.eval(mx.random.uniform(shape=(step + 3,)))
        epoch, _ = schedule.cursor(step)
        order = epoch_order(len(cache), cfg.train.seed, epoch)
        losses.append(train_step(model, optimizer, cache, step_micro_batches(schedule, order, step),
                                 cfg.train.seed, step).loss)
    if out is not None:
        save_adapters(model, out, adapter_config(cfg, len(model.layers), keys))
    return losses, lora_weights(model)


TRAIN = ("train.learning_rate=0.005", "train.batch_size=2", "train.grad_accumulation_steps=2")


def test_train_steps_are_deterministic(tiny_model_dir, make_token_cache, tmp_path):
    cache = make_token_cache(random_sequences(5, 12, seed=6) + random_sequences(3, 7, seed=7))
    losses_a, weights_a = run_steps(tiny_model_dir, cache, 3, *TRAIN, out=tmp_path / "a")
    losses_b, weights_b = run_steps(tiny_model_dir, cache, 3, *TRAIN, out=tmp_path / "b")
    assert losses_a == losses_b
    assert all(np.isfinite(losses_a))
    assert len(set(losses_a)) == 3
    for key in weights_a:
        assert np.array_equal(weights_a[key], weights_b[key]), key
    assert (tmp_path / "a" / ADAPTER_WEIGHTS).read_bytes() == (tmp_path / "b" / ADAPTER_WEIGHTS).read_bytes()


def test_dropout_is_active_and_deterministic_per_seed(tiny_model_dir, make_token_cache):
    cache = make_token_cache(random_sequences(8, 12, seed=8))
    dropout = (*TRAIN, "lora.dropout=0.5")
    losses_a, weights_a = run_steps(tiny_model_dir, cache, 3, *dropout)
    losses_b, weights_b = run_steps(tiny_model_dir, cache, 3, *dropout)
    assert losses_a == losses_b
    for key in weights_a:
        assert np.array_equal(weights_a[key], weights_b[key]), key
    # Dropout really changes the computation (the first step's loss is the same only
    # while B is still zero, so compare the later steps).
    no_dropout, weights_plain = run_steps(tiny_model_dir, cache, 3, *TRAIN)
    assert losses_a[1:] != no_dropout[1:]
    assert any(not np.array_equal(weights_a[k], weights_plain[k]) for k in weights_a)


def test_dropout_masks_come_from_seed_and_step_not_history(tiny_model_dir, make_token_cache):
    # A resumed run must draw the same masks as an uninterrupted one, so each step's
    # randomness may depend only on (seed, step), not on what drew numbers before it.
    cache = make_token_cache(random_sequences(8, 12, seed=9))
    dropout = (*TRAIN, "lora.dropout=0.5")
    losses, weights = run_steps(tiny_model_dir, cache, 3, *dropout)
    losses_disturbed, weights_disturbed = run_steps(tiny_model_dir, cache, 3, *dropout, disturb_rng=True)
    assert losses_disturbed == losses
    for key in weights:
        assert np.array_equal(weights_disturbed[key], weights[key]), key
