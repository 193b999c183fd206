"""One optimizer step: masked cross-entropy, gradient accumulation, Adam.

Kept free of logging, files and timing so the daemon loop, the benchmarks and the tests
all drive the very same step.

Two paths compute the same step:

- compiled (the default): the micro-batch's loss and gradient, the accumulation and the
  Adam update are traced once by `mx.compile` with the model, optimizer and RNG state as
  captured state (MLX's "Compiling training graphs" pattern, as mlx-lm's own trainer
  does), then replayed as fused kernels. Lengths are padded up to a multiple of
  `PAD_MULTIPLE` so the shapes repeat and the trace is reused; padded positions are
  masked out of the loss, so the mathematics is unchanged (only float summation order
  may differ). Compiled code is deterministic run to run, and an interrupted run and
  an uninterrupted one replay the very same compiled function, so resumes stay
  bit-exact.
- eager (`compile=False`, or MATHLORA_COMPILE=0 in the environment): the original
  uncompiled step, kept for comparison (bench/train_bench.py) and as an escape hatch.

Data-parallel (a World of several ranks, daemon/distributed.py): each rank computes its
share of the step's micro-batches, each share's loss divided by its whole micro-batch's
token count; the summed gradients are added across ranks with all_sum inside the
compiled update, so every rank applies the same update a single process would.

Dropout is seeded per micro-batch from (seed, step, micro-batch index), so a micro-batch
draws the same mask whichever rank computes it.

Either way there is one host sync per micro-batch (`mx.eval`, which bounds memory to
one micro-batch's graph) and one `.item()` per optimizer step (the logged loss).

Opt-in (MATHLORA_DEQUANT_MATMUL=1): the compiled step runs 4-bit base layers as
dequantize + dense matmul (DequantizedMatmulLinear), faster for training-length inputs
on CUDA at the price of memory; see `dequant_default`.
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mathlora_checkpoints.fsio import ensure_private_dir
from mathlora_daemon import testhooks
from mathlora_daemon.runtime.world import SINGLE, World
from mathlora_daemon.training.batches import PAD_MULTIPLE, bucket_length, pad_batch, step_seed
from mathlora_daemon.training.cache import TokenCache
from mathlora_daemon.training.distributed import shard_step, sum_tree
from mathlora_daemon.training.model import body_and_head, grad_checkpointed
from mathlora_daemon.training.packing import PackedRows, SegmentMask, packed_targets, segment_mask

COMPILE_ENV = "MATHLORA_COMPILE"  # "0" turns the compiled step off (eager path)
DEQUANT_ENV = "MATHLORA_DEQUANT_MATMUL"  # "1": 4-bit base layers as dequantize + matmul (opt-in)


HEAD_CHUNK_ROWS = 512  # grad_checkpoint: logits are made for about this many positions (batch x length) at a time


def token_losses(logits: mx.array, targets: mx.array) -> mx.array:
    """Given logits [..., vocab] in the model's dtype and targets [...], return each
    position's cross-entropy in float32, accumulated in float32.

    On a GPU (Metal, CUDA) MLX's fused kernel reads bf16/fp16 logits and accumulates in
    float32 itself, so no float32 copy of the logits is made (B x T x vocab x 4 bytes: 3.4
    GB at batch 8 for DeepSeek's 102400 tokens, and as much again for its gradient). The
    CPU's fallback reduces in the logits' dtype, so there they are upcast first."""
    if mx.default_device() != mx.gpu:
        logits = logits.astype(mx.float32)
    return mx.fast.cross_entropy(logits, targets)


def _position_losses(model: nn.Module, inputs: mx.array, targets: mx.array,
                     segments: mx.array | None = None) -> mx.array:
    """Given a model, its inputs [B, T] and next-token targets [B, T], return the float32
    cross-entropy at every position [B, T]. With `segments` [B, T] (packed rows,
    training/packing.py) attention stays within each position's segment.

    Normally the logits [B, T, vocab] are made at once. With gradient checkpointing
    (model.use_grad_checkpoint) and a model whose head can be split off, they are made a
    slice of positions at a time inside mx.checkpoint, so the backward pass recomputes
    each slice instead of keeping them all (B x T x vocab: 210 MB in bf16 for a 7B
    model's 102400-token vocabulary at T=1024, batch 1, plus their gradient). Every
    position's cross-entropy is computed exactly as before; only what stays in memory
    changes."""
    cache = None
    if segments is not None:
        cache = [SegmentMask(segment_mask(segments))] * len(model.layers)
    split = body_and_head(model) if grad_checkpointed(model) else None
    if split is None:
        return token_losses(model(inputs, cache=cache), targets)
    body, head = split
    hidden = body(inputs, cache=cache)
    width = max(PAD_MULTIPLE, HEAD_CHUNK_ROWS // max(inputs.shape[0], 1) // PAD_MULTIPLE * PAD_MULTIPLE)

    def piece(t):  # the targets are closed over: the checkpoint differentiates only its input
        return mx.checkpoint(lambda h: token_losses(head(h), t))

    parts = [piece(targets[:, s:s + width])(hidden[:, s:s + width]) for s in range(0, inputs.shape[1], width)]
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)


def target_mask(tokens: mx.array, lengths: mx.array, starts: mx.array | None) -> mx.array:
    """Which next-token targets are trained [B, L - 1]: real tokens (not padding) and,
    with `starts` (each sequence's prompt length), only those after the prompt."""
    positions = mx.arange(tokens.shape[1] - 1)[None, :]
    mask = positions < (lengths[:, None] - 1)
    if starts is not None:  # the target at position p is token p + 1: trained from the prompt's end on
        mask = mx.logical_and(mask, positions >= (starts[:, None] - 1))
    return mask


def _masked_sum(model: nn.Module, tokens: mx.array, lengths: mx.array,
                starts: mx.array | None) -> tuple[mx.array, mx.array]:
    """(summed cross-entropy over the trained targets, their count) for right-padded
    tokens; a packed micro-batch (`lengths` [B, L]: segment ids, `starts` [B, L]:
    trained-token flags, training/packing.py) keeps every sequence to itself."""
    if lengths.ndim == 2:
        mask = packed_targets(lengths, starts)
        return (_position_losses(model, tokens[:, :-1], tokens[:, 1:], lengths[:, :-1]) * mask).sum(), mask.sum()
    mask = target_mask(tokens, lengths, starts)
    return (_position_losses(model, tokens[:, :-1], tokens[:, 1:]) * mask).sum(), mask.sum()


def masked_loss(model: nn.Module, tokens: mx.array, lengths: mx.array,
                starts: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """Given a model, right-padded tokens [B, L], their lengths [B] and optionally their
    prompt lengths [B] (train.mask_prompt), return (mean next-token cross-entropy over the
    trained tokens, number of those tokens). A packed micro-batch passes segment ids and
    trained-token flags [B, L] in place of lengths and prompt lengths."""
    total, ntoks = _masked_sum(model, tokens, lengths, starts)
    return total / ntoks, ntoks


def share_loss(model: nn.Module, tokens: mx.array, lengths: mx.array, starts: mx.array | None,
               denominator: mx.array) -> tuple[mx.array, mx.array]:
    """Like masked_loss, but the summed cross-entropy is divided by `denominator`: the
    target-token count of the whole micro-batch this share is part of, so the shares of
    all ranks add up to the micro-batch's mean loss."""
    total, ntoks = _masked_sum(model, tokens, lengths, starts)
    return total / denominator, ntoks


def make_optimizer(learning_rate: float, weight_decay: float = 0.0) -> optim.Optimizer:
    """AdamW (decoupled weight decay; with 0 it computes exactly Adam's update). The loop
    sets the learning rate of every step from the schedule (training/lr.py)."""
    return optim.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)


def _update(optimizer: optim.Optimizer, model: nn.Module, grads, lr, max_grad_norm: float):
    """Clip the gradients to `max_grad_norm` (0: not clipped), apply the optimizer at
    learning rate `lr` (None: the optimizer's own); return the gradients' global norm."""
    if max_grad_norm > 0:
        grads, norm = optim.clip_grad_norm(grads, max_grad_norm)
    else:
        norm = mx.sqrt(sum(mx.sum(g.astype(mx.float32) ** 2) for _, g in tree_flatten(grads)))
    if lr is not None:
        optimizer.learning_rate = lr
    optimizer.update(model, grads)
    return norm


@dataclass
class StepResult:
    """One optimizer step: its mean loss and target tokens, the model positions computed
    (padding included), and the compiled traces it had to build first (see CompiledStep.warm)."""

    loss: float
    tokens: int
    positions: int = 0
    compile_s: float = 0.0
    traces: list = field(default_factory=list)  # "accumulate 8x1024" ... for each trace built in this step
    grad_norm: float | None = None  # the gradients' global norm before clipping

    @property
    def padding_share(self) -> float:
        """The share of computed model positions that were padding."""
        return 1.0 - self.tokens / self.positions if self.positions else 0.0


def use_kernel_cache(folder: Path) -> Path | None:
    """On CUDA, keep the kernels MLX compiles on first use (minutes for a 4-bit model) in
    `folder` (the run directory's cache/mlx-kernels), so that a restart, even after a
    reboot, loads them instead of compiling again; return the folder used, or None (not
    CUDA, or MLX_PTX_CACHE_DIR set by the user). Per MLX version and GPU: a kernel is
    never loaded by another MLX or for another chip. Call before MLX compiles anything."""
    import re

    if "MLX_PTX_CACHE_DIR" in os.environ or not mx.cuda.is_available():
        return None
    gpu = re.sub(r"[^A-Za-z0-9.]+", "-", str(mx.device_info().get("device_name") or "gpu")).strip("-")
    path = Path(folder) / f"mlx-{mx.__version__}-{gpu}"
    ensure_private_dir(path)
    os.environ["MLX_PTX_CACHE_DIR"] = str(path)
    return path


def compile_default() -> bool:
    """Whether train_step compiles when not told: yes, unless MATHLORA_COMPILE=0."""
    return os.environ.get(COMPILE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


# --- 4-bit (QLoRA) base layers: dequantize + matmul for long inputs ---------------------

DEQUANT_MIN_ROWS = 256  # inputs with fewer rows (decoding) keep MLX's quantized matmul
_DEQUANT_MATMULS: dict = {}


def _dequant_matmul(group_size: int, bits: int, mode: str):
    """x @ dequantize(w).T whose backward recomputes the dequantized weight instead of
    keeping it from the forward pass (it would hold a bf16 copy of every weight)."""
    key = (group_size, bits, mode)
    if key not in _DEQUANT_MATMULS:
        def weight(w, scales, biases):
            return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)

        @mx.custom_function
        def matmul(x, w, scales, biases):
            return x @ weight(w, scales, biases).T

        @matmul.vjp
        def matmul_vjp(primals, cotangent, output):
            x, w, scales, biases = primals
            # Made to depend on the cotangent, the backward's dequantization is neither
            # merged with the forward's by compile (which would keep every layer's dense
            # weight alive until the backward pass) nor run before it is needed.
            w, scales, biases = mx.depends([w, scales, biases], [cotangent])
            # The base is frozen: only dx is used; the zeros are never evaluated.
            return cotangent @ weight(w, scales, biases), mx.zeros_like(w), mx.zeros_like(scales), \
                mx.zeros_like(biases)

        _DEQUANT_MATMULS[key] = matmul
    return _DEQUANT_MATMULS[key]


class DequantizedMatmulLinear(nn.QuantizedLinear):
    """A QuantizedLinear (same parameters, same saved files) whose forward, for inputs
    of many rows, dequantizes the weight and runs a dense matmul: on an H100 a dense
    GEMM ran 4-5x faster than MLX's quantized matmul for 1k-8k rows (the quantized
    kernels are built for decoding a few tokens). The weights stay 4-bit; the dense
    copy is transient, recomputed for the backward pass, though MLX still kept 6-10 GB
    more at peak for a 7B model than the quantized matmul did."""

    def __call__(self, x):
        if (x.size // max(x.shape[-1], 1) < DEQUANT_MIN_ROWS or getattr(self, "mode", "affine") != "affine"
                or "biases" not in self):
            return super().__call__(x)
        y = _dequant_matmul(self.group_size, self.bits, "affine")(x, self["weight"], self["scales"],
                                                                   self["biases"])
        return y + self["bias"] if "bias" in self else y


def use_dequantized_matmul(model: nn.Module) -> int:
    """Given a model, switch its QuantizedLinear layers (LoRA-wrapped ones included) to
    DequantizedMatmulLinear in place and return how many were switched; the parameters,
    trainable set and adapter files do not change."""
    switched = 0
    for _, module in model.named_modules():
        if type(module) is nn.QuantizedLinear:
            module.__class__ = DequantizedMatmulLinear
            switched += 1
    return switched


def dequant_default() -> bool:
    """Whether the compiled step runs 4-bit base layers as dequantize + dense matmul
    (DequantizedMatmulLinear): only when MATHLORA_DEQUANT_MATMUL=1. On an H100 it made
    QLoRA training 1.9-2.7x faster than MLX's quantized matmul but raised peak memory
    by 6-10 GB (bench/README.md), and 4-bit is chosen for memory; Apple GPUs were not
    measured."""
    return os.environ.get(DEQUANT_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


class CompiledStep:
    """The compiled pieces of one (model, optimizer) pair.

    `accumulate(tokens, lengths, acc)` returns (loss, ntoks, acc + grads) for one
    micro-batch; `finish(tokens, lengths, acc, scale)` does the same for the last
    micro-batch of a step, scales the summed gradients and applies Adam, returning
    (loss, ntoks). Both read and write the model's and the RNG's state (dropout), and
    `finish` the optimizer's, as captured compile state.

    The closures hold the optimizer weakly: train_step keeps one CompiledStep per live
    optimizer (a weak-keyed table), and a strong reference from the compiled function
    back to its key would keep both alive for ever.

    With a distributed World it also has `share(tokens, lengths, denominator, acc)`
    (accumulate one share) and `reduce_update(acc, loss_sum, ntoks, scale)` (add the
    gradient sums across ranks, scale, apply Adam; return the step's global loss sum and
    token count).

    Tracing and kernel compilation happen the first time a function meets new input
    shapes, and on a GPU that can take minutes (CUDA kernels are compiled on first use).
    `warm` does that work in a dry run before the real call and puts the adapters and
    the optimizer state back exactly (the RNG needs nothing: it is seeded before every
    micro-batch), so the time is measured apart (the loop keeps it out of the training
    budget, as it does loading) and the step itself is unchanged.
    """

    def __init__(self, model: nn.Module, optimizer: optim.Optimizer, world: World = SINGLE,
                 max_grad_norm: float = 0.0):
        # The optimizer state must exist before tracing: captured state is read at call
        # time, and a lazily created state would only appear after the first trace.
        # init() fills only what is missing, so restored state is kept as it is.
        optimizer.init(model.trainable_parameters())
        # Same parameters either way; a fresh and a resumed run take the same path.
        self.dequantized = use_dequantized_matmul(model) if dequant_default() else 0
        self.model_ref = weakref.ref(model)
        self.opt_ref = weakref.ref(optimizer)
        self.opt_state = optimizer.state
        self.rng_state = mx.random.state
        self.traced: set = set()
        # Where each adapter array lives, found once: walking the model for its trainable
        # parameters costs ~0.7 ms a step for 30 layers, more than a small model's step can spare.
        self.slots = [_parent(model, path) for path, _ in tree_flatten(model.trainable_parameters())]
        self.max_grad_norm = max_grad_norm
        loss_and_grad = nn.value_and_grad(model, masked_loss)

        def micro(tokens, lengths, starts, acc):
            (loss, ntoks), grads = loss_and_grad(model, tokens, lengths, starts)
            if acc is not None:
                grads = tree_map(mx.add, acc, grads)
            return loss, ntoks, grads

        grad_state = [model.state, mx.random.state]
        full_state = [model.state, optimizer.state, mx.random.state]
        opt_ref = self.opt_ref

        @partial(mx.compile, inputs=grad_state, outputs=grad_state)
        def accumulate(tokens, lengths, starts, acc):
            return micro(tokens, lengths, starts, acc)

        @partial(mx.compile, inputs=full_state, outputs=full_state)
        def finish(tokens, lengths, starts, acc, scale, lr):
            loss, ntoks, grads = micro(tokens, lengths, starts, acc)
            grads = tree_map(lambda g: g * scale, grads)
            norm = _update(opt_ref(), model, grads, lr, max_grad_norm)
            return loss, ntoks, norm

        self.accumulate = accumulate
        self.finish = finish
        self.world = world
        if world.distributed:
            self.share, self.reduce_update = _share_functions(model, opt_ref, world, compiled=True,
                                                              max_grad_norm=max_grad_norm)

    def serves(self, model: nn.Module, optimizer: optim.Optimizer) -> bool:
        """Whether this was built for this model and the optimizer's current state
        object (a restore that replaces `optimizer.state` needs a new one)."""
        return self.model_ref() is model and self.opt_state is optimizer.state and self.rng_state is mx.random.state

    def adapters(self) -> list[mx.array]:
        """The adapter arrays as they are now (each step replaces them)."""
        return [parent[key] for parent, key in self.slots]

    def warm(self, name: str, *args) -> tuple[float, str | None]:
        """Given a function's name ("accumulate", "finish", "share", "reduce_update") and
        the arguments of its next call, build its trace for these input shapes if it has
        none yet: a dry run whose effects on the adapters and optimizer are undone (call
        it before seeding the RNG for the real call).
        Return (seconds spent, a label like "finish 8x1024", or None when nothing was built)."""
        key = (name,) + tuple(_shape_key(a) for a in args)
        if key in self.traced:
            return 0.0, None
        started = time.perf_counter()
        model, optimizer = self.model_ref(), self.opt_ref()
        saved = state_snapshot(model, optimizer)
        # Everything the call produces, the updated adapters and Adam state included, so
        # every kernel it needs is compiled here and not in the real step.
        mx.eval(getattr(self, name)(*args), self.adapters(), optimizer.state)
        testhooks.slow_compile()
        # Back into the very containers the compiled functions captured, so they stay valid.
        restore_state(model, optimizer, saved)
        self.traced.add(key)
        tokens = args[0]
        label = f"{name} {tokens.shape[0]}x{tokens.shape[1] - 1}" if isinstance(tokens, mx.array) else name
        return time.perf_counter() - started, label


def state_snapshot(model: nn.Module, optimizer: optim.Optimizer) -> tuple[list, list]:
    """References to the adapters and Adam state as they are (evaluated arrays: no copy),
    for `restore_state` after a step that failed part-way (training/oom.py)."""
    return tree_flatten(model.trainable_parameters()), tree_flatten(optimizer.state)


def restore_state(model: nn.Module, optimizer: optim.Optimizer, saved: tuple[list, list]) -> None:
    """Put a state_snapshot back into the very containers a compiled step captured."""
    params, moments = saved
    for tree, values in ((model, params), (optimizer.state, moments)):
        for path, value in values:
            _assign(tree, path, value)


def _shape_key(value):
    """The part of a compiled call's cache key that an argument contributes."""
    if value is None:
        return None
    if isinstance(value, mx.array):
        return (tuple(value.shape), str(value.dtype))
    return "tree"  # the accumulated gradients: the adapters' shapes, the same at every call


def _parent(tree, path: str) -> tuple:
    """(the container, its key) holding the tree_flatten path in a nested dict/list (or Module)."""
    *parents, last = path.split(".")
    node = tree
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    return node, int(last) if isinstance(node, list) else last


def _assign(tree, path: str, value) -> None:
    """Put `value` at the tree_flatten path in a nested dict/list (or Module) in place."""
    node, key = _parent(tree, path)
    node[key] = value


def _share_functions(model: nn.Module, opt_ref, world: World, compiled: bool, max_grad_norm: float = 0.0):
    """Return (share, reduce_update) for a distributed step (see CompiledStep)."""
    share_and_grad = nn.value_and_grad(model, share_loss)

    def share(tokens, lengths, starts, denominator, acc):
        (loss, ntoks), grads = share_and_grad(model, tokens, lengths, starts, denominator)
        if acc is not None:
            grads = tree_map(mx.add, acc, grads)
        return loss, ntoks, grads

    def reduce_update(acc, loss_sum, ntoks, scale, lr):
        grads = tree_map(lambda g: g * scale, sum_tree(world, acc))
        norm = _update(opt_ref(), model, grads, lr, max_grad_norm)
        return (mx.distributed.all_sum(loss_sum, group=world.group),
                mx.distributed.all_sum(ntoks, group=world.group), norm)

    if not compiled:
        return share, reduce_update
    grad_state = [model.state, mx.random.state]
    full_state = [model.state, opt_ref().state, mx.random.state]
    return (partial(mx.compile, inputs=grad_state, outputs=grad_state)(share),
            partial(mx.compile, inputs=full_state, outputs=full_state)(reduce_update))


_COMPILED: "weakref.WeakKeyDictionary[optim.Optimizer, CompiledStep]" = weakref.WeakKeyDictionary()


def compiled_step(model: nn.Module, optimizer: optim.Optimizer, world: World = SINGLE,
                  max_grad_norm: float = 0.0) -> CompiledStep:
    """Given the model, its optimizer, the World and the clipping norm, return their
    CompiledStep (built once, reused for every later step; rebuilt if the optimizer's
    state object was replaced)."""
    step = _COMPILED.get(optimizer)
    if step is None or not step.serves(model, optimizer) or step.world is not world or \
            step.max_grad_norm != max_grad_norm:
        step = _COMPILED[optimizer] = CompiledStep(model, optimizer, world, max_grad_norm)
    return step


def _batch(cache: TokenCache, indices: np.ndarray, pad_id: int, bucketed: bool,
           mask_prompt: bool) -> tuple[mx.array, mx.array, mx.array]:
    """The micro-batch's tokens [B, L] (right-padded), lengths [B] and prompt lengths [B]
    (zeros unless `mask_prompt`); `bucketed` pads the model input (L - 1 positions) up to
    its length bucket (batches.bucket_length). Packed rows (training/packing.py) give
    tokens, segment ids and trained-token flags, each [B, L]."""
    if isinstance(cache, PackedRows):
        width = int(cache.lengths[np.asarray(indices)].max())
        if bucketed:
            width = bucket_length(width - 1, cache.capacity - 1) + 1
        return tuple(mx.array(a) for a in cache.batch(indices, pad_id, width, mask_prompt))
    tokens, lengths = pad_batch([cache.sequence(int(i)) for i in indices], pad_id)
    if bucketed:
        target = bucket_length(tokens.shape[1] - 1, int(cache.meta.get("max_seq_len") or 0)) + 1
        if target > tokens.shape[1]:
            tokens = np.pad(tokens, ((0, 0), (0, target - tokens.shape[1])), constant_values=pad_id)
    starts = cache.starts[np.asarray(indices)] if mask_prompt else np.zeros(len(indices), np.int32)
    return mx.array(tokens), mx.array(lengths), mx.array(np.asarray(starts, dtype=np.int32))


class _StepWork:
    """What one step gathers besides the update: losses, token counts, positions and
    the traces it had to build."""

    def __init__(self):
        self.losses, self.ntoks, self.positions = [], [], 0
        self.compile_s, self.traces = 0.0, []

    def warm(self, fns: CompiledStep, name: str, *args) -> None:
        seconds, label = fns.warm(name, *args)
        if label:
            self.compile_s += seconds
            self.traces.append(label)

    def add(self, tokens: mx.array, loss, ntoks) -> None:
        self.positions += tokens.shape[0] * (tokens.shape[1] - 1)
        self.losses.append(loss)
        self.ntoks.append(ntoks)

    def result(self, loss: mx.array, tokens: mx.array, norm: mx.array | None) -> StepResult:
        return StepResult(loss=loss.item(), tokens=int(tokens.item()), positions=self.positions,
                          compile_s=self.compile_s, traces=self.traces,
                          grad_norm=None if norm is None else float(norm.item()))


def train_step(model: nn.Module, optimizer: optim.Optimizer, cache: TokenCache, micro_batches: list[np.ndarray],
               seed: int, global_step: int, loss_and_grad=None, pad_id: int = 0,
               should_abort=None, compile: bool | None = None, world: World = SINGLE, lr: float | None = None,
               max_grad_norm: float = 0.0, mask_prompt: bool = False) -> StepResult | None:
    """Given the model, optimizer, token cache and one step's micro-batches (index
    arrays), apply one optimizer update with the mean of the micro-batch gradients (its
    global norm clipped to `max_grad_norm` when > 0, at learning rate `lr` when given)
    and return the step's mean loss, its number of target tokens, the positions computed,
    the gradient norm and the time spent building compiled traces first (StepResult).
    With `mask_prompt` only the tokens after each sequence's prompt are targets.

    Return None without touching model or optimizer when `should_abort()` turns true
    between two micro-batches: the state stays at the last step boundary, where it can
    be checkpointed at once (a 7B step can take a minute; launchd waits 60 s at most).

    `compile` (default: on unless MATHLORA_COMPILE=0) picks the compiled step; the eager
    one differentiates `loss_and_grad` when given (else masked_loss), the compiled one
    always masked_loss.

    With a distributed `world` every rank calls this with the same micro-batches and
    computes only its share (see _distributed_step); `should_abort` must then be a
    collective that answers the same on every rank.
    """
    if compile is None:
        compile = compile_default()
    lr_in = mx.array(optimizer.learning_rate if lr is None else lr, mx.float32)
    if world.distributed:
        return _distributed_step(model, optimizer, cache, micro_batches, seed, global_step, pad_id, should_abort,
                                 compile, world, lr_in, max_grad_norm, mask_prompt)
    if not compile:
        return _eager_step(model, optimizer, cache, micro_batches, seed, global_step, loss_and_grad, pad_id,
                           should_abort, lr_in, max_grad_norm, mask_prompt)
    fns = compiled_step(model, optimizer, max_grad_norm=max_grad_norm)
    work, acc = _StepWork(), None
    last = len(micro_batches) - 1
    scale = mx.array(1.0 / len(micro_batches), mx.float32)
    for i, indices in enumerate(micro_batches):
        if i and should_abort is not None and should_abort():
            return None
        tokens, lengths, starts = _batch(cache, indices, pad_id, True, mask_prompt)
        if i < last:
            work.warm(fns, "accumulate", tokens, lengths, starts, acc)
            mx.random.seed(step_seed(seed, global_step, i))
            loss, n, acc = fns.accumulate(tokens, lengths, starts, acc)
            # Waits for this micro-batch only: bounds memory to one micro-batch's graph.
            mx.eval(acc, loss, n)
        else:
            work.warm(fns, "finish", tokens, lengths, starts, acc, scale, lr_in)
            mx.random.seed(step_seed(seed, global_step, i))
            loss, n, norm = fns.finish(tokens, lengths, starts, acc, scale, lr_in)
        work.add(tokens, loss, n)
        testhooks.hold_point("micro", global_step + 1)
    step_loss = mx.mean(mx.stack(work.losses))
    step_tokens = mx.sum(mx.stack(work.ntoks))
    # The step's one host sync: the updated adapters and Adam state, and the loss to log.
    mx.eval(fns.adapters(), optimizer.state, step_loss, step_tokens, norm)
    return work.result(step_loss, step_tokens, norm)


def _eager_step(model, optimizer, cache, micro_batches, seed, global_step, loss_and_grad, pad_id,
                should_abort, lr, max_grad_norm, mask_prompt) -> StepResult | None:
    """The uncompiled step: the same mathematics, op by op."""
    loss_and_grad = loss_and_grad or nn.value_and_grad(model, masked_loss)
    grads, work = None, _StepWork()
    for i, indices in enumerate(micro_batches):
        if i and should_abort is not None and should_abort():
            return None
        mx.random.seed(step_seed(seed, global_step, i))
        tokens, lengths, starts = _batch(cache, indices, pad_id, False, mask_prompt)
        (loss, n), g = loss_and_grad(model, tokens, lengths, starts) if mask_prompt or lengths.ndim == 2 else \
            loss_and_grad(model, tokens, lengths)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        work.add(tokens, loss, n)
        mx.eval(grads, work.losses, work.ntoks)  # bounds memory to one micro-batch's graph
        testhooks.hold_point("micro", global_step + 1)
    scale = 1.0 / len(micro_batches)
    grads = tree_map(lambda g: g * scale, grads)
    norm = _update(optimizer, model, grads, lr, max_grad_norm)
    step_loss = mx.mean(mx.stack(work.losses))
    step_tokens = mx.sum(mx.stack(work.ntoks))
    mx.eval(model.trainable_parameters(), optimizer.state, step_loss, step_tokens, norm)
    return work.result(step_loss, step_tokens, norm)


def _distributed_step(model, optimizer, cache, micro_batches, seed, global_step, pad_id, should_abort, compile,
                      world: World, lr, max_grad_norm, mask_prompt) -> StepResult | None:
    """One optimizer step of a data-parallel job: this rank's shares of the step's
    micro-batches (distributed.shard_step), then one update with the gradients summed
    across ranks and scaled by 1/len(micro_batches), as a single process would do.
    Every rank takes the same number of shares (some may be empty), so the collective
    abort checks between them line up. Traces are warmed per rank: a share's shapes are
    the rank's own, and `share` holds no collective, while every rank warms
    `reduce_update` (which does) at the same first step."""
    fns = None
    if compile:
        fns = compiled_step(model, optimizer, world, max_grad_norm)
        share_fn, reduce_update = fns.share, fns.reduce_update
    else:
        optimizer.init(model.trainable_parameters())
        share_fn, reduce_update = _share_functions(model, weakref.ref(optimizer), world, compiled=False,
                                                   max_grad_norm=max_grad_norm)
    starts_all = cache.starts if mask_prompt else None
    acc, work = None, _StepWork()
    for i, part in enumerate(shard_step(micro_batches, cache.lengths, world.rank, world.size, starts_all)):
        if i and should_abort is not None and should_abort():
            return None
        if len(part.indices):
            tokens, lengths, starts = _batch(cache, part.indices, pad_id, compile, mask_prompt)
            denominator = mx.array(part.denominator, mx.float32)
            if fns:
                work.warm(fns, "share", tokens, lengths, starts, denominator, acc)
            mx.random.seed(step_seed(seed, global_step, part.micro))
            loss, n, acc = share_fn(tokens, lengths, starts, denominator, acc)
            mx.eval(acc, loss, n)
            work.add(tokens, loss, n)
        testhooks.hold_point("micro", global_step + 1)
    if acc is None:  # no rows for this rank in this step: it still takes part in the sum
        acc = tree_map(mx.zeros_like, model.trainable_parameters())
    loss_sum = mx.sum(mx.stack(work.losses)) if work.losses else mx.array(0.0, mx.float32)
    tok_sum = (mx.sum(mx.stack(work.ntoks)) if work.ntoks else mx.array(0, mx.int32)).astype(mx.int32)
    scale = mx.array(1.0 / len(micro_batches), mx.float32)
    if fns:
        work.warm(fns, "reduce_update", acc, loss_sum, tok_sum, scale, lr)
    total_loss, total_tokens, norm = reduce_update(acc, loss_sum, tok_sum, scale, lr)
    step_loss = total_loss / len(micro_batches)
    mx.eval(fns.adapters() if fns else model.trainable_parameters(), optimizer.state, step_loss, total_tokens, norm)
    return work.result(step_loss, total_tokens, norm)


def evaluate_loss(model: nn.Module, cache: TokenCache, indices, batch_size: int, pad_id: int = 0,
                  mask_prompt: bool = False) -> tuple[float, int]:
    """Given a model and a split's sequences, return (mean cross-entropy over their
    trained target tokens, how many there were): a forward pass only, dropout off,
    batched as training batches its sequences (length buckets)."""
    was_training = model.training
    model.eval()
    total, count = mx.array(0.0, mx.float32), 0
    try:
        indices = list(indices)
        for start in range(0, len(indices), batch_size):
            tokens, lengths, starts = _batch(cache, np.asarray(indices[start:start + batch_size]), pad_id, True,
                                             mask_prompt)
            loss_sum, n = _masked_sum(model, tokens, lengths, starts if mask_prompt else None)
            total = total + loss_sum
            mx.eval(total)
            count += int(n.item())
    finally:
        model.train(was_training)
    return (total.item() / count if count else float("nan")), count
