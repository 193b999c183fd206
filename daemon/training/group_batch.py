"""GRPO's update batches: a group's G completions share one prompt, so its forward runs once.

A GRPO step trains on P prompts x G completions. Written as P*G whole sequences, every
prompt is run G times in the reference pass and G times forward and backward in the
update; with answer-only problems (a prompt of ~80 tokens, a completion of ~12) that is
most of the step. Here a micro-batch holds whole groups and runs in two parts through the
model's own layers:

1. the prompts, left-padded to one width (P, Lp); every layer's keys and values are kept
   (in `PrefixCache`, an mlx-lm cache stand-in, so the model's attention code is used
   unchanged);
2. the completions, right-padded, at positions Lp, Lp+1, ...: each attends to its
   prompt's keys and values (gathered from the prompt pass inside the graph, so gradients
   reach the prompt's positions as they do in the whole-sequence forward) and causally to
   its own tokens. They run in passes of similar length (`GroupBatch.chunks`): one
   completion that ran to `max_new_tokens` does not pad the other rows to its length.

Left padding shifts a prompt's positions, but RoPE attention depends only on the distance
between positions, and the mask hides the padding keys, so every completion token gets the
log-probability of the whole-sequence forward (float32: within rounding; a test compares
values and gradients). The head (vocabulary) runs only on the positions that predict a
completion token.

Architectures other than training/model.py's `CACHE_ATTENTION_TYPES` (whose attention takes
RoPE offsets and the mask from the cache exactly this way), and models without a separate
body and head, take the whole-sequence path: the same batch, the same result, more work.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

PAD_ID = 0  # any id: the mask hides padding


@dataclass
class GroupBatch:
    """One micro-batch of whole groups. Rows of `completions`, `mask` and `advantages` are
    group-major (prompt 0's G completions, then prompt 1's ...)."""

    prompts: list[list[int]]  # the P prompts' ids
    completions: list[list[int]]  # the P*G completions' ids (an EOS included when one ended it)
    advantages: np.ndarray  # (P*G,) float32
    group_size: int

    @property
    def completion_width(self) -> int:
        return max(1, max(len(c) for c in self.completions))

    @property
    def mask(self) -> mx.array:
        """(P*G, Lc) float32: 1 where a completion token is predicted."""
        width = self.completion_width
        return mx.array(np.array([[1.0] * len(c) + [0.0] * (width - len(c)) for c in self.completions],
                                 dtype=np.float32))

    def chunks(self) -> list[list[int]]:
        """The completion rows in passes of similar length (longest first; a pass takes rows
        down to half its widest), so a few long completions do not pad every other row."""
        out: list[list[int]] = []
        for i in sorted(range(len(self.completions)), key=lambda i: -len(self.completions[i])):
            if out and 2 * len(self.completions[i]) >= len(self.completions[out[-1][0]]):
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def positions(self, shared: bool) -> int:
        """Token positions one forward computes: the prompts once and the completions in
        their passes (shared), or every whole sequence padded to the widest."""
        if shared:
            return len(self.prompts) * max(len(p) for p in self.prompts) + sum(
                len(rows) * max(1, len(self.completions[rows[0]])) for rows in self.chunks())
        return len(self.completions) * max(len(self.prompts[i // self.group_size]) + len(c)
                                           for i, c in enumerate(self.completions))


def group_batches(prompts: list[list[int]], completions: list[list[int]], advantages: np.ndarray, group_size: int,
                  rows: int) -> list[GroupBatch]:
    """Given the step's P prompts, P*G completions (group-major), their advantages and the
    rows a micro-batch may hold (`train.batch_size`), return micro-batches of whole groups
    (at least one group each)."""
    per_batch = max(1, rows // group_size)
    out = []
    for first in range(0, len(prompts), per_batch):
        last = min(first + per_batch, len(prompts))
        rows_ = slice(first * group_size, last * group_size)
        out.append(GroupBatch(prompts=prompts[first:last], completions=completions[rows_],
                              advantages=np.asarray(advantages[rows_], dtype=np.float32), group_size=group_size))
    return out


class PrefixCache:
    """A per-layer stand-in for mlx-lm's KV cache during the passes. The first call (the
    prompts) keeps the keys and values; each later one (completions) gets its rows'
    prompts' (`rows`: a prompt index per completion row) before its own. `offset` is what
    RoPE reads: 0 for the prompts, Lp (their padded width) for the completions."""

    def __init__(self, prompt_padding: mx.array):
        self.padding = prompt_padding
        self.rows: mx.array | None = None
        self.offset = 0
        self.keys = self.values = None

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if self.keys is None:
            self.keys, self.values = keys, values
            self.offset = keys.shape[2]
            return keys, values
        return (mx.concatenate([self.keys[self.rows], keys], axis=2),
                mx.concatenate([self.values[self.rows], values], axis=2))

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        if window_size is not None:
            raise NotImplementedError("sliding-window attention: use the whole-sequence path")
        query = mx.arange(n)[:, None]
        if self.keys is None:  # the prompts: causal, padding hidden; a padding query sees itself (no empty row)
            key = mx.arange(n)[None, :]
            pad = self.padding[:, None, None, None]
            return ((key <= query) & (key >= pad)) | (key == query)
        width = self.offset
        key = mx.arange(width + n)[None, :]
        pad = self.padding[self.rows][:, None, None, None]
        return (key >= pad) & (key <= query + width)


def shares_prefix(model: nn.Module) -> bool:
    """Whether the model takes the shared-prompt path: a listed architecture, a separate
    head, and no gradient checkpointing (a recomputed layer must not keep keys aside)."""
    from mathlora_daemon.training.model import CACHE_ATTENTION_TYPES, body_and_head, grad_checkpointed

    return getattr(model, "model_type", None) in CACHE_ATTENTION_TYPES and body_and_head(model) is not None \
        and hasattr(model.model, "layers") and not grad_checkpointed(model)


def _select(logits: mx.array, targets: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - mx.logsumexp(logits, axis=-1)


def completion_logprobs(model: nn.Module, batch: GroupBatch, shared: bool | None = None) -> mx.array:
    """Log-probability of every completion token under the model: (P*G, Lc) float32, zero
    past each completion's end (see `batch.mask`). `shared` None: the shared-prompt path
    where the architecture allows it."""
    if shared is None:
        shared = shares_prefix(model)
    return _shared_logprobs(model, batch) if shared else _whole_logprobs(model, batch)


def _shared_logprobs(model: nn.Module, batch: GroupBatch) -> mx.array:
    from mathlora_daemon.training.model import body_and_head

    body, head = body_and_head(model)
    g, width, lc = batch.group_size, max(len(p) for p in batch.prompts), batch.completion_width
    padding = [width - len(p) for p in batch.prompts]
    prompts = mx.array([[PAD_ID] * pad + p for pad, p in zip(padding, batch.prompts)], dtype=mx.int32)
    cache = [PrefixCache(mx.array(padding, dtype=mx.int32)) for _ in body.layers]
    last_prompt = body(prompts, cache=cache)[:, -1, :]  # (P, H): predicts each completion's first token
    parts, order = [], []
    for rows in batch.chunks():
        w = max(1, len(batch.completions[rows[0]]))
        completions = mx.array([batch.completions[i] + [PAD_ID] * (w - len(batch.completions[i])) for i in rows],
                               dtype=mx.int32)
        prompt_of = mx.array([i // g for i in rows], dtype=mx.int32)
        hidden = last_prompt[prompt_of][:, None, :]
        if w > 1:
            for c in cache:
                c.rows = prompt_of
            hidden = mx.concatenate([hidden, body(completions[:, :-1], cache=cache)], axis=1)
        lp = _select(head(hidden), completions)
        parts.append(mx.pad(lp, [(0, 0), (0, lc - w)]) if w < lc else lp)
        order += rows
    inverse = mx.array(np.argsort(np.array(order)), dtype=mx.int32)
    return mx.concatenate(parts, axis=0)[inverse] * batch.mask


def _whole_inputs(batch: GroupBatch) -> tuple[mx.array, int, mx.array]:
    """The whole-sequence path's (tokens (rows, width), the first position whose logits are
    needed, index (rows, Lc): where each completion token's log-probability sits among
    the positions from there)."""
    g, lc = batch.group_size, batch.completion_width
    sequences = [batch.prompts[i // g] + c for i, c in enumerate(batch.completions)]
    width = max(len(s) for s in sequences)
    tokens = mx.array([s + [PAD_ID] * (width - len(s)) for s in sequences], dtype=mx.int32)
    # Completion token j of row i is predicted at position len(prompt) - 1 + j.
    start = min(len(p) for p in batch.prompts) - 1
    index = np.array([[min(len(batch.prompts[i // g]) - 1 + j, width - 2) - start for j in range(lc)]
                      for i in range(len(sequences))], dtype=np.int32)
    return tokens, start, mx.array(index)


def _whole_logprobs(model: nn.Module, batch: GroupBatch) -> mx.array:
    tokens, start, index = _whole_inputs(batch)
    from mathlora_daemon.training.model import body_and_head, grad_checkpointed

    split = body_and_head(model) if start > 0 or grad_checkpointed(model) else None
    if split is None:
        lp = _select(model(tokens[:, :-1])[:, start:], tokens[:, start + 1:])
    else:  # the prompts' positions get no logits (a vocabulary each)
        body, head = split
        lp = _head_logprobs(head, body(tokens[:, :-1])[:, start:], tokens[:, start + 1:], grad_checkpointed(model))
    return mx.take_along_axis(lp, index, axis=1) * batch.mask


def _head_slices(positions: int, rows: int) -> list[tuple[int, int]]:
    from mathlora_daemon.training.step import HEAD_CHUNK_ROWS

    width = max(1, HEAD_CHUNK_ROWS // max(rows, 1))
    return [(s, min(s + width, positions)) for s in range(0, positions, width)]


def head_apart(model: nn.Module) -> bool:
    """Whether `whole_value_and_grad` applies: gradient checkpointing on, a separate head
    without trainable parameters, and no active dropout (its masks would differ between
    the two forward passes)."""
    from mlx.utils import tree_flatten

    from mathlora_daemon.training.model import body_and_head, grad_checkpointed

    split = body_and_head(model) if grad_checkpointed(model) else None
    head_module = getattr(split[1], "__self__", split[1]) if split else None  # tied: the embedding's as_linear
    if split is None or tree_flatten(head_module.trainable_parameters()):
        return False
    return not (model.training and any(isinstance(m, nn.Dropout) and getattr(m, "_p_1", 1.0) < 1.0
                                       for _, m in model.named_modules()))


def _sliced_head(body, head, inputs: mx.array, targets: mx.array, start: int):
    """(the body's output from `start` on, without gradients; the targets' log-probabilities
    made a slice of positions at a time, each evaluated before the next; the slices)."""
    hidden = mx.stop_gradient(body(inputs)[:, start:])
    mx.eval(hidden)
    slices = _head_slices(hidden.shape[1], hidden.shape[0])
    parts = []
    for a, b in slices:
        parts.append(_select(head(hidden[:, a:b]), targets[:, a:b]))
        mx.eval(parts[-1])
    return hidden, parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1), slices


def evaluated_logprobs(model: nn.Module, batch: GroupBatch, shared: bool | None = None) -> mx.array:
    """completion_logprobs without gradients, evaluated (the reference policy's and the
    rollouts' own): where the head stands apart (head_apart), a slice of logits at a
    time, so they never all exist at once."""
    if shared is None:
        shared = shares_prefix(model)
    if shared or not head_apart(model):
        lp = mx.stop_gradient(completion_logprobs(model, batch, shared))
    else:
        from mathlora_daemon.training.model import body_and_head

        body, head = body_and_head(model)
        tokens, start, index = _whole_inputs(batch)
        _, lp_all, _ = _sliced_head(body, head, tokens[:, :-1], tokens[:, start + 1:], start)
        lp = mx.take_along_axis(lp_all, index, axis=1) * batch.mask
    mx.eval(lp)
    return lp


def whole_value_and_grad(model: nn.Module, batch: GroupBatch, objective):
    """The GRPO loss and its gradients for the whole-sequence path with the head kept out
    of the autograd graph (gradient checkpointing; see head_apart), for a 7B model's
    completions: 8 of 512 tokens make 1.7 GB of float32 logits, which MLX keeps through
    a differentiated head even in checkpointed slices. In three passes:

    1. the body's output, without gradients;
    2. the head a slice of positions at a time, each evaluated before the next: the
       log-probabilities, then (after the objective's gradient with respect to them) each
       slice's gradient with respect to the body's output (a vector-Jacobian product);
    3. the body again under mx.vjp with that gradient: the trainable parameters' gradients.

    `objective(lp)` takes the completions' log-probabilities (rows, Lc) and returns (loss,
    aux). Return ((loss, aux), gradients) as nn.value_and_grad(model, ...) does: the same
    values, an extra forward of the body, no logits beyond one slice."""
    from mlx.utils import tree_flatten, tree_unflatten

    from mathlora_daemon.training.model import body_and_head

    body, head = body_and_head(model)
    tokens, start, index = _whole_inputs(batch)
    inputs, targets = tokens[:, :-1], tokens[:, start + 1:]
    hidden, lp_all, slices = _sliced_head(body, head, inputs, targets, start)

    def on_logprobs(lp_all):
        return objective(mx.take_along_axis(lp_all, index, axis=1) * batch.mask)

    (loss, aux), d_lp = mx.value_and_grad(on_logprobs)(lp_all)
    mx.eval(loss, aux, d_lp)
    d_hidden = []
    for a, b in slices:
        _, (d,) = mx.vjp(lambda h, t=targets[:, a:b]: _select(head(h), t), [hidden[:, a:b]], [d_lp[:, a:b]])
        mx.eval(d)
        d_hidden.append(d)
    d_hidden = d_hidden[0] if len(d_hidden) == 1 else mx.concatenate(d_hidden, axis=1)
    del hidden

    names, arrays = zip(*tree_flatten(model.trainable_parameters()))

    def forward(*params):
        model.update(tree_unflatten(list(zip(names, params))))
        return body(inputs)[:, start:]

    _, grads = mx.vjp(forward, list(arrays), [d_hidden])
    return (loss, aux), tree_unflatten(list(zip(names, grads)))


def _head_logprobs(head, hidden: mx.array, targets: mx.array, sliced: bool) -> mx.array:
    """The targets' log-probabilities from the body's output. `sliced` (gradient
    checkpointing): a slice of about HEAD_CHUNK_ROWS positions at a time inside
    mx.checkpoint, as the SFT step's head (training/step.py), so the backward recomputes
    each slice's float32 logits instead of keeping them all (8 completions of 512 tokens
    over a 102,400-token vocabulary: 1.7 GB each copy), though MLX still holds most of them
    at the peak: whole_value_and_grad is the path that does not (this one serves where it
    cannot: active dropout, a trained head). The values are the same."""
    if not sliced:
        return _select(head(hidden), targets)

    def piece(t):  # the targets are closed over: the checkpoint differentiates only its input
        return mx.checkpoint(lambda h: _select(head(h), t))

    parts = [piece(targets[:, a:b])(hidden[:, a:b]) for a, b in _head_slices(hidden.shape[1], hidden.shape[0])]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
