"""Model helpers shared by the unit tests: LoRA whose B is not zero.

A fresh LoRA has B = 0, so its output equals the base model's and half its gradients
are zero at step 1: a test of losses, gradients or resumption that starts there could
not tell adapters that work from adapters that do nothing."""

from __future__ import annotations

ALL_PROJECTIONS = 'lora.targets=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]'


def live_lora(model, *overrides: str, seed: int = 11):
    """Given an mlx-lm model and `--set`-style config overrides, add the daemon's LoRA
    (training/model.py apply_lora) with every B drawn from N(0, 0.05^2) by `seed`, put
    the model in training mode and return (model, config)."""
    from mathlora_daemon.config import load_config
    from mathlora_daemon.training.model import apply_lora

    cfg = load_config(None, list(overrides))
    apply_lora(model, cfg)
    live_b(model, seed)
    model.train()
    return model, cfg


def live_b(model, seed: int) -> None:
    """Draw every LoRA B of `model` from N(0, 0.05^2) by `seed`."""
    import mlx.core as mx
    from mlx_lm.tuner.lora import LoRALinear

    key = mx.random.key(seed)
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            key, sub = mx.random.split(key)
            module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape, key=sub)
