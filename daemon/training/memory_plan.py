"""The memory plan: the peak memory a training step will need, known before the model loads.

Why: a run that does not fit fails only after the model has loaded and its first step has
compiled (minutes for a 7B model); on the CPU the kernel's OOM killer ends it without a
checkpoint, on a Mac it swaps the night away. From the model's config.json and the run's
settings the plan estimates the peak, compares it with what the machine offers and, when
it will not fit, names the settings that would, each with its own estimate
("train.grad_checkpoint = true: ~7.9 GB"). `run` refuses such a start with exit 78 before
loading anything (`daemon.memory_plan` = "warn" or "off" lets it start); `prepare` prints
the plan.

The estimate models what this code does (training/step.py; mlx-lm's Llama-family layers;
MLX's autograd under `mx.compile`), in bytes:

- weights: every parameter in the model's dtype; quantized layers (the embedding and the
  linear layers) at `bits` per weight plus a scale and a bias per group, float32 on the
  CPU (modelio/loading.py casts them);
- LoRA: each adapter's A and B in float32, Adam's two moments and the gradients;
- activations: what every layer keeps for the backward pass: its input and the attention
  block's output (the norms'), the LoRA inputs (in float32, the adapters' dtype), queries,
  keys and values, four [B, T, intermediate] tensors of the gated MLP, and the attention
  probabilities (B x heads x T x T: under the gradient MLX runs the unfused attention on
  every backend) with the causal mask. With gradient checkpointing a layer keeps only its
  input, and one layer is recomputed at a time. The activations are in the model's dtype,
  but in float32 for a quantized model on the CPU (its float32 scales make them so);
- the peak itself comes as the backward pass begins: beside the kept tensors, either the
  logits with the loss's gradient (the head's backward) or, once those are freed, what a
  layer's backward holds (with checkpointing: the layer recomputed), whichever is larger.
  `logits` is what the head adds beyond a layer's backward. The logits are B x T x vocab,
  about three float32 copies (the CPU computes the loss in float32, so a 16-bit model adds
  its 16-bit logits and gradient). With checkpointing the head runs a slice of positions
  at a time, but under `mx.compile` the slices' logits are not all freed in between: two
  slices cost more than one, many slices less;
- workspace: a quantized model's backward dequantizes about one and a half of a layer's
  largest weight at a time.
A GRPO step (grpo_estimate) peaks in one of its two phases: the rollouts (the KV cache of
a rollout batch, bounded by ROLLOUT_CACHE_BYTES, and the logits being sampled) or the
update, which runs uncompiled over whole groups: each prompt once and its completions
after it (training/group_batch.py), the vocabulary only at completion positions
(GRPO_LOGIT_BYTES), the layers as above; with checkpointing, whole sequences with the head
apart from the autograd graph, one slice of logits at a time (GRPO_SLICE_LOGIT_BYTES).

The coefficients were fitted to 96 peaks measured on MLX's CPU backend
(`mx.get_peak_memory()` over a compiled step: Llamas of hidden 32 to 576, 1 to 30 layers,
vocabularies of 300 to 49152, B x T up to 2048, float32, bfloat16, 4- and 8-bit, every
LoRA target, with and without checkpointing, SmolLM2-135M's shape among them): all within
13%. tests/unit/training/test_memory_plan.py keeps it within 20% of real steps. A GPU's
figures reuse the CPU's counts in the model's dtype (not measured here). Nothing here
imports MLX at import time; `device_offer` asks MLX lazily.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from mathlora_daemon.errors import InputError

GIB = 1024 ** 3
MIB = 1024 ** 2
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
QUANT_GROUP_SIZE = 64  # modelio/convert.py's

# What every layer keeps for the backward pass (see the docstring), in [B, T, width] tensors.
KEPT_HIDDEN = 2  # the layer's input and the attention block's output (the two norms' inputs)
KEPT_MLP = 4  # gate, its sigmoid, its SiLU and up
# What a layer's backward holds besides, in tensors of [B, T, hidden], [B, T, q + k + v],
# [B, T, intermediate] and [B, heads, T, T] (fitted): without gradient checkpointing, and
# with it (on top of the recomputed layer's kept tensors).
TRANSIENT = (9.6, 4.9, 4.5, 2.6)
CHECKPOINT_TRANSIENT = (7.5, 5.0, 1.0, 3.0)
CHECKPOINT_HIDDEN = 2.5  # per layer with gradient checkpointing, in [B, T, hidden] tensors
HEAD_HIDDEN = 23.7  # [B, T, hidden] tensors alive beside the logits during the head's backward
# A 16-bit model on the CPU keeps float32 copies besides (its norms compute in float32):
# bytes per [B, T, hidden] value, for each layer kept and once in a layer's backward.
HALF_LAYER_BYTES = 9.0
HALF_ONCE_BYTES = 1.9
# Bytes per (position, vocabulary entry) at the head's backward, by activation bytes (4:
# float32, 2: 16-bit): the logits all at once; in slices (gradient checkpointing, more
# than one slice) a part for every position plus a part divided among the slices.
LOGIT_BYTES = {4: 12.3, 2: 16.1}
SLICED_LOGIT_BYTES = {4: (4.5, 19.2), 2: (11.9, 6.0)}
HEAD_CHUNK_ROWS = 512  # training/step.py's: with checkpointing, the logits of about this many positions at a time
LORA_COPIES = 6  # A and B, Adam's two moments, the new, accumulated and clipped gradients
QUANT_WORKSPACE = 1.3  # a quantized model's backward: this many of a layer's largest weight, dequantized
# The KV cache one GRPO rollout batch may hold. The batch is as many completions as fit
# (all of a step's, for a small model): every batch decodes token by token, so fewer,
# wider batches are what makes rollouts fast, and this bound is what keeps a 7B model's
# (~0.5 MB a token in bf16: 2 GiB is ~5 rows of 700 tokens) within a 16 GB Mac.
ROLLOUT_CACHE_BYTES = 2 * GIB
CACHE_STEP = 256  # mlx-lm's KV caches grow by this many positions
# GRPO's update runs uncompiled: bytes per (completion position, vocabulary entry) at its
# peak: the loss reads the logits in float32 on every device (log-softmax, the selected
# log-probabilities and their gradients); a 16-bit model adds its own logits and their
# gradient. Its layers keep less than the compiled SFT step's figures say (GRPO_ACTIVATIONS
# of them). Fitted to 31 CPU peaks of the tiny Llama and SmolLM2-135M's shapes (2 and 6
# layers, float32 and bfloat16, with and without checkpointing): 0.85-1.20 of the measured;
# tests/unit/training/test_memory_plan.py measures five such steps again.
GRPO_LOGIT_BYTES = 10.0
GRPO_SLICE_LOGIT_BYTES = 14.0  # with checkpointing, per entry of the one slice at a time
GRPO_HALF_LOGIT_BYTES = 2.0  # per byte of a 16-bit logit
GRPO_ACTIVATIONS = 0.8
# Rollouts: the cache (allocated CACHE_STEP positions at a time) and the float32 logits
# being sampled (fitted with the update's figures).
ROLLOUT_CACHE_COPIES = 1
ROLLOUT_LOGIT_BYTES = 16

# A layer's linear modules: (input width, output width) as functions of the shape.
_LINEARS = {
    "q_proj": lambda s: (s.hidden, s.heads * s.head_dim),
    "k_proj": lambda s: (s.hidden, s.kv_heads * s.head_dim),
    "v_proj": lambda s: (s.hidden, s.kv_heads * s.head_dim),
    "o_proj": lambda s: (s.heads * s.head_dim, s.hidden),
    "gate_proj": lambda s: (s.hidden, s.intermediate),
    "up_proj": lambda s: (s.hidden, s.intermediate),
    "down_proj": lambda s: (s.intermediate, s.hidden),
}
# The tensor a LoRA on each module reads (adapters reading the same input share it).
_LORA_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
               "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_act"}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: its dimensions (config.json's), the dtype of its
    unquantized weights and its quantization (bits 0: none)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    dtype: str = "bfloat16"
    bits: int = 0
    group_size: int = QUANT_GROUP_SIZE
    attention_bias: bool = False

    @classmethod
    def from_config(cls, config: dict, dtype: str | None = None, bits: int | None = None,
                    group_size: int | None = None) -> "ModelShape":
        """Given a model's config.json as a dict and optionally its weights' dtype and
        quantization (default: what the config says), return its shape; raise ValueError
        naming a missing or unusable field."""
        if isinstance(config.get("text_config"), dict):
            config = {**config["text_config"], **config}

        def number(name: str, default=None) -> int:
            value = config.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.json has no usable {name!r} ({value!r})")
            return value

        hidden, heads = number("hidden_size"), number("num_attention_heads")
        quant = config.get("quantization") if isinstance(config.get("quantization"), dict) else {}
        dtype = dtype or _config_dtype(config)
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"weights of dtype {dtype!r}; expected one of {', '.join(DTYPE_BYTES)}")
        return cls(hidden=hidden, intermediate=number("intermediate_size"), layers=number("num_hidden_layers"),
                   heads=heads, kv_heads=number("num_key_value_heads", heads),
                   head_dim=number("head_dim") if config.get("head_dim") is not None else hidden // heads,
                   vocab=number("vocab_size"), tied=bool(config.get("tie_word_embeddings", False)), dtype=dtype,
                   bits=int(quant.get("bits") or 0) if bits is None else bits,
                   group_size=int(group_size or quant.get("group_size") or QUANT_GROUP_SIZE),
                   attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")))

    def linear(self, name: str) -> tuple[int, int]:
        """(input width, output width) of a layer's module by its leaf name; a name this
        estimate does not know counts as hidden x hidden."""
        return _LINEARS[name](self) if name in _LINEARS else (self.hidden, self.hidden)


@dataclass(frozen=True)
class TrainShape:
    """The settings the peak depends on: micro-batches of `batch` rows of `seq_len`
    positions (the longest a micro-batch can be), LoRA, accumulation, checkpointing."""

    batch: int
    seq_len: int
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    accumulation: int = 1
    grad_checkpoint: bool = False
    packed: bool = False  # data.pack: a [B, T, T] attention mask instead of the causal one


@dataclass(frozen=True)
class Estimate:
    """The estimated peak of a training step, in bytes, by part (they add up to `total`)."""

    weights: int
    lora: int
    activations: int
    logits: int
    workspace: int
    cache: int = 0  # GRPO: the rollouts' KV cache, when they are the step's peak
    phase: str = "step"  # which part of the step peaks: "step" (SFT), "update" or "rollouts" (GRPO)

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.activations + self.logits + self.workspace + self.cache

    def fields(self) -> dict:
        """The parts and the total in GiB (3 decimals), for the log."""
        parts = ("weights", "lora", "activations", "logits", "workspace", "cache")
        return {"peak_gb": round(self.total / GIB, 3), **{f"{p}_gb": round(getattr(self, p) / GIB, 3) for p in parts},
                "peak_phase": self.phase}


def _config_dtype(config: dict) -> str:
    return str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").replace("torch.", "")


def _leaf(target: str) -> str:
    return target.rsplit(".", 1)[-1]


def weight_bytes(shape: ModelShape, device: str = "cpu") -> int:
    """Given a model shape and the device ("cpu" or "gpu"), return its weights' bytes."""
    s, dense = shape, DTYPE_BYTES[shape.dtype]
    per_layer = sum(i * o for i, o in (s.linear(n) for n in _LINEARS))
    matrices = s.layers * per_layer + s.vocab * s.hidden * (1 if s.tied else 2)
    vectors = s.layers * 2 * s.hidden + s.hidden  # the norms
    if s.attention_bias:
        vectors += s.layers * (s.heads + 2 * s.kv_heads) * s.head_dim
    if not s.bits:
        return (matrices + vectors) * dense
    scale_bytes = 4 if device == "cpu" else dense
    return int(matrices * s.bits / 8 + matrices / s.group_size * 2 * scale_bytes) + vectors * dense


def activation_bytes(shape: ModelShape, device: str = "cpu") -> int:
    """Bytes per activation value: the model's dtype, but float32 for a quantized model
    on the CPU (its float32 scales promote everything they touch)."""
    return 4 if shape.bits and device == "cpu" else DTYPE_BYTES[shape.dtype]


def rollout_batch_size(per_token: int, prompt_tokens: int, max_new_tokens: int, completions: int,
                       budget: int = ROLLOUT_CACHE_BYTES) -> int:
    """Given a model's KV cache bytes per position, the longest prompt, the completion
    length and the number of completions, return the rows of one rollout batch: all of
    them when their cache fits the budget, else as many as fit (at least 1)."""
    positions = -(-(prompt_tokens + max_new_tokens) // CACHE_STEP) * CACHE_STEP
    return max(1, min(completions, budget // (per_token * positions)))


def lora_params(shape: ModelShape, train: TrainShape) -> int:
    """Given the shapes, return the LoRA parameters' count (A and B of every target in every layer)."""
    targets = {_leaf(t) for t in train.lora_targets}
    return shape.layers * sum(train.lora_rank * sum(shape.linear(t)) for t in targets)


def head_slices(batch: int, seq_len: int) -> int:
    """How many slices training/step.py makes the logits in with gradient checkpointing."""
    width = max(64, HEAD_CHUNK_ROWS // max(batch, 1) // 64 * 64)
    return -(-seq_len // width)


def _kept_per_position(s: ModelShape, train: TrainShape, act: int) -> float:
    """What one layer keeps for its backward pass per position, in bytes (attention aside)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    targets = {_leaf(t) for t in train.lora_targets}
    widths = {"attn_in": s.hidden, "attn_out": q, "mlp_in": s.hidden, "mlp_act": s.intermediate}
    lora_inputs = sum(widths[i] for i in {_LORA_INPUT.get(t, "attn_in") for t in targets})
    return (KEPT_HIDDEN * s.hidden + q + 2 * kv + KEPT_MLP * s.intermediate) * act \
        + (lora_inputs + len(targets) * train.lora_rank) * 4


def _layer_kept(s: ModelShape, train: TrainShape, act: int) -> float:
    """What one layer keeps for its backward pass, in bytes."""
    return train.batch * train.seq_len * _kept_per_position(s, train, act) \
        + train.batch * s.heads * train.seq_len ** 2 * act + train.seq_len ** 2


def _logit_bytes(act: int, device: str, slices: int) -> float:
    """Bytes per (position, vocabulary entry) at the head's backward (see LOGIT_BYTES);
    a GPU's loss reads the logits in their own dtype: the CPU's float32 figures, scaled."""
    kind = act if device == "cpu" else 4
    if slices > 1:
        every, each = SLICED_LOGIT_BYTES[kind]
        per = every + each / slices
    else:
        per = LOGIT_BYTES[kind]
    return per if device == "cpu" else per * act / 4


def _activation_parts(s: ModelShape, train: TrainShape, act: int, device: str, positions: int,
                      attention: int, mask: int) -> tuple[float, float]:
    """What the backward pass holds besides the head: (what the layers keep, what one
    layer's backward adds), in bytes, for `positions` token positions, `attention`
    attention-probability entries per layer and a `mask` of that many bytes."""
    per_layer = positions * _kept_per_position(s, train, act) + attention * act + mask
    hidden, qkv, mlp, probs = CHECKPOINT_TRANSIENT if train.grad_checkpoint else TRANSIENT
    backward = positions * (hidden * s.hidden + qkv * (s.heads + 2 * s.kv_heads) * s.head_dim
                            + mlp * s.intermediate) * act + probs * attention * act
    if train.grad_checkpoint:
        kept = s.layers * CHECKPOINT_HIDDEN * positions * s.hidden * act
        backward += per_layer
    else:
        kept = s.layers * per_layer
    if act == 2 and device == "cpu":
        kept += positions * s.hidden * HALF_LAYER_BYTES * (1 if train.grad_checkpoint else s.layers)
        backward += positions * s.hidden * HALF_ONCE_BYTES
    return kept, backward


def _workspace(s: ModelShape, act: int) -> int:
    return int(QUANT_WORKSPACE * max(i * o for i, o in (s.linear(n) for n in _LINEARS)) * act) if s.bits else 0


def estimate(shape: ModelShape, train: TrainShape, device: str = "cpu") -> Estimate:
    """Given a model shape, the training settings and the device ("cpu" or "gpu"),
    return the estimated peak of one optimizer step, by part (see the module docstring)."""
    s, act = shape, activation_bytes(shape, device)
    rows = train.batch * train.seq_len
    kept, backward = _activation_parts(s, train, act, device, rows, train.batch * s.heads * train.seq_len ** 2,
                                       train.seq_len ** 2)
    if train.packed:
        kept += train.batch * train.seq_len ** 2  # the block-diagonal mask, shared by the layers
    slices = head_slices(train.batch, train.seq_len) if train.grad_checkpoint else 1
    head = rows * s.vocab * _logit_bytes(act, device, slices) + HEAD_HIDDEN * rows * s.hidden * act
    return Estimate(weights=weight_bytes(s, device), lora=lora_params(s, train) * 4 * LORA_COPIES,
                    activations=int(kept + backward), logits=int(max(0.0, head - backward)),
                    workspace=_workspace(s, act))


@dataclass(frozen=True)
class RolloutShape:
    """What a GRPO step adds to the TrainShape: `prompts` prompts of up to `prompt_tokens`
    tokens, `group_size` completions of up to `max_new_tokens` each."""

    group_size: int
    prompts: int
    prompt_tokens: int
    max_new_tokens: int


def grpo_update_rows(train: TrainShape, rl: RolloutShape) -> tuple[int, int]:
    """(groups, completions) in one micro-batch of the GRPO update: whole groups, as many
    as `train.batch_size` completions hold, at least one (training/group_batch.py)."""
    groups = min(rl.prompts, max(1, train.batch // rl.group_size))
    return groups, groups * rl.group_size


def rollout_cache_bytes(shape: ModelShape, device: str = "cpu") -> int:
    """The KV cache bytes of one position of one row, all layers (keys and values in the
    activations' dtype: training/rollouts.py measures the same on the loaded model)."""
    return shape.layers * 2 * shape.kv_heads * shape.head_dim * activation_bytes(shape, device)


def grpo_estimate(shape: ModelShape, train: TrainShape, rl: RolloutShape, device: str = "cpu") -> Estimate:
    """Given a model shape, the training settings, the GRPO step's shape and the device,
    return the estimated peak of one GRPO step: the larger of its rollouts (the KV cache of
    a rollout batch, training/rollouts.py) and its update (whole groups per micro-batch,
    each prompt run once unless gradient checkpointing runs whole sequences,
    training/group_batch.py; the vocabulary only at completion positions), with the
    reference policy's adapters beside the trained ones."""
    s, act = shape, activation_bytes(shape, device)
    lp, lc = rl.prompt_tokens, rl.max_new_tokens
    groups, rows = grpo_update_rows(train, rl)
    if train.grad_checkpoint:  # the whole-sequence path: every completion with its prompt
        positions, attention = rows * (lp + lc), rows * s.heads * (lp + lc) ** 2
    else:
        positions = groups * lp + rows * lc
        attention = groups * s.heads * lp ** 2 + rows * s.heads * lc * (lp + lc)
    kept, backward = (GRPO_ACTIVATIONS * part for part in
                      _activation_parts(s, train, act, device, positions, attention, 0))
    logit_positions = rows * lc
    per_logit = GRPO_SLICE_LOGIT_BYTES if train.grad_checkpoint else \
        GRPO_LOGIT_BYTES + (GRPO_HALF_LOGIT_BYTES * act if act < 4 else 0)
    # With checkpointing the head stands apart from the autograd graph and runs a slice of
    # about HEAD_CHUNK_ROWS positions at a time (training/group_batch.py's
    # whole_value_and_grad): one slice's logits exist at once.
    sliced = rows * min(lc, max(1, HEAD_CHUNK_ROWS // rows)) if train.grad_checkpoint else logit_positions
    head = sliced * s.vocab * per_logit + HEAD_HIDDEN * logit_positions * s.hidden * act
    # The head's peak comes on top of what the layers keep for the backward, but the
    # sliced head runs between the body's passes, with nothing of theirs alive.
    beside = backward + (kept if train.grad_checkpoint else 0.0)
    logits = max(0.0, head - beside)
    update = kept + backward + logits
    # Rollouts: every completion of the step decodes at once unless the cache budget splits them.
    completions = rl.prompts * rl.group_size
    per_token = rollout_cache_bytes(s, device)
    batch = rollout_batch_size(per_token, lp, lc, completions)
    cache = ROLLOUT_CACHE_COPIES * batch * per_token * -(-(lp + lc) // CACHE_STEP) * CACHE_STEP \
        + batch * s.vocab * ROLLOUT_LOGIT_BYTES
    lora = lora_params(s, train) * 4 * (LORA_COPIES + 1)
    if cache > update:
        return Estimate(weights=weight_bytes(s, device), lora=lora, activations=0, logits=0,
                        workspace=_workspace(s, act), cache=int(cache), phase="rollouts")
    return Estimate(weights=weight_bytes(s, device), lora=lora, activations=int(kept + backward),
                    logits=int(logits), workspace=_workspace(s, act), phase="update")


# --- the run's model and settings ------------------------------------------------------------

def weights_dtype(model_dir: Path) -> str | None:
    """Given a model directory, return the dtype most of its unquantized float weights
    have (from the safetensors headers: a few KB read), or None when none says."""
    counts: dict[str, int] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        try:
            with path.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(min(length, 100 * MIB)))
        except (OSError, ValueError, struct.error):
            continue
        for name, info in header.items():
            if not isinstance(info, dict) or name.endswith((".scales", ".biases")):
                continue
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype and isinstance(info.get("shape"), list):
                values = 1
                for dim in info["shape"]:
                    values *= int(dim)
                counts[dtype] = counts.get(dtype, 0) + values
    return max(counts, key=counts.get) if counts else None


def model_shape(model_dir: Path) -> ModelShape:
    """Given an MLX model directory, return its shape (config.json, the weights' dtype);
    raise ValueError when its config.json is missing or does not describe a decoder this
    estimate knows."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{Path(model_dir) / 'config.json'}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    return ModelShape.from_config(config, dtype=weights_dtype(model_dir))


def train_shape(cfg, batch_split: int = 1, ranks: int = 1) -> TrainShape:
    """Given the Config, how many parts an out-of-memory step split each micro-batch into
    (training/oom.py) and the ranks sharing each micro-batch (training/distributed.py),
    return the settings the estimate needs: the rows one process computes at once."""
    t = cfg.train
    rows = max(1, t.batch_size // max(1, batch_split))
    return TrainShape(batch=-(-rows // max(1, ranks)), seq_len=cfg.data.max_seq_len,
                      lora_rank=cfg.lora.rank, lora_targets=tuple(cfg.lora.targets),
                      accumulation=t.grad_accumulation_steps, grad_checkpoint=t.grad_checkpoint,
                      packed=bool(getattr(cfg.data, "pack", False)))


def saved_batch_split(checkpoints: Path) -> int:
    """The micro-batch split the newest checkpoint recorded (training/oom.py), 1 when
    none did; unverified and cheap: the real resume verifies."""
    from mathlora_checkpoints.store import STATE_NAME, manifested_newest_first, read_json_object

    for path in manifested_newest_first(checkpoints):
        memory = (read_json_object(path / STATE_NAME) or {}).get("memory")
        split = memory.get("batch_split") if isinstance(memory, dict) else None
        return split if isinstance(split, int) and not isinstance(split, bool) and split > 1 else 1
    return 1


# --- what the machine offers -------------------------------------------------------------------

def device_kind(mx_module=None) -> str:
    """Which device MLX trains on: "gpu" (Metal or CUDA) or "cpu"."""
    if mx_module is None:
        import mlx.core as mx_module
    return "gpu" if mx_module.default_device() == mx_module.gpu else "cpu"


@dataclass(frozen=True)
class Offer:
    """The memory a run may use, in bytes, and where the figure comes from."""

    bytes: int
    source: str
    device: str  # "cpu" or "gpu"
    limited: bool = False  # daemon.memory_limit_gb set the figure


def device_offer(memory_limit_gb: float = 0.0, mx_module=None, psutil_module=None) -> Offer:
    """Given daemon.memory_limit_gb (0: none), return what the machine offers: MLX's
    recommended working set on Metal, the free device memory on CUDA, the available RAM
    on the CPU; the limit when it is lower."""
    if mx_module is None:
        import mlx.core as mx_module
    if device_kind(mx_module) == "gpu":
        info = mx_module.device_info()
        for key, source in (("max_recommended_working_set_size", "MLX's recommended working set"),
                            ("free_memory", "free GPU memory"), ("total_memory", "GPU memory"),
                            ("memory_size", "GPU memory")):
            if info.get(key):
                offer = Offer(int(info[key]), source, "gpu")
                break
        else:
            offer = Offer(0, "unknown", "gpu")
    else:
        if psutil_module is None:
            import psutil as psutil_module
        offer = Offer(int(psutil_module.virtual_memory().available), "available RAM", "cpu")
    if memory_limit_gb > 0 and (memory_limit_gb * GIB < offer.bytes or not offer.bytes):
        return Offer(int(memory_limit_gb * GIB), f"daemon.memory_limit_gb = {memory_limit_gb:g}", offer.device, True)
    return offer


# --- the plan ----------------------------------------------------------------------------------

def size(nbytes: float) -> str:
    """Given bytes, return "7.9 GB" (GiB, as the memory fields) or "45 MB" below 1 GB."""
    if nbytes >= GIB:
        return f"{nbytes / GIB:.1f} GB"
    return f"{max(nbytes / MIB, 1):.0f} MB" if nbytes >= MIB / 2 else "<1 MB"


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate for the run's settings against what the machine offers."""

    estimate: Estimate
    offer: Offer
    shape: ModelShape
    train: TrainShape
    batch_split: int = 1
    rl: RolloutShape | None = None  # a GRPO step's rollouts (None: SFT)
    prompts_from: str = ""  # GRPO: where rl.prompt_tokens comes from

    @property
    def fits(self) -> bool:
        return self.offer.bytes <= 0 or self.estimate.total <= self.offer.bytes

    def line(self) -> str:
        """One line: the peak, its parts and what is available."""
        e = self.estimate
        parts = f"weights {size(e.weights)}, LoRA+Adam {size(e.lora)}, activations {size(e.activations)}, " \
                f"logits {size(e.logits)}" + (f", quantized workspace {size(e.workspace)}" if e.workspace else "")
        offered = f"{size(self.offer.bytes)} available ({self.offer.source})" if self.offer.bytes else \
            "an unknown amount available"
        if e.cache:
            parts += f", rollouts' KV cache {size(e.cache)}"
        split = f"; micro-batches of {self.train.batch} rows after an out-of-memory split" \
            if self.batch_split > 1 else ""
        grpo = f"GRPO, at its {e.phase}, prompts of up to {self.rl.prompt_tokens} tokens ({self.prompts_from}): " \
            if self.rl else ""
        return f"memory plan: {grpo}~{size(e.total)} peak ({parts}) of {offered}{split}"

    def fields(self) -> dict:
        """The log event's fields."""
        return {**self.estimate.fields(), "available_gb": round(self.offer.bytes / GIB, 3),
                "available_from": self.offer.source, "fits": self.fits, "device": self.offer.device,
                "batch_size": self.train.batch, "max_seq_len": self.train.seq_len,
                "grad_checkpoint": self.train.grad_checkpoint, "quantize_bits": self.shape.bits,
                "dtype": self.shape.dtype, "layers": self.shape.layers, "batch_split": self.batch_split,
                **({"method": "grpo", "group_size": self.rl.group_size, "prompts_per_step": self.rl.prompts,
                    "prompt_tokens": self.rl.prompt_tokens, "prompt_tokens_from": self.prompts_from,
                    "max_new_tokens": self.rl.max_new_tokens} if self.rl else {"method": "sft"})}

    def _total(self, shape: ModelShape | None = None, rl: RolloutShape | None = None, **train) -> int:
        shape, train_ = shape or self.shape, replace(self.train, **train)
        if self.rl is None:
            return estimate(shape, train_, self.offer.device).total
        return grpo_estimate(shape, train_, rl or self.rl, self.offer.device).total

    def remedies(self, lora_dropout: float = 0.0) -> list[tuple[str, int]]:
        """The settings that would each make the step fit, one change at a time, with
        their estimates (empty when none alone does)."""
        t, budget, out = self.train, self.offer.bytes, []
        if not t.grad_checkpoint and (total := self._total(grad_checkpoint=True)) <= budget:
            extra = f" (with lora.dropout = 0, now {lora_dropout:g})" if lora_dropout > 0 else ""
            out.append((f"train.grad_checkpoint = true{extra}", total))
        batch = t.batch // 2
        if self.rl is not None and batch < self.rl.group_size:  # a GRPO micro-batch is one group at least
            batch = 0
        while batch >= 1:
            if (total := self._total(batch=batch)) <= budget:
                steps = t.accumulation * t.batch // batch
                out.append((f"train.batch_size = {batch}, train.grad_accumulation_steps = {steps}", total))
                break
            batch //= 2
        if self.shape.bits != 4 and (total := self._total(replace(self.shape, bits=4))) <= budget:
            out.append(("model.quantize_bits = 4 (a new model: `mathlora-daemon convert --force`)", total))
        if self.rl is not None:  # the sequence is the prompt and its completion: shorter completions
            new = shorter_seq_len(self.rl.max_new_tokens, lambda n: self._total(rl=replace(self.rl, max_new_tokens=n))
                                  <= budget)
            if new:
                out.append((f"rl.max_new_tokens = {new}", self._total(rl=replace(self.rl, max_new_tokens=new))))
            return out
        seq = shorter_seq_len(t.seq_len, lambda n: self._total(seq_len=n) <= budget)
        if seq:
            out.append((f"data.max_seq_len = {seq}", self._total(seq_len=seq)))
        return out

    def all_at_once(self) -> tuple[str, int]:
        """The smallest plan these remedies make together: checkpointing, one row per
        micro-batch, 4 bits and the longest max_seq_len that then fits (else 64)."""
        shape = replace(self.shape, bits=4) if self.shape.bits != 4 else self.shape
        changes = {"grad_checkpoint": True, "batch": 1}
        if self.rl is not None:
            return self._grpo_all_at_once(shape)
        seq = shorter_seq_len(self.train.seq_len, lambda n: estimate(
            shape, replace(self.train, seq_len=n, **changes), self.offer.device).total <= self.offer.bytes) or \
            min(self.train.seq_len, 64)
        total = estimate(shape, replace(self.train, seq_len=seq, **changes), self.offer.device).total
        text = (f"train.grad_checkpoint = true, train.batch_size = 1, train.grad_accumulation_steps = "
                f"{self.train.accumulation * self.train.batch}"
                + (", model.quantize_bits = 4" if self.shape.bits != 4 else "")
                + (f", data.max_seq_len = {seq}" if seq != self.train.seq_len else ""))
        return text, total

    def advice(self, lora_dropout: float = 0.0, memory_limit_gb: float = 0.0, refused: bool = True) -> str:
        """Why it will not fit and what would: every single change that fits, with its
        estimate; else all of them together; and how to start anyway (when `refused`)."""
        remedies = self.remedies(lora_dropout)
        lines = [f"{self.line()}: the training step will not fit."]
        if remedies:
            lines.append("Any one of these would fit:")
            lines += [f"  {text}: ~{size(total)}" for text, total in remedies]
            texts = [text for text, _ in remedies]
        else:
            text, total = self.all_at_once()
            verdict = "fits" if total <= self.offer.bytes else "still does not fit"
            lines.append(f"No single change fits; all together: {text}: ~{size(total)} ({verdict}).")
            texts = [text]
        new_run = [k for k in ("train.batch_size", "model.quantize_bits", "data.max_seq_len", "rl.max_new_tokens")
                   if any(k in t for t in texts)]
        if new_run:  # in the fingerprint (config.py): checkpoints made with other values are refused
            free = "; train.grad_checkpoint can change at any start" if any("grad_checkpoint" in t for t in texts) \
                else ""
            lines.append(f"(Changing {' or '.join(new_run)} starts a new run: this run's checkpoints are "
                         f"refused{free}.)")
        if self.offer.limited:
            lines.append(f"Or raise daemon.memory_limit_gb (now {memory_limit_gb:g}).")
        if refused:
            lines.append('Or set daemon.memory_plan = "warn" to start anyway (the estimate is within about 20% on '
                         'the CPU; an out-of-memory step splits its micro-batches).')
        return "\n".join(lines)


    def _grpo_all_at_once(self, shape: ModelShape) -> tuple[str, int]:
        """GRPO's: checkpointing, one group per micro-batch, 4 bits and the longest
        rl.max_new_tokens that then fits (else 64)."""
        train = replace(self.train, grad_checkpoint=True, batch=self.rl.group_size)

        def total(new: int) -> int:
            return grpo_estimate(shape, train, replace(self.rl, max_new_tokens=new), self.offer.device).total

        new = self.rl.max_new_tokens if total(self.rl.max_new_tokens) <= self.offer.bytes else \
            shorter_seq_len(self.rl.max_new_tokens, lambda n: total(n) <= self.offer.bytes) or \
            min(self.rl.max_new_tokens, 64)
        text = (f"train.grad_checkpoint = true, train.batch_size = {self.rl.group_size}"
                + (", model.quantize_bits = 4" if self.shape.bits != 4 else "")
                + (f", rl.max_new_tokens = {new}" if new != self.rl.max_new_tokens else ""))
        return text, total(new)


def shorter_seq_len(seq_len: int, fits) -> int | None:
    """The longest of seq_len/2, seq_len/4, ... (down to 64, rounded to 64s) that `fits`."""
    n = seq_len // 2 // 64 * 64
    while n >= 64:
        if fits(n):
            return n
        n = n // 2 // 64 * 64
    return None


def longest_prompt(cache_root: Path | None, cfg) -> int | None:
    """The longest GRPO prompt, in tokens, of the newest token cache prepared for this
    dataset and max_seq_len with its training problems (training/prepare.py), or None
    when there is none yet. Read before the model loads: a few KB of meta.json and the
    prompt lengths (memory-mapped)."""
    import numpy as np

    if cache_root is None or not Path(cache_root).is_dir():
        return None
    metas = sorted(Path(cache_root).glob("*/meta.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in metas:
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
            if not (isinstance(meta, dict) and isinstance(meta.get("identity"), dict)
                    and meta["identity"].get("train_problems") and meta.get("dataset") == cfg.data.name
                    and meta.get("max_seq_len") == cfg.data.max_seq_len):
                continue
            lengths = np.load(path.parent / "train" / "prompt_lens.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            continue
        if lengths.size:
            return int(lengths.max())
    return None


def rollout_shape(cfg, prompt_tokens: int) -> RolloutShape:
    """Given the Config and the longest prompt, return the GRPO step's RolloutShape."""
    rl = cfg.rl
    return RolloutShape(rl.group_size, rl.prompts_per_step, prompt_tokens, rl.max_new_tokens)


def plan_for(cfg, model_dir: Path, offer: Offer, batch_split: int = 1, ranks: int = 1,
             cache_root: Path | None = None) -> MemoryPlan:
    """Given the Config, the MLX model directory, what the machine offers, the saved
    micro-batch split, the ranks and (GRPO) the run's token caches, return the plan; raise
    ValueError when the model cannot be planned for (no config.json yet, an architecture
    without the usual fields). A GRPO plan takes the longest prompt of the prepared data,
    else the bound prepare enforces (a prompt is shorter than data.max_seq_len)."""
    shape = model_shape(model_dir)
    train = train_shape(cfg, batch_split, ranks)
    if cfg.train.method != "grpo":
        return MemoryPlan(estimate(shape, train, offer.device), offer, shape, train, batch_split)
    prompt = longest_prompt(cache_root, cfg)
    source = "the prepared data's longest" if prompt else "at most data.max_seq_len - 1 until the data is prepared"
    rl = rollout_shape(cfg, prompt or cfg.data.max_seq_len - 1)
    return MemoryPlan(grpo_estimate(shape, train, rl, offer.device), offer, shape, train, batch_split, rl, source)


# On a GPU MLX keeps every buffer a command graph used until that graph completes, and the
# host encodes work ahead of a slow GPU (the backward of 4-bit matmuls): freed activations
# pile up. 7B 4-bit, B=1, T=1024, checkpointing peaked at 12.97 GB for a ~5.7 GB step
# (H100). A memory limit makes MLX wait for queued work instead of growing: at 6.3 GiB the
# peak was 6.98 GB at 0.94x the tokens/s (bench/results/h100-2026-12-05-7b-q4-gc*.json).
# The headroom is the estimate's own tolerance (+/-20%), so a low estimate does not stall
# the GPU; for that run it gives the very 6.3 GiB measured.
PLAN_LIMIT_HEADROOM = 1.20


def plan_memory_limit(cfg, model_dir: Path, device: str, checkpoints: Path | None = None,
                      ranks: int = 1) -> int | None:
    """Given the Config, the model directory, the device ("cpu" or "gpu"), the run's
    checkpoints directory (for a saved micro-batch split) and the ranks, return the MLX
    memory limit in bytes that
    daemon.memory_limit_from_plan sets (the plan's estimate + 20%), or None: on the CPU
    (no queued work holds buffers there), with daemon.memory_limit_gb set, the option
    off, a method the plan does not model, or a model it cannot plan for."""
    d = cfg.daemon
    if device != "gpu" or d.memory_limit_gb > 0 or not d.memory_limit_from_plan or cfg.train.method != "sft":
        return None
    try:
        shape = model_shape(model_dir)
    except ValueError:
        return None
    split = saved_batch_split(checkpoints) if checkpoints is not None else 1
    return int(estimate(shape, train_shape(cfg, split, ranks), device).total * PLAN_LIMIT_HEADROOM)


def check_memory(cfg, model_dir: Path, log, checkpoints: Path | None = None, enforce: bool = True,
                 offer: Offer | None = None, ranks: int = 1, cache_root: Path | None = None) -> MemoryPlan | None:
    """Given the Config, the model directory, the log, the run's checkpoints directory
    (for a saved micro-batch split), whether to refuse a plan that does not fit and the
    ranks of a distributed job, log `memory.plan`, print its line to stderr and
    return the plan (None: skipped, logged with why). Raise InputError (exit 78) naming
    the settings that would fit when it does not fit, `enforce` is set and
    daemon.memory_plan is "enforce"."""
    import sys

    mode = getattr(cfg.daemon, "memory_plan", "enforce")
    if mode == "off":
        return None
    try:
        split = saved_batch_split(checkpoints) if checkpoints is not None else 1
        plan = plan_for(cfg, model_dir, offer or device_offer(cfg.daemon.memory_limit_gb), split, ranks, cache_root)
    except ValueError as exc:
        log.info("memory.plan", skipped=f"{exc} (a model not converted yet is planned for at the next start)")
        return None
    (log.info if plan.fits else log.warning)("memory.plan", **plan.fields(), mode=mode)
    if plan.fits:
        print(plan.line(), file=sys.stderr)
        return plan
    refused = enforce and mode == "enforce"
    advice = plan.advice(cfg.lora.dropout, cfg.daemon.memory_limit_gb, refused)
    if refused:
        raise InputError(advice)
    if mode == "enforce":  # `prepare` (not enforced): what `run` will do
        advice += '\n`run` refuses to start it while daemon.memory_plan = "enforce" (set "warn" to start anyway).'
    print(advice, file=sys.stderr)
    return plan
