"""The training benchmark's CI smoke run, and the compiled training step against the
uncompiled one it replaced (same losses, bit-identical run to run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from daemon import trainer
from daemon.batches import MAX_BUCKETS, PAD_MULTIPLE, Schedule, bucket_length, epoch_order, step_micro_batches
from daemon.config import load_config
from daemon.model import apply_lora, load_base
from daemon.trainer import (DequantizedMatmulLinear, compiled_step, make_optimizer, train_step,
                            use_dequantized_matmul)

ROOT = Path(__file__).resolve().parents[1]


# --- the benchmark, end to end (CPU, no timing assertions) ------------------------------------

def test_train_bench_tiny_smoke(tmp_path):
    out, md = tmp_path / "results.json", tmp_path / "results.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_bench.py"), "--shape", "tiny", "--batch", "1,2",
                           "--steps", "3", "--warmup", "1", "--which", "daemon,daemon-ungrouped,bare", "--seq", "64",
                           "--lengths", "fixed,real", "--prep-rows", "100", "--out", str(out), "--md", str(md)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())

    head = doc["header"]
    assert {"command", "mlx_device", "mlx_device_name", "versions", "platform", "model", "seq"} <= head.keys()
    assert "train_bench.py" in head["command"] and head["versions"]["mlx.core"] == mx.__version__
    assert head["model"]["num_hidden_layers"] == 2 and head["seq"] == 64

    records = [r for r in doc["records"] if "skipped" not in r]
    skipped = [r for r in doc["records"] if "skipped" in r]
    assert sorted((r["lengths"], r["loop"], r["batch"]) for r in records) == [
        ("fixed", "bare", 1), ("fixed", "bare", 2), ("fixed", "daemon", 1), ("fixed", "daemon", 2),
        ("real", "daemon", 1), ("real", "daemon", 2), ("real", "daemon-ungrouped", 1), ("real", "daemon-ungrouped", 2)]
    assert {(r["lengths"], r["loop"]) for r in skipped} == {("fixed", "daemon-ungrouped"), ("real", "bare")}
    for r in records:
        assert r["measured_steps"] == 3 and len(r["all_step_s"]) == 3
        assert r["step_s_median"] > 0 and r["tok_per_s"] > 0 and r["tok_per_s_mean"] > 0
        assert r["peak_gb"] >= 0 and r["compiled"] is True and r["first_step_s"] > 0
        assert np.isfinite(r["first_loss"]) and np.isfinite(r["last_loss"])
    for r in (r for r in records if r["lengths"] == "fixed"):  # T + 1 tokens: exactly T = 64 positions
        assert r["tok_per_s"] == pytest.approx(r["batch"] * 64 / r["step_s_median"], rel=1e-3)
    for r in (r for r in records if r["loop"].startswith("daemon")):
        assert r["checkpoint_bytes"] > 0 and r["checkpoint_save_s"] >= 0 and r["checkpoint_restore_s"] >= 0
        assert r["train_step_s_median"] > 0 and r["boundary_ms_median"] >= 0
        assert r["traces"] >= 1 and r["compile_s"] > 0 and r["first_compile_s"] > 0
        assert r["budget_used_s"] > 0
    for r in (r for r in records if r["lengths"] == "real"):  # real (non-pad) tokens over time
        assert 0 <= r["padding_share"] < 1 and r["vs_fixed"] > 0
        assert r["group_by_length"] is (r["loop"] == "daemon")
        assert r["positions_per_s"] >= r["tok_per_s"]
    assert all(r["vs_bare"] > 0 for r in records if r["loop"] == "daemon" and r["lengths"] == "fixed")
    real = doc["real_lengths"]
    assert real["rows_over_seq_share"] > 0.5 and real["sequences"] > real["rows"]  # long rows were chunked
    # Same tokens in the same order: the daemon's first step sees what the bare loop sees.
    by = {(r["lengths"], r["loop"], r["batch"]): r for r in records}
    for batch in (1, 2):
        assert by["fixed", "daemon", batch]["first_loss"] == pytest.approx(by["fixed", "bare", batch]["first_loss"],
                                                                           abs=1e-3)

    prep = doc["data_prep"]
    assert prep["rows"] == 100 and prep["sequences"] >= 100 and prep["tokens"] > 0
    assert prep["rows_per_s"] > 0 and prep["tokens_per_s"] > 0 and prep["cache_load_s_median"] >= 0

    table = md.read_text()
    assert table.strip() == proc.stdout.strip()
    rows = [line for line in table.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == len(doc["records"])
    for r in records:
        assert any(f"| {r['lengths']} | {r['loop']} | {r['batch']} x 1 |" in row for row in rows), r
    assert "data preparation" in table and head["command"] in table and "Real lengths:" in table


def test_distributed_bench_tiny_smoke(tmp_path):
    from runs import free_port_range

    out, md = tmp_path / "dist.json", tmp_path / "dist.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "distributed_bench.py"), "--shape", "tiny", "--seq",
                           "64", "--batch", "2", "--ranks", "1,2", "--steps", "2", "--warmup", "1",
                           "--starting-port", str(free_port_range(2)), "--out", str(out), "--md", str(md)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    assert [(r["ranks"], r["global_batch"]) for r in records] == [(1, 2), (2, 4)]
    assert records[1]["backend"] == "ring"
    for r in records:  # every rank's share of every step was trained and counted
        assert r["tokens_per_step"] == r["global_batch"] * 64 and r["tokens_per_s"] > 0  # T = 64 positions each
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ranks"], abs=1e-3)
    assert "| 2 | ring | 4 |" in md.read_text()


def test_train_bench_records_unavailable_loops_as_skipped(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_bench.py"), "--shape", "tiny", "--batch", "1",
                           "--steps", "1", "--warmup", "0", "--which", "daemon-dequant", "--seq", "32",
                           "--prep-rows", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())["records"]
    assert len(records) == 1 and "no 4-bit layers" in records[0]["skipped"]
    assert "| daemon-dequant | 1 x 1 |" in proc.stdout and "skipped" in proc.stdout


# --- the compiled step ------------------------------------------------------------------------

TRAIN = ("train.learning_rate=0.005", "train.batch_size=2", "train.grad_accumulation_steps=2")


def lora_model(model_dir, *overrides):
    model, _, _ = load_base(model_dir)
    cfg = load_config(None, list(overrides))
    apply_lora(model, cfg)
    # A fresh LoRA has B = 0; start from a non-zero B so every weight moves from step 1.
    key = mx.random.key(11)
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            key, sub = mx.random.split(key)
            module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape, key=sub)
    model.train()
    return model, cfg


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
    seconds, label = fns.warm("finish", tokens, mx.array([129, 100, 7]), None, mx.array(0.5))
    assert label == "finish 3x128" and seconds > 0
    after = [(k, np.array(v)) for k, v in tree_flatten(model.trainable_parameters())] + \
            [(k, np.array(v)) for k, v in tree_flatten(optimizer.state)]
    assert [k for k, _ in before] == [k for k, _ in after]
    for (key, a), (_, b) in zip(before, after):
        assert np.array_equal(a, b), key
    assert fns.warm("finish", tokens, mx.array([129, 100, 7]), None, mx.array(0.5)) == (0.0, None)


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
    from daemon.model import grad_checkpointed, use_grad_checkpoint

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
    assert losses == plain_losses
    for key in plain:
        assert np.array_equal(weights[key], plain[key]), key
