"""The model: load an MLX model directory through mlx-lm, add LoRA, save adapters.

Adapters are written in mlx-lm's own format (`adapters.safetensors` with mlx-lm's key
names + `adapter_config.json` with `fine_tune_type`, `num_layers`, `lora_parameters`),
so `mlx_lm.generate --adapter-path` and `mlx_lm.utils.load(adapter_path=...)` use them
unchanged.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mathlora_checkpoints.fsio import atomic_write_text, atomic_write_via, ensure_private_dir
from mathlora_daemon.config import Config
from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def load_base(model_dir: Path):
    """Given an MLX model directory (config.json, *.safetensors, tokenizer files), return
    (model, tokenizer wrapper, model config dict); raise InputError when it is missing or
    not loadable by mlx-lm (modelio/loading.py names the bad file)."""
    from mathlora_daemon.modelio.loading import load_model

    return load_model(model_dir, return_config=True)


def lora_keys(model: nn.Module, targets: list[str]) -> list[str]:
    """Given a model and target module names ("q_proj" or "self_attn.q_proj"), return
    the matching module paths inside a layer; raise InputError for a target that matches
    no linear layer, listing the names that exist."""
    linear_types = (nn.Linear, nn.QuantizedLinear)
    names = [name for name, mod in model.layers[0].named_modules() if isinstance(mod, linear_types)]
    keys, missing = [], []
    for target in targets:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        keys.extend(h for h in hits if h not in keys)
        if not hits:
            missing.append(target)
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise InputError(f"lora.targets: {missing} match no linear layer of this model; allowed: {leaves}")
    return keys


def lora_parameters(cfg: Config, keys: list[str]) -> dict:
    return {"rank": cfg.lora.rank, "scale": cfg.lora_scale, "dropout": cfg.lora.dropout, "keys": keys}


def apply_lora(model: nn.Module, cfg: Config) -> list[str]:
    """Given a loaded model and the config, freeze the base, wrap the `targets` of every
    layer with LoRA (scale = alpha / rank, the configured dropout) and return the keys.

    The LoRA A matrices are initialised from `train.seed`, so two runs start equal.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    keys = lora_keys(model, cfg.lora.targets)
    model.freeze()
    mx.random.seed(cfg.train.seed)
    linear_to_lora_layers(model, len(model.layers), lora_parameters(cfg, keys))
    return keys


# Models whose forward is exactly `head(model.model(inputs))` (mlx-lm's Llama family), so
# the loss can run the output projection itself, a slice of positions at a time.
SPLIT_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Models whose attention takes its RoPE offset, keys/values and mask from the cache object
# it is given (mlx-lm's Llama family): a stand-in cache can hand them a packed row's
# block-diagonal mask (training/packing.py) or a group's shared prompt (training/group_batch.py).
CACHE_ATTENTION_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_CHECKPOINTED_CLASSES: dict[type, type] = {}


def body_and_head(model: nn.Module):
    """Given a loaded mlx-lm model, return (body, head) where `head(body(inputs))` equals
    `model(inputs)`: body gives the final hidden states, head the logits. Return None for
    an architecture whose forward does more (logit soft-capping, scaling ...)."""
    if getattr(model, "model_type", None) not in SPLIT_HEAD_TYPES or not hasattr(model, "model"):
        return None
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
    if tied:
        return model.model, model.model.embed_tokens.as_linear
    return (model.model, model.lm_head) if "lm_head" in model else None


def _checkpointed_class(cls: type) -> type:
    """A subclass of a transformer-layer class whose call recomputes its activations in
    the backward pass (mx.checkpoint) instead of keeping them; as mlx-lm's
    `grad_checkpoint`, but per instance, so other models in the process are untouched."""
    if cls not in _CHECKPOINTED_CLASSES:
        forward = cls.__call__

        def __call__(self, *args, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return forward(self, *args, **kwargs)
            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        _CHECKPOINTED_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (cls,),
                                          {"__call__": __call__, "grad_checkpointed": True})
    return _CHECKPOINTED_CLASSES[cls]


def use_grad_checkpoint(model: nn.Module) -> int:
    """Given a model, make each transformer layer recompute its activations in the
    backward pass (memory for about a third more compute) and return how many layers
    changed. Parameters, adapters and the mathematics are unchanged."""
    changed = 0
    for layer in model.layers:
        if not getattr(layer, "grad_checkpointed", False):
            layer.__class__ = _checkpointed_class(type(layer))
            changed += 1
    return changed


def grad_checkpointed(model: nn.Module) -> bool:
    """Whether use_grad_checkpoint was applied to this model."""
    return bool(model.layers) and getattr(model.layers[0], "grad_checkpointed", False)


def trainable_count(model: nn.Module) -> int:
    """Given a model, return the number of trainable parameters."""
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def total_count(model: nn.Module) -> int:
    """Given a model, return its parameter count (quantized weights counted unpacked)."""
    from mlx_lm.utils import get_total_parameters

    return get_total_parameters(model)


def adapter_config(cfg: Config, num_layers: int, keys: list[str], prompt_format: dict | None = None,
                   selected: dict | None = None) -> dict:
    """Given the config, return mlx-lm's adapter_config.json content plus provenance: the
    prompt format the adapters were trained in (so every tool prompts the same way) and,
    when chosen by validation loss, which checkpoint they are."""
    config = {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": lora_parameters(cfg, keys),
        "model": cfg.model.name,
        "lora_alpha": cfg.lora.alpha,
        "lora_targets": cfg.lora.targets,
        "trained_by": "mathlora-daemon",
    }
    if prompt_format:
        config["prompt_format"] = prompt_format
    if selected:
        config["selected"] = selected
    return config


@contextmanager
def adapters_off(model: nn.Module):
    """While active, every LoRA layer adds nothing (its B is zero), so the model computes
    exactly the base model; the adapters are put back on exit."""
    from mlx_lm.tuner.lora import LoRALinear

    layers = [m for _, m in model.named_modules() if isinstance(m, LoRALinear)]
    saved = [m.lora_b for m in layers]
    try:
        for m in layers:
            m.lora_b = mx.zeros_like(m.lora_b)
        yield model
    finally:
        for m, b in zip(layers, saved):
            m.lora_b = b


@contextmanager
def adapters_as(model: nn.Module, weights: dict):
    """While active, the LoRA layers hold `weights` (e.g. GRPO's reference: the adapters
    it started from); the current adapters are put back on exit. Adapters only: no second
    model in memory."""
    from mlx.utils import tree_flatten

    current = list(tree_flatten(model.trainable_parameters()))
    model.load_weights(list(weights.items()), strict=False)
    try:
        yield model
    finally:
        model.load_weights(current, strict=False)


def save_safetensors_durable(path: Path, arrays: dict) -> None:
    """Given a target path ending in .safetensors and MLX arrays, replace the file
    atomically and durably (temporary sibling, fsync, rename, fsync the directory)."""
    atomic_write_via(path, lambda tmp: mx.save_safetensors(str(tmp), arrays, metadata={"format": "mlx"}))


def save_adapters(model: nn.Module, out_dir: Path, config: dict) -> Path:
    """Given a LoRA model, an output directory and its adapter config, write
    adapters.safetensors and adapter_config.json there (each atomically) and return the
    weights path. A kill mid-write leaves a `.tmp-<pid>-...` file there, which the next
    start removes (fsio.remove_dead_temporaries)."""
    ensure_private_dir(out_dir)
    # Sorted as checkpoints store them (checkpointing._safetensors_bytes): the adapters of
    # a step are then the same bytes here and in its checkpoint.
    weights = dict(sorted(tree_flatten(model.trainable_parameters())))
    save_safetensors_durable(out_dir / ADAPTER_WEIGHTS, weights)
    atomic_write_text(out_dir / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir / ADAPTER_WEIGHTS
