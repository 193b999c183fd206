"""Validation loss: how well the model predicts solutions it never trained on.

The validation split (data.validation_fraction or data.validation_name, kept apart by
`prepare`) is measured on a fixed subset, its first `train.eval_sequences` sequences,
with the same masking as training (train.mask_prompt): a forward pass only, batched
like training. The Checkpointer measures it at every checkpoint (the time counts
against the budget, like the checkpoint itself), once for the base model before the
first step, and keeps the lowest: retention keeps that checkpoint, and at the end the
adapters are the best (train.select = "best").
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mathlora_daemon.training.cache import TokenCache


@dataclass
class Validator:
    model: object
    validation: TokenCache
    sequences: int
    batch_size: int
    mask_prompt: bool

    @classmethod
    def of(cls, model, train_cache: TokenCache, train_cfg) -> "Validator | None":
        """The run's validator, or None without validation data or with eval_sequences 0."""
        val = train_cache.validation
        if val is None or not len(val) or train_cfg.eval_sequences <= 0:
            return None
        return cls(model, val, min(train_cfg.eval_sequences, len(val)), max(train_cfg.batch_size, 8),
                   train_cfg.mask_prompt)

    def __call__(self) -> dict:
        """Measure now: {loss, tokens, sequences, seconds}."""
        from mathlora_daemon.training.step import evaluate_loss

        started = time.monotonic()
        loss, tokens = evaluate_loss(self.model, self.validation, range(self.sequences), self.batch_size,
                                     mask_prompt=self.mask_prompt)
        return {"loss": loss, "tokens": tokens, "sequences": self.sequences,
                "seconds": round(time.monotonic() - started, 3)}
