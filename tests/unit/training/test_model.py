"""Tests for daemon.model on a tiny Llama: LoRA on the configured targets with the true
trainable count, a frozen base, deterministic init, and adapters that mlx-lm itself
loads back to the same logits."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from mathlora_daemon.config import load_config
from mathlora_daemon.errors import InputError
from mathlora_daemon.training.batches import Schedule, epoch_order, step_micro_batches
from mathlora_daemon.training.model import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_config,
    apply_lora,
    load_base,
    lora_keys,
    save_adapters,
    total_count,
    trainable_count,
)
from mathlora_daemon.training.step import make_optimizer, train_step

LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def lora_param_count(num_layers: int, rank: int, shapes: list[tuple[int, int]]) -> int:
    """LoRA on linears of shape (out, in) in every layer: A is in x r, B is r x out."""
    return num_layers * sum(rank * (d_in + d_out) for d_out, d_in in shapes)


def base_shape(model, layer: int, key: str) -> tuple[int, int]:
    module = model.layers[layer]
    for part in key.split("."):
        module = getattr(module, part)
    return tuple(module.weight.shape)


@pytest.fixture
def fresh(tiny_model_dir):
    """A freshly loaded tiny model (LoRA mutates it) and its tokenizer."""
    model, tokenizer, _ = load_base(tiny_model_dir)
    return model, tokenizer


def config(*overrides):
    return load_config(None, list(overrides))


# --- parameter counts -----------------------------------------------------------------

def test_formula_gives_design_count_for_7b():
    # The product design: rank 8 on q/v (both 4096 x 4096) of the 7B model's 30 layers.
    assert lora_param_count(30, 8, [(4096, 4096), (4096, 4096)]) == 3_932_160


@pytest.mark.parametrize("rank, targets", [
    (8, ["q_proj", "v_proj"]),
    (4, ["q_proj", "v_proj"]),
    (2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
])
def test_trainable_count_matches_formula(fresh, rank, targets):
    model, _ = fresh
    layers = len(model.layers)
    shapes = [base_shape(model, 0, "self_attn." + t if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                         else "mlp." + t) for t in targets]
    if "down_proj" in targets:
        assert base_shape(model, 0, "mlp.down_proj") == (32, 64)  # non-square shapes are covered
    keys = apply_lora(model, config(f"lora.rank={rank}", f"lora.targets={json.dumps(targets)}"))
    assert len(keys) == len(targets)
    assert trainable_count(model) == lora_param_count(layers, rank, shapes)


def test_default_trainable_count_on_tiny_model(fresh):
    model, _ = fresh
    hidden = model.args.hidden_size
    q_out = base_shape(model, 0, "self_attn.q_proj")[0]
    kv_out = base_shape(model, 0, "self_attn.v_proj")[0]
    before_total = total_count(model)
    apply_lora(model, config())
    expected = len(model.layers) * (8 * (hidden + q_out) + 8 * (hidden + kv_out))
    assert trainable_count(model) == expected == 2 * (8 * 64 + 8 * 64)
    assert before_total > 0
    assert total_count(model) == before_total  # the base's size, as mlx-lm reports it


def test_base_weights_are_frozen(fresh):
    model, _ = fresh
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    apply_lora(model, config())
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable
    assert all(k.endswith((".lora_a", ".lora_b")) for k in trainable), sorted(trainable)
    expected = {f"model.layers.{i}.self_attn.{t}.{ab}" for i in range(len(model.layers))
                for t in ("q_proj", "v_proj") for ab in ("lora_a", "lora_b")}
    assert set(trainable) == expected
    # The base weights are still there, unchanged, just not trainable.
    after = {k.replace(".linear.", "."): v for k, v in tree_flatten(model.parameters()) if "lora_" not in k}
    assert set(after) == set(before)
    assert all(np.array_equal(np.array(after[k]), before[k]) for k in before)


def test_lora_layers_use_scale_alpha_over_rank(fresh):
    model, _ = fresh
    apply_lora(model, config("lora.alpha=24", "lora.rank=4", "lora.dropout=0.1"))
    for layer in model.layers:
        for module in (layer.self_attn.q_proj, layer.self_attn.v_proj):
            assert isinstance(module, LoRALinear)
            assert module.scale == 6.0
            assert module.lora_a.shape[1] == 4
            assert module.dropout.__class__.__name__ == "Dropout"
        assert not isinstance(layer.self_attn.k_proj, LoRALinear)


def test_fresh_lora_does_not_change_the_output(fresh):
    model, _ = fresh
    inputs = mx.array([[0, 5, 17, 42, 9]])
    before = np.array(model(inputs))
    apply_lora(model, config())
    assert all(not np.any(np.array(v)) for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b"))
    assert np.array_equal(np.array(model(inputs)), before)


# --- targets ------------------------------------------------------------------------------

def test_unknown_target_lists_allowed_names(fresh):
    model, _ = fresh
    with pytest.raises(InputError) as info:
        apply_lora(model, config('lora.targets=["q_proj", "query", "w_pack"]'))
    msg = str(info.value)
    assert "lora.targets" in msg and "'query'" in msg and "'w_pack'" in msg
    assert f"allowed: {LINEARS}" in msg
    assert info.value.exit_code == 78
    # Refused before anything was changed: nothing frozen, nothing wrapped.
    assert trainable_count(model) == total_count(model)
    assert not isinstance(model.layers[0].self_attn.q_proj, LoRALinear)


def test_full_path_targets_and_duplicates_collapse(fresh):
    model, _ = fresh
    assert lora_keys(model, ["self_attn.q_proj", "v_proj"]) == ["self_attn.q_proj", "self_attn.v_proj"]
    assert lora_keys(model, ["q_proj", "self_attn.q_proj"]) == ["self_attn.q_proj"]
    assert lora_keys(model, ["gate_proj"]) == ["mlp.gate_proj"]
    with pytest.raises(InputError):
        lora_keys(model, ["self_attn"])  # a module, but not a linear layer


# --- determinism --------------------------------------------------------------------------

def lora_arrays(model) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def test_lora_init_is_deterministic_per_seed(tiny_model_dir):
    def init(seed):
        model, _, _ = load_base(tiny_model_dir)
        mx.random.seed(12345)  # whatever the global RNG held before must not matter
        mx.random.uniform(shape=(7,))
        apply_lora(model, config(f"train.seed={seed}"))
        return lora_arrays(model)

    a, b, c = init(0), init(0), init(1)
    assert a.keys() == b.keys() == c.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    lora_a = [k for k in a if k.endswith("lora_a")]
    assert any(np.any(a[k]) for k in lora_a)
    assert all(not np.array_equal(a[k], c[k]) for k in lora_a)


# --- saving -------------------------------------------------------------------------------

def train_a_little(model, tokenizer, make_token_cache, cfg, steps: int = 2):
    texts = ["Solve 2x = 10. x = 5.", "What is 7 * 6? It is 42.", "Compute 9 - 4 = 5."]
    cache = make_token_cache([tokenizer.encode(t) + [tokenizer.eos_token_id] for t in texts])
    schedule = Schedule(len(cache), 1, 2, 1)
    optimizer = make_optimizer(cfg.train.learning_rate)
    model.train()
    order = epoch_order(len(cache), cfg.train.seed, 0)
    for step in range(steps):
        train_step(model, optimizer, cache, step_micro_batches(schedule, order, step), cfg.train.seed, step)


def test_saved_adapters_load_in_mlx_lm_with_same_logits(tiny_model_dir, fresh, make_token_cache, tmp_path):
    from mlx_lm.utils import load

    model, tokenizer = fresh
    cfg = config("train.learning_rate=0.01", "lora.rank=4", "lora.alpha=8")
    keys = apply_lora(model, cfg)
    train_a_little(model, tokenizer, make_token_cache, cfg)
    trained = lora_arrays(model)
    assert all(np.any(v) for k, v in trained.items() if k.endswith("lora_b"))

    out = tmp_path / "adapters"
    path = save_adapters(model, out, adapter_config(cfg, len(model.layers), keys))
    assert path == out / ADAPTER_WEIGHTS
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert out.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in out.iterdir())

    saved = mx.load(str(path))
    assert set(saved) == set(trained)
    assert "model.layers.0.self_attn.q_proj.lora_a" in saved
    assert "model.layers.1.self_attn.v_proj.lora_b" in saved
    for key, value in trained.items():
        assert np.array_equal(np.array(saved[key]), value), key

    meta = json.loads((out / ADAPTER_CONFIG).read_text())
    assert meta["fine_tune_type"] == "lora"
    assert meta["num_layers"] == len(model.layers) == 2
    assert meta["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.0,
                                       "keys": ["self_attn.q_proj", "self_attn.v_proj"]}
    assert meta["lora_targets"] == ["q_proj", "v_proj"] and meta["lora_alpha"] == 8.0

    reloaded, _ = load(str(tiny_model_dir), adapter_path=str(out))
    model.eval()
    inputs = mx.array([tokenizer.encode("Solve 3x = 12. x = 4.")])
    ours, theirs = np.array(model(inputs)), np.array(reloaded(inputs))
    base, _, _ = load_base(tiny_model_dir)
    assert not np.allclose(np.array(base(inputs)), ours, atol=1e-4)  # the adapters do something
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)


def test_save_adapters_replaces_previous_files(fresh, tmp_path):
    model, _ = fresh
    cfg = config()
    keys = apply_lora(model, cfg)
    out = tmp_path / "adapters"
    save_adapters(model, out, adapter_config(cfg, len(model.layers), keys))
    first = (out / ADAPTER_WEIGHTS).read_bytes()
    layer = model.layers[0].self_attn.q_proj
    layer.lora_b = mx.ones_like(layer.lora_b)
    save_adapters(model, out, adapter_config(cfg, len(model.layers), keys))
    assert (out / ADAPTER_WEIGHTS).read_bytes() != first
    assert np.all(np.array(mx.load(str(out / ADAPTER_WEIGHTS))["model.layers.0.self_attn.q_proj.lora_b"]) == 1)
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]  # no temporary left


def test_load_base_refuses_a_directory_without_config(tmp_path):
    with pytest.raises(InputError) as info:
        load_base(tmp_path)
    assert str(tmp_path) in str(info.value) and "no config.json" in str(info.value)
    assert info.value.exit_code == 78
