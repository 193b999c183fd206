"""GGUF -> `mlx_model/`: turn a local llama.cpp model file (what Ollama and LM Studio
users already have) into an MLX model directory that `mlx_lm.utils.load` reads.

The tensors come through `mx.load`, which hands Q4_0, Q4_1 and Q8_0 tensors back as
MLX affine-quantized triplets (`.weight` packed uint32, `.scales`, `.biases`, group
size 32), so they stay quantized: nothing is dequantized and re-quantized. MLX 0.32
dequantizes Q2_K, Q4_K, Q6_K and BF16 to float16 itself and cannot read Q3_K, Q5_*,
IQ* or F64 at all; the file's own tensor table (read here, without MLX) names those
types so a refusal says exactly what the file holds.

Rotary layout: llama.cpp's HF -> GGUF conversion permutes the rows of Q and K, head by
head, from Hugging Face's rotate-half order into the interleaved order its RoPE uses.
We permute them back (rows of the packed weight, its scales and biases together, which
is exact for row-wise quantization) and keep mlx-lm's default `rope_traditional: false`.
The other option, leaving the rows and setting `rope_traditional: true`, computes the
same logits, but undoing the permutation gives the very layout `mlx_lm.convert` writes
from the Hugging Face checkpoint, so adapters trained here fit that model too, and
mlx-lm's own GGUF export (`mlx_lm.fuse --export-gguf`, which applies llama.cpp's
permutation itself) gets the layout it expects.

The tokenizer is rebuilt from the GGUF metadata as a `tokenizers` BPE: byte-level for
`tokenizer.ggml.model = "gpt2"` (vocabulary + merges, the pre-tokenizer chosen from
`tokenizer.ggml.pre`), byte-fallback SentencePiece-style for `"llama"` (merges derived
from the token scores when the file has none). Control tokens become special tokens.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

from mathlora_checkpoints.fsio import TMP_PREFIX, ensure_private_dir, fsync_file, publish_dir, write_bytes_durable
from mathlora_daemon.errors import InputError

GGUF_MAGIC = b"GGUF"
GROUP_SIZE = 32  # every block-quantized GGUF type MLX keeps packed uses blocks of 32
REQUANT_GROUP_SIZES = (64, 32)  # mlx-lm's default group first; 32 divides every GGUF row
SHARD_BYTES = 5 << 30  # mlx-lm's shard size, so large models split where its tools expect

# ggml_type ids from ggml.h (only the name matters here: MLX does the decoding).
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}
# What MLX 0.32's loader can give us in some usable form (packed or float16).
MLX_READABLE = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q2_K", "Q4_K", "Q6_K"}
ACCEPTED_HINT = "F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q2_K, Q4_K or Q6_K"

# GGUF metadata value types -> struct format of one element (8 = string, 9 = array).
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# Tensors that only llama.cpp needs (precomputed rotary tables of old converters).
_IGNORED_LAYER_TENSORS = {"attn_rot_embd"}

# llama.cpp `tokenizer.ggml.pre` names -> how its regex splits text before BPE.
_PRE_GPT2 = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"}
_PRE_DIGITS = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_PRE_LLAMA3 = {"llama3", "llama-bpe", "llama-v3", "dbrx", "smaug-bpe", "falcon3"}
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 2, 3, 4


# --------------------------------------------------------------------------- file

def read_tensor_types(path: Path) -> dict[str, str]:
    """Given a GGUF file, return {tensor name: ggml type name} from its header; raise
    InputError when the file is not a little-endian GGUF v2/v3 file.

    Read here rather than through MLX because `mx.load` does not report the stored
    types, and a file MLX refuses must still be explained.
    """
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse_tensor_table(buf, path)
    except (OSError, ValueError) as exc:  # empty file (mmap), unreadable file
        raise InputError(f"model.name: {path} is not a readable GGUF file: {exc}") from None


def _parse_tensor_table(buf, path: Path) -> dict[str, str]:
    if buf[:4] != GGUF_MAGIC:
        raise InputError(f"model.name: {path} is not a GGUF file (it does not start with 'GGUF')")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version not in (2, 3):
        # Version 1 files predate August 2023; a byte-swapped version is a big-endian file.
        raise InputError(f"model.name: {path} is GGUF version {version}; only little-endian "
                         "GGUF v2 and v3 files are supported (re-export it with a recent llama.cpp)")
    try:
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        pos = 24
        for _ in range(n_kv):
            pos = _skip_string(buf, pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos = _skip_value(buf, pos + 4, vtype)
        types = {}
        for _ in range(n_tensors):
            name, pos = _read_string(buf, pos)
            (ndim,) = struct.unpack_from("<I", buf, pos)
            pos += 4 + 8 * ndim
            (ttype,) = struct.unpack_from("<I", buf, pos)
            pos += 12  # type + data offset
            types[name] = GGML_TYPES.get(ttype, f"type{ttype}")
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"model.name: {path} has a damaged or truncated GGUF header ({exc})") from None
    return types


def _read_string(buf, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + length
    if end > len(buf):
        raise ValueError("string runs past the end of the file")
    return bytes(buf[pos + 8:end]).decode("utf-8"), end


def _skip_string(buf, pos: int) -> int:
    (length,) = struct.unpack_from("<Q", buf, pos)
    return pos + 8 + length


def _skip_value(buf, pos: int, vtype: int) -> int:
    if vtype == 8:
        return _skip_string(buf, pos)
    if vtype == 9:
        etype, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if etype in _SCALAR_FORMATS:
            return pos + count * struct.calcsize(_SCALAR_FORMATS[etype])
        for _ in range(count):
            pos = _skip_value(buf, pos, etype)
        return pos
    if vtype in _SCALAR_FORMATS:
        return pos + struct.calcsize(_SCALAR_FORMATS[vtype])
    raise ValueError(f"unknown metadata value type {vtype}")


def _load(path: Path, types: dict[str, str]) -> tuple[dict, dict]:
    """Given a GGUF file and its tensor types, return mx.load's (arrays, metadata);
    raise InputError naming the types MLX cannot read."""
    unreadable = sorted({t for t in types.values() if t not in MLX_READABLE})
    if unreadable:
        counts = Counter(t for t in types.values() if t in unreadable)
        raise InputError(
            f"model.name: {path} holds tensor types MLX cannot load: "
            + ", ".join(f"{t} ({counts[t]} tensors)" for t in unreadable)
            + f". Supported: {ACCEPTED_HINT}. Pick a Q4_0, Q4_1, Q8_0 or F16 build of the model "
            "(or re-quantize it with llama.cpp's llama-quantize), or give the Hugging Face repo instead.")
    try:
        return mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"model.name: MLX could not read {path}: {exc}") from None


# ----------------------------------------------------------------------- metadata

def _scalar(meta: dict, key: str, default=None, *, required: bool = False):
    """Given the metadata, return the Python value at key (MLX gives numbers as 0-d
    arrays); raise InputError when a required key is missing or a scalar is a list."""
    if key not in meta:
        if required:
            raise InputError(f"model.name: the GGUF metadata lacks {key}, which a llama model needs")
        return default
    value = meta[key]
    if isinstance(value, mx.array):
        if value.ndim != 0:
            raise InputError(f"model.name: GGUF metadata {key} varies per layer ({value.tolist()}); "
                             "only uniform layers are supported")
        value = value.item()
    return value


def _f32(value: float) -> float:
    # Metadata floats are float32: 1e-5 arrives as 9.99999974e-06. Seven significant
    # digits recover the number the model's authors wrote.
    return float(f"{value:.7g}")


def _check_architecture(meta: dict, path: Path) -> None:
    arch = meta.get("general.architecture")
    if arch is None:
        raise InputError(f"model.name: {path} has no general.architecture in its metadata; cannot tell its model")
    if arch != "llama":
        raise InputError(f"model.name: {path} is a {arch!r} model (general.architecture); only 'llama' "
                         "GGUF files can be converted (Llama, Mistral, SmolLM, TinyLlama...). "
                         "Give the Hugging Face repo of this model instead.")
    experts = _scalar(meta, "llama.expert_count", 0)
    if experts:
        raise InputError(f"model.name: {path} is a mixture-of-experts model ({experts} experts, "
                         "llama.expert_count); it cannot be converted from GGUF")


def _rope_scaling(meta: dict, weights: dict, head_dim: int, rope_theta: float) -> dict | None:
    """Given the metadata and tensors, return mlx-lm's rope_scaling entry (None for
    plain RoPE); raise InputError for a scaling mlx-lm's Llama cannot reproduce."""
    if "rope_freqs.weight" in weights:
        return _llama3_scaling(weights["rope_freqs.weight"], head_dim, rope_theta)
    kind = _scalar(meta, "llama.rope.scaling.type", "none")
    if kind in ("none", None):
        return None
    factor = _scalar(meta, "llama.rope.scaling.factor", 1.0)
    if kind == "linear":
        return {"type": "linear", "factor": _f32(factor)}
    raise InputError(f"model.name: GGUF rope scaling {kind!r} (llama.rope.scaling.type) is not supported; "
                     "supported: none, linear, and Llama 3's rope_freqs")


def _llama3_scaling(freqs: mx.array, head_dim: int, base: float) -> dict:
    """Given Llama 3's per-frequency `rope_freqs` factors, return the rope_scaling
    parameters that reproduce them; raise InputError when none do.

    GGUF keeps only the computed factors; mlx-lm recomputes them from the parameters,
    so we find the parameters (Meta's published low/high factors and 8192-token
    original context) and check that they give the very same table.
    """
    table = np.asarray(freqs.astype(mx.float32)).ravel()
    factor = float(table.max())
    inv = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    for low, high, old_ctx in ((1.0, 4.0, 8192), (1.0, 2.0, 8192), (1.0, 4.0, 4096)):
        want = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < old_ctx / high:
                want.append(1.0)
            elif wavelen > old_ctx / low:
                want.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                want.append(1 / ((1 - smooth) / factor + smooth))
        if len(want) == table.size and np.allclose(want, table, rtol=1e-3):
            return {"rope_type": "llama3", "factor": _f32(factor), "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": old_ctx}
    raise InputError("model.name: the GGUF's rope_freqs table matches no Llama 3 rope scaling that "
                     "mlx-lm can reproduce; give the Hugging Face repo of this model instead")


def model_config(meta: dict, weights: dict) -> dict:
    """Given GGUF metadata and the loaded tensors (GGUF names), return mlx-lm's Llama
    config.json content (without quantization); raise InputError for a shape mlx-lm's
    Llama cannot express."""
    hidden = int(_scalar(meta, "llama.embedding_length", required=True))
    heads = int(_scalar(meta, "llama.attention.head_count", required=True))
    kv_heads = int(_scalar(meta, "llama.attention.head_count_kv", heads))
    head_dim = int(_scalar(meta, "llama.attention.key_length", hidden // heads))
    value_dim = int(_scalar(meta, "llama.attention.value_length", head_dim))
    rope_dim = int(_scalar(meta, "llama.rope.dimension_count", head_dim))
    if value_dim != head_dim or rope_dim != head_dim:
        raise InputError(f"model.name: GGUF key/value/rotary sizes differ ({head_dim}/{value_dim}/{rope_dim}); "
                         "mlx-lm's Llama needs them equal")
    rope_theta = _f32(_scalar(meta, "llama.rope.freq_base", 10000.0))
    vocab = int(weights["token_embd.weight"].shape[0])
    cfg = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(_scalar(meta, "llama.block_count", required=True)),
        "intermediate_size": int(_scalar(meta, "llama.feed_forward_length", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(_scalar(meta, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "rope_traditional": False,  # Q/K rows are un-permuted to Hugging Face order (module docstring)
        "max_position_embeddings": int(_scalar(meta, "llama.context_length", 4096)),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in weights,
        "attention_bias": "blk.0.attn_q.bias" in weights,
        "mlp_bias": "blk.0.ffn_up.bias" in weights,
    }
    scaling = _rope_scaling(meta, weights, head_dim, rope_theta)
    if scaling:
        cfg["rope_scaling"] = scaling
    for key, name in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        if key in meta:
            cfg[name] = int(_scalar(meta, key))
    return cfg


# -------------------------------------------------------------------------- tensors

def mlx_name(gguf_name: str) -> str | None:
    """Given a GGUF tensor name (`blk.3.attn_q.weight`, `token_embd.scales`), return
    the mlx-lm Llama parameter name, None for a tensor the MLX model does not need;
    raise InputError for a tensor this converter does not know."""
    base, _, suffix = gguf_name.rpartition(".")
    if base == "rope_freqs":
        return None  # folded into config.json's rope_scaling
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        if parts[2] in _IGNORED_LAYER_TENSORS:
            return None
        if parts[2] in _LAYER_NAMES:
            return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    raise InputError(f"model.name: the GGUF tensor {gguf_name!r} has no counterpart in mlx-lm's Llama "
                     "(an unsupported llama variant?)")


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Given a Q or K tensor in llama.cpp's interleaved rotary order (rows = output
    features; a packed weight, its scales, biases or a bias vector) and the number of
    heads it spans, return it in Hugging Face's rotate-half row order.

    Inverse of llama.cpp's convert `permute`: reshape(h, 2, d/2).swapaxes(1, 2).
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _quantized_bases(weights: dict) -> set[str]:
    return {k[: -len(".scales")] for k in weights if k.endswith(".scales")}


def map_weights(weights: dict, cfg: dict) -> tuple[dict, dict]:
    """Given mx.load's GGUF tensors and the model config, return (mlx-lm weights,
    {module path: {"group_size", "bits"}} for the modules that stay quantized).

    Float tensors come out in one dtype, that of the model's matrices (float16 unless
    the file is all float32), as `mlx_lm.convert` writes them: the F32 norm vectors of
    a quantized file would otherwise lift every activation to float32.
    """
    packed = _quantized_bases(weights)
    matrix_dtypes = {v.dtype for k, v in weights.items()
                     if v.ndim == 2 and k.rpartition(".")[0] not in packed and mx.issubdtype(v.dtype, mx.floating)}
    # MLX hands BF16 and dequantized K-quants over as float16 already.
    float_dtype = mx.float32 if matrix_dtypes == {mx.float32} else mx.float16
    out, quant = {}, {}
    for name, value in weights.items():
        target = mlx_name(name)
        if target is None:
            continue
        base = name.rpartition(".")[0]
        if mx.issubdtype(value.dtype, mx.floating) and value.dtype != float_dtype and base not in packed:
            value = value.astype(float_dtype)
        if base.endswith(".attn_q"):
            value = unpermute_rows(value, cfg["num_attention_heads"])
        elif base.endswith(".attn_k"):
            value = unpermute_rows(value, cfg["num_key_value_heads"])
        out[target] = value
        if base in packed and name.endswith(".weight"):
            in_dims = weights[f"{base}.scales"].shape[-1] * GROUP_SIZE
            bits = value.shape[-1] * 32 // in_dims
            quant[target[: -len(".weight")]] = {"group_size": GROUP_SIZE, "bits": bits}
    return out, quant


def requantize(weights: dict, quant: dict, bits: int) -> int:
    """Given mlx-lm weights, the quantized-module table and 4 or 8, quantize in place
    every float matrix of a linear or embedding layer (group 64, or 32 where 64 does not
    divide the row) and return how many were quantized. Modules the GGUF already stores
    packed keep their own format: unpacking and packing again only adds error."""
    done = 0
    for name in [k for k in weights if k.endswith(".weight")]:
        module = name[: -len(".weight")]
        leaf = module.rpartition(".")[2]
        w = weights[name]
        if module in quant or w.ndim != 2 or not (leaf.endswith("_proj") or leaf in ("embed_tokens", "lm_head")):
            continue
        group = next((g for g in REQUANT_GROUP_SIZES if w.shape[1] % g == 0), None)
        if group is None:
            continue  # mx.quantize needs whole groups; such a layer stays float
        wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
        weights[name], weights[f"{module}.scales"], weights[f"{module}.biases"] = wq, scales, biases
        quant[module] = {"group_size": group, "bits": bits}
        done += 1
    return done


def quantization_config(quant: dict) -> dict | None:
    """Given {module: {"group_size", "bits"}}, return mlx-lm's config.json
    `quantization` entry: the most common setting as the default plus one override per
    module that differs (e.g. an 8-bit embedding among 4-bit linears), which mlx-lm's
    loader applies per module path; None when nothing is quantized."""
    if not quant:
        return None
    common = Counter((q["group_size"], q["bits"]) for q in quant.values()).most_common(1)[0][0]
    out: dict = {"group_size": common[0], "bits": common[1]}
    for module, q in sorted(quant.items()):
        if (q["group_size"], q["bits"]) != common:
            out[module] = dict(q)
    return out


# ------------------------------------------------------------------------ tokenizer

def _token_list(meta: dict, key: str) -> list:
    value = meta.get(key)
    if value is None:
        return []
    return value.tolist() if isinstance(value, mx.array) else list(value)


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_DIGITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _PRE_LLAMA3:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return byte_level


def generate_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Given a SentencePiece vocabulary and its scores, return BPE merges in priority
    order: every split of a piece into two pieces of the vocabulary, ranked by the
    merged piece's score (as Hugging Face's converter does for Llama tokenizers)."""
    merges = []
    for piece, pid in vocab.items():
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((left, right, scores[pid]) for left, right in local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def build_tokenizer(meta: dict) -> tuple[object, dict, dict]:
    """Given GGUF metadata, return (tokenizers.Tokenizer, tokenizer_config.json dict,
    special_tokens_map.json dict); raise InputError for a tokenizer model other than
    "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE with byte fallback)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    tokens = _token_list(meta, "tokenizer.ggml.tokens")
    if not tokens:
        raise InputError("model.name: the GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    types = _token_list(meta, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a repeated token keeps its first id, as llama.cpp does
    merges = [tuple(m.split(" ")) for m in _token_list(meta, "tokenizer.ggml.merges")]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise InputError(f"model.name: GGUF merges must be 'left right' pairs; found {bad[:3]}")

    def token_id(key: str) -> int | None:
        value = _scalar(meta, key)
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos, eos = token_id("tokenizer.ggml.bos_token_id"), token_id("tokenizer.ggml.eos_token_id")
    pad, unk = token_id("tokenizer.ggml.padding_token_id"), token_id("tokenizer.ggml.unknown_token_id")

    if kind == "gpt2":
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
        tok.decoder = decoders.ByteLevel()
        add_bos_default, prefix_space = False, False
    elif kind == "llama":
        scores = _token_list(meta, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        if not merges:
            merges = generate_merges(vocab, scores)
        unk_token = tokens[unk] if unk is not None else None
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True))
        prefix_space = bool(_scalar(meta, "tokenizer.ggml.add_space_prefix", True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first" if prefix_space else "never", split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix_space:
            steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(steps)
        add_bos_default = True
    else:
        raise InputError(f"model.name: GGUF tokenizer model {kind!r} (tokenizer.ggml.model) is not supported; "
                         "supported: 'gpt2' (byte-level BPE) and 'llama' (SentencePiece)")

    # Control and unknown tokens are special (matched whole, skipped by decode(skip_special_tokens));
    # user-defined ones are matched whole but decode as text.
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN) and vocab.get(tokens[i]) == i]
    special_ids = {i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN)}
    for i in (bos, eos, pad, unk):
        if i is not None and i not in special_ids:
            special.append(AddedToken(tokens[i], special=True, normalized=False))
            special_ids.add(i)
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == TOKEN_USER_DEFINED and vocab.get(tokens[i]) == i]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    add_bos = bool(_scalar(meta, "tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(_scalar(meta, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    single, pairs, ids = "$A", "$A $B:1", []
    if add_bos:
        single, pairs = f"{tokens[bos]} {single}", f"{tokens[bos]} $A {tokens[bos]}:1 $B:1"
        ids.append((tokens[bos], bos))
    if add_eos:
        single, pairs = f"{single} {tokens[eos]}", f"{pairs} {tokens[eos]}:1"
        ids.append((tokens[eos], eos))
    if ids:
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pairs, special_tokens=ids)
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    named = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    special_map = {k: tokens[v] for k, v in named.items() if v is not None}
    extra = sorted(special_ids - {v for v in named.values() if v is not None})
    if extra:
        special_map["additional_special_tokens"] = [tokens[i] for i in extra]
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: v for k, v in special_map.items() if k != "additional_special_tokens"},
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_scalar(meta, "llama.context_length", 4096)),
    }
    if "additional_special_tokens" in special_map:
        tok_config["additional_special_tokens"] = special_map["additional_special_tokens"]
    if isinstance(meta.get("tokenizer.chat_template"), str):
        tok_config["chat_template"] = meta["tokenizer.chat_template"]
    return tok, tok_config, special_map


# --------------------------------------------------------------------------- output

def _write_json(path: Path, obj: dict) -> None:
    write_bytes_durable(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def _write_weights(tmp: Path, weights: dict) -> int:
    """Given a directory and mlx-lm weights, write model*.safetensors shards (and an
    index when there are several), user-only and fsynced; return the bytes written."""
    shards, current, size = [], {}, 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = weights[name]
        size += nbytes
    shards.append(current)
    files = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total, index = 0, {}
    for fname, shard in zip(files, shards):
        path = tmp / fname
        mx.save_safetensors(str(path), shard, metadata={"format": "mlx"})
        path.chmod(0o600)  # save_safetensors leaves the umask's mode; model files are user-only
        fsync_file(path)
        total += path.stat().st_size
        index.update({name: fname for name in shard})
    if len(files) > 1:
        _write_json(tmp / "model.safetensors.index.json",
                    {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": index})
    return total


def convert_gguf(gguf_path: Path, out_dir: Path, quantize_bits: int = 0, log=None) -> dict:
    """Given a local llama-architecture .gguf file, an output directory that does not
    exist yet (or is empty) and 0, 4 or 8, write an `mlx_model/`-style directory there
    (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json) and return a summary {path, architecture, tensor_types,
    quantization, bytes, gguf_bytes, seconds}.

    Q4_0/Q4_1/Q8_0 tensors stay packed; `quantize_bits` 4 or 8 also quantizes the
    float matrices (F16/BF16, and K-quants, which MLX hands over dequantized), 0 keeps
    them float. The directory appears whole or not at all (built in a `.tmp-` sibling,
    renamed into place). Raise InputError for a file that is not GGUF, a non-llama
    architecture, tensor types or a tokenizer MLX cannot use, or an occupied out_dir.
    """
    started = time.monotonic()
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if quantize_bits not in (0, 4, 8):
        raise InputError(f"model.quantize_bits: {quantize_bits} is not allowed; use 0 (keep), 4 or 8")
    if not gguf_path.is_file():
        raise InputError(f"model.name: {gguf_path} does not exist or is not a file")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise InputError(f"model.path: {out_dir} already exists and is not empty; remove it to convert again")

    types = read_tensor_types(gguf_path)
    weights, meta = _load(gguf_path, types)
    _check_architecture(meta, gguf_path)
    if "token_embd.weight" not in weights:
        raise InputError(f"model.name: {gguf_path} has no token_embd.weight tensor")
    cfg = model_config(meta, weights)
    tokenizer, tok_config, special_map = build_tokenizer(meta)
    if tokenizer.get_vocab_size() > cfg["vocab_size"]:
        raise InputError(f"model.name: the GGUF tokenizer has {tokenizer.get_vocab_size()} tokens but the "
                         f"embedding only {cfg['vocab_size']} rows")
    mapped, quant = map_weights(weights, cfg)
    del weights
    requantized = requantize(mapped, quant, quantize_bits) if quantize_bits else 0
    if (q := quantization_config(quant)) is not None:
        cfg["quantization"] = q

    ensure_private_dir(out_dir.parent)
    tmp = out_dir.parent / f"{TMP_PREFIX}{out_dir.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed conversion of ours
    try:
        tmp.mkdir(mode=0o700)
        weight_bytes = _write_weights(tmp, mapped)
        _write_json(tmp / "config.json", cfg)
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer.json").chmod(0o600)
        fsync_file(tmp / "tokenizer.json")
        _write_json(tmp / "tokenizer_config.json", tok_config)
        _write_json(tmp / "special_tokens_map.json", special_map)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory everywhere
        if not publish_dir(tmp, out_dir):
            raise InputError(f"model.path: {out_dir} appeared while converting; another conversion won")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    summary = {
        "path": str(out_dir),
        "architecture": "llama",
        "tensor_types": dict(sorted(Counter(types.values()).items())),
        "quantization": cfg.get("quantization"),
        "requantized": requantized,
        "bytes": weight_bytes,
        "gguf_bytes": gguf_path.stat().st_size,
        "seconds": round(time.monotonic() - started, 2),
    }
    if log is not None:
        log.info("model.convert.gguf", source=str(gguf_path), **summary)
    return summary
