"""One optimizer step: masked cross-entropy, gradient accumulation, Adam.

Kept free of logging, files and timing so the daemon loop, the benchmarks and the tests
all drive the very same step.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from daemon import testhooks
from daemon.batches import pad_batch, step_seed
from daemon.cache import TokenCache


def masked_loss(model: nn.Module, tokens: mx.array, lengths: mx.array) -> tuple[mx.array, mx.array]:
    """Given a model, right-padded tokens [B, L] and their lengths [B], return (mean
    next-token cross-entropy over real tokens, number of those tokens)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs)
    mask = mx.arange(targets.shape[1])[None, :] < (lengths[:, None] - 1)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets) * mask
    ntoks = mask.sum()
    return ce.sum() / ntoks, ntoks


def make_optimizer(learning_rate: float) -> optim.Optimizer:
    return optim.Adam(learning_rate=learning_rate)


@dataclass
class StepResult:
    loss: float
    tokens: int


def train_step(model: nn.Module, optimizer: optim.Optimizer, cache: TokenCache, micro_batches: list[np.ndarray],
               seed: int, global_step: int, loss_and_grad=None, pad_id: int = 0,
               should_abort=None) -> StepResult | None:
    """Given the model, optimizer, token cache and one step's micro-batches (index
    arrays), apply one optimizer update with the mean of the micro-batch gradients and
    return the step's mean loss and its number of target tokens.

    Return None without touching model or optimizer when `should_abort()` turns true
    between two micro-batches: the state stays at the last step boundary, where it can
    be checkpointed at once (a 7B step can take a minute; launchd waits 60 s at most).
    """
    mx.random.seed(step_seed(seed, global_step))
    loss_and_grad = loss_and_grad or nn.value_and_grad(model, masked_loss)
    grads, losses, ntoks = None, [], []
    for i, indices in enumerate(micro_batches):
        if i and should_abort is not None and should_abort():
            return None
        tokens, lengths = pad_batch([cache.sequence(int(i)) for i in indices], pad_id)
        (loss, n), g = loss_and_grad(model, mx.array(tokens), mx.array(lengths))
        grads = g if grads is None else tree_map(mx.add, grads, g)
        losses.append(loss)
        ntoks.append(n)
        mx.eval(grads, losses, ntoks)  # bounds memory to one micro-batch's graph
        testhooks.hold_point("micro", global_step + 1)
    scale = 1.0 / len(micro_batches)
    grads = tree_map(lambda g: g * scale, grads)
    optimizer.update(model, grads)
    step_loss = mx.mean(mx.stack(losses))
    step_tokens = mx.sum(mx.stack(ntoks))
    mx.eval(model.trainable_parameters(), optimizer.state, step_loss, step_tokens)
    return StepResult(loss=step_loss.item(), tokens=int(step_tokens.item()))
