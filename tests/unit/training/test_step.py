"""The training step (training/step.py): the compiled step against the uncompiled one it
replaced (same losses, bit-identical run to run), length buckets and trace building,
gradient checkpointing, and the opt-in dequantized matmul."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mathlora_daemon.config import load_config
from mathlora_daemon.training import step as trainer
from mathlora_daemon.training.batches import (
    MAX_BUCKETS,
    PAD_MULTIPLE,
    Schedule,
    bucket_length,
    epoch_order,
    step_micro_batches,
)
from mathlora_daemon.training.model import apply_lora, load_base
from mathlora_daemon.training.step import (
    DequantizedMatmulLinear,
    compiled_step,
    make_optimizer,
    train_step,
    use_dequantized_matmul,
)

# --- the compiled step ------------------------------------------------------------------------

TRAIN = ("train.learning_rate=0.005", "train.batch_size=2", "train.grad_accumulation_steps=2")

from models import live_lora


def lora_model(model_dir, *overrides):
    model, _, _ = load_base(model_dir)
    return live_lora(model, *overrides)


def sequences(seed: int, count: int = 12) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)  # lengths vary, so batches are padded and padding buckets differ
    return [np.concatenate([[0], rng.integers(3, 300, size=int(n) - 1)]).astype(np.int32)
            for n in rng.integers(5, 90, size=count)]


def run(model_dir, cache, steps: int, compile: bool, *overrides):
    model, cfg = lora_model(model_dir, *TRAIN, *overrides)
    schedule = Schedule(len(cache), cfg.train.batch_size, cfg.train.grad_accumulation_steps, 3)
    optimizer = make_optimizer(cfg.train.learning_rate)
    losses = []
    for step in range(steps):
        order = epoch_order(len(cache), cfg.train.seed, schedule.cursor(step)[0])
        result = train_step(model, optimizer, cache, step_micro_batches(schedule, order, step), cfg.train.seed, step,
                            compile=compile)
        losses.append(result.loss)
        assert result.tokens > 0
    return losses, {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def test_compiled_step_matches_the_uncompiled_one(tiny_model_dir, make_token_cache):
    cache = make_token_cache(sequences(1))
    eager_losses, eager_weights = run(tiny_model_dir, cache, 5, False)
    losses, weights = run(tiny_model_dir, cache, 5, True)
    assert len(set(eager_losses)) == 5
    np.testing.assert_allclose(losses, eager_losses, rtol=0, atol=1e-5)
    for key in weights:
        np.testing.assert_allclose(weights[key], eager_weights[key], rtol=0, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compiled_steps_are_bit_identical_run_to_run(tiny_model_dir, make_token_cache, dropout):
    cache = make_token_cache(sequences(2))
    overrides = (f"lora.dropout={dropout}",)
    losses_a, weights_a = run(tiny_model_dir, cache, 4, True, *overrides)
    losses_b, weights_b = run(tiny_model_dir, cache, 4, True, *overrides)
    assert losses_a == losses_b and all(np.isfinite(losses_a))
    for key in weights_a:
        assert np.array_equal(weights_a[key], weights_b[key]), key
    if dropout:  # dropout is live under compile: the masks change the losses
        plain, _ = run(tiny_model_dir, cache, 4, True)
        assert losses_a[1:] != plain[1:]


def test_the_environment_can_turn_compile_off(monkeypatch):
    monkeypatch.setenv(trainer.COMPILE_ENV, "0")
    assert trainer.compile_default() is False
    monkeypatch.setenv(trainer.COMPILE_ENV, "1")
    assert trainer.compile_default() is True
    monkeypatch.delenv(trainer.COMPILE_ENV)
    assert trainer.compile_default() is True


def test_the_compiled_step_is_built_once_and_rebuilt_after_a_restore(tiny_model_dir):
    model, cfg = lora_model(tiny_model_dir)
    optimizer = make_optimizer(1e-3)
    first = compiled_step(model, optimizer)
    assert compiled_step(model, optimizer) is first
    # A checkpoint restore replaces the optimizer's state object: the captured state is stale.
    optimizer.state = dict(optimizer.state)
    assert compiled_step(model, optimizer) is not first
    other, _ = lora_model(tiny_model_dir)
    assert compiled_step(other, optimizer).model_ref() is other


@pytest.mark.parametrize("positions, max_seq_len, expected", [
    (1, 1024, 64), (64, 1024, 64), (65, 1024, 128), (1000, 1024, 1024), (1023, 1024, 1024), (1024, 1024, 1024),
    (70, 100, 100), (99, 100, 100), (300, 256, 320), (1, 4096, 256), (4000, 4096, 4096), (70, 0, 128)])
def test_bucket_length(positions, max_seq_len, expected):
    assert bucket_length(positions, max_seq_len) == expected


@pytest.mark.parametrize("max_seq_len", [16, 64, 100, 256, 512, 1000, 1024, 2048, 4096, 8192, 32768])
def test_every_length_falls_in_one_of_at_most_16_buckets(max_seq_len):
    buckets = {bucket_length(n, max_seq_len) for n in range(1, max_seq_len + 1)}
    assert len(buckets) <= MAX_BUCKETS
    assert max(buckets) == max_seq_len  # a full chunk is fed exactly max_seq_len positions
    assert all(b % PAD_MULTIPLE == 0 for b in buckets if b != max_seq_len)


# --- 4-bit layers as dequantize + matmul (opt-in) -----------------------------------------------

def test_dequantized_matmul_linear_matches_quantized_linear():
    mx.random.seed(0)
    linear = nn.Linear(128, 96)
    reference, switched = nn.QuantizedLinear.from_linear(linear, 64, 4), nn.QuantizedLinear.from_linear(linear, 64, 4)

    class Holder(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

    holder = Holder(switched)
    assert use_dequantized_matmul(holder) == 1 and type(holder.layer) is DequantizedMatmulLinear
    assert isinstance(holder.layer, nn.QuantizedLinear)  # LoRA, fuse and export still recognise it
    for rows in (3, 600):  # few rows keep the quantized matmul, many take the dense path
        x = mx.random.normal((2, rows, 128))
        np.testing.assert_allclose(np.array(holder.layer(x)), np.array(reference(x)), rtol=1e-5, atol=1e-5)

        def grad(layer):
            return mx.grad(lambda x: (layer(x) ** 2).sum())(x)

        np.testing.assert_allclose(np.array(grad(holder.layer)), np.array(grad(reference)), rtol=1e-4, atol=1e-4)


def test_a_quantized_model_trains_the_same_with_dequantized_matmul(tiny_model_dir, make_token_cache, monkeypatch):
    cache = make_token_cache([np.concatenate([[0], np.arange(3, 3 + n)]).astype(np.int32) % 300
                              for n in (200, 180, 150, 220)])

    def steps(dequant: str):
        monkeypatch.setenv(trainer.DEQUANT_ENV, dequant)
        model, _, _ = load_base(tiny_model_dir)
        nn.quantize(model, group_size=32, bits=4)
        cfg = load_config(None, ["train.learning_rate=0.01"])
        apply_lora(model, cfg)
        model.train()
        optimizer = make_optimizer(cfg.train.learning_rate)
        losses = [train_step(model, optimizer, cache, [np.array([0, 1, 2, 3])], 0, step).loss for step in range(3)]
        switched = sum(type(m) is DequantizedMatmulLinear for _, m in model.named_modules())
        return losses, switched

    plain, none = steps("0")
    dequant, switched = steps("1")
    assert none == 0 and switched > 0
    np.testing.assert_allclose(dequant, plain, rtol=0, atol=1e-4)


# --- traces built apart (compile time kept out of the budget) ---------------------------------

def test_building_a_trace_leaves_adapters_and_optimizer_exactly_as_they_were(tiny_model_dir, make_token_cache):
    cache = make_token_cache(sequences(3))
    model, cfg = lora_model(tiny_model_dir, *TRAIN)
    optimizer = make_optimizer(cfg.train.learning_rate)
    train_step(model, optimizer, cache, [np.array([0, 1]), np.array([2, 3])], 0, 0)  # Adam moments are non-zero
    before = [(k, np.array(v)) for k, v in tree_flatten(model.trainable_parameters())] + \
             [(k, np.array(v)) for k, v in tree_flatten(optimizer.state)]
    fns = compiled_step(model, optimizer)
    tokens = mx.array(np.full((3, 129), 5, np.int32))  # a shape no step has used yet
    starts, lr = mx.array([0, 0, 0]), mx.array(1e-3)
    seconds, label = fns.warm("finish", tokens, mx.array([129, 100, 7]), starts, None, mx.array(0.5), lr)
    assert label == "finish 3x128" and seconds > 0
    after = [(k, np.array(v)) for k, v in tree_flatten(model.trainable_parameters())] + \
            [(k, np.array(v)) for k, v in tree_flatten(optimizer.state)]
    assert [k for k, _ in before] == [k for k, _ in after]
    for (key, a), (_, b) in zip(before, after):
        assert np.array_equal(a, b), key
    assert fns.warm("finish", tokens, mx.array([129, 100, 7]), starts, None, mx.array(0.5), lr) == (0.0, None)


def test_traces_are_built_once_per_length_bucket_and_reported(tiny_model_dir, make_token_cache):
    rng = np.random.default_rng(4)
    seqs = [rng.integers(3, 300, size=int(n)).astype(np.int32) for n in rng.integers(2, 258, size=48)]
    cache = make_token_cache(seqs)
    cache.meta["max_seq_len"] = 256
    model, cfg = lora_model(tiny_model_dir, *TRAIN)
    optimizer = make_optimizer(cfg.train.learning_rate)
    schedule = Schedule(len(cache), 2, 2, 1)
    order = epoch_order(len(cache), 0, 0)
    results = [train_step(model, optimizer, cache, step_micro_batches(schedule, order, step), 0, step)
               for step in range(schedule.total_steps)]
    built = [label for r in results for label in r.traces]
    assert len(built) == len(set(built))  # never twice
    assert {label.split()[1] for label in built} <= {f"{b}x{n}" for b in (1, 2) for n in (64, 128, 192, 256)}
    assert results[0].traces and results[0].compile_s > 0
    assert all(r.compile_s == 0 for r in results if not r.traces)
    for r in results:  # positions are what the model computed, padding included
        assert r.positions % 64 == 0 and 0 < r.tokens <= r.positions and 0 <= r.padding_share < 1


# --- gradient checkpointing --------------------------------------------------------------------

def test_grad_checkpoint_changes_memory_not_results(tiny_model_dir, make_token_cache, monkeypatch):
    from mathlora_daemon.training.model import grad_checkpointed, use_grad_checkpoint

    # Long enough that the logits are made in several slices (HEAD_CHUNK_ROWS / batch 2 = 64 positions).
    monkeypatch.setattr(trainer, "HEAD_CHUNK_ROWS", 128)
    rng = np.random.default_rng(5)
    cache = make_token_cache([rng.integers(3, 300, size=int(n)).astype(np.int32) for n in (257, 200, 140, 257)])
    cache.meta["max_seq_len"] = 256

    def steps(checkpoint: bool):
        model, cfg = lora_model(tiny_model_dir, *TRAIN)
        if checkpoint:
            assert use_grad_checkpoint(model) == len(model.layers) and grad_checkpointed(model)
        optimizer = make_optimizer(cfg.train.learning_rate)
        losses = [train_step(model, optimizer, cache, [np.array([0, 1]), np.array([2, 3])], 0, step).loss
                  for step in range(3)]
        return losses, {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}

    plain_losses, plain = steps(False)
    losses, weights = steps(True)
    # The recomputed forward may round differently in the last bit on some CPUs (an AMD
    # EPYC did), and Adam turns that into up to ~1e-4 of lr for an element whose gradient
    # is near eps; a checkpoint that changed what is computed moves losses and weights far more.
    assert losses == pytest.approx(plain_losses, rel=1e-6, abs=0)
    for key in plain:
        np.testing.assert_allclose(weights[key], plain[key], rtol=0, atol=1e-3 * 0.005, err_msg=key)
