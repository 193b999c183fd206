"""`export --format gguf`: the LoRA adapters as a llama.cpp LoRA-adapter GGUF, with an
Ollama Modelfile beside it.

The file is what llama.cpp's own `convert_lora_to_gguf.py` writes for a PEFT adapter of a
Llama-architecture model (read from llama.cpp's converter and `src/llama-adapter.cpp`),
through ggml's `gguf` package:

- metadata: `general.architecture` = "llama", `general.type` = "adapter",
  `adapter.type` = "lora", `adapter.lora.alpha` (float32). llama.cpp scales each pair by
  alpha / rank, so alpha = mlx-lm's scale x rank makes the two compute the same delta;
- tensors `blk.<i>.<attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down>.weight.lora_a`
  (numpy shape (rank, in): PEFT's lora_A = mlx-lm's lora_a transposed) and `.lora_b`
  (out, rank);
- Q and K: llama.cpp's converter permutes the rows (output features) of `attn_q` and
  `attn_k` (per head, the two rotary halves interleaved), so the adapters' `lora_b` rows
  get the same permutation, with the query heads for Q and the key/value heads for K.
  The MLX model always holds Hugging Face's row order (`convert` un-permutes a GGUF
  source), so this holds whatever the base came from.

Only the `llama` architecture (DeepSeek-Math-7B, SmolLM2, Llama 2/3 ...) is written;
other architectures name their tensors and rotate differently and are refused (78).
The adapter must be applied to a GGUF of the same base model: quantizing that base
(Q4_K_M in Ollama) changes the function the adapter was trained against, a little.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mathlora_checkpoints.fsio import seal_tree, write_bytes_durable
from mathlora_daemon.errors import InputError
from mathlora_daemon.modelio.export import (
    check_replaceable,
    new_tmp_dir,
    peft_config,
    peft_tensors,
    publish_replacing,
    read_mlx_adapters,
)

ADAPTER_FILE = "adapter.gguf"
MODELFILE = "Modelfile"
ARCHITECTURES = ("llama",)
OUTTYPES = ("f32", "f16")
# mlx-lm / Hugging Face module names -> llama.cpp's tensor names (gguf-py's tensor map).
LLAMA_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_permute(rows, n_head: int):
    """llama.cpp's `LlamaModel.permute` on a matrix's rows: per head, interleave the two
    halves the rotary embedding pairs up (numpy array (out, ...) -> same shape)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _model_config(model_dir: Path) -> dict:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"model.path: {model_dir / 'config.json'} cannot be read ({exc}); the GGUF export needs "
                         "the base model's architecture") from None
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise InputError(f"--format gguf: the base model's architecture is {arch!r} ({model_dir / 'config.json'}); "
                         f"llama.cpp LoRA adapters are written for {', '.join(ARCHITECTURES)} bases only "
                         "(DeepSeek-Math-7B, SmolLM2, Llama). Use --format peft for other models.")
    return config


def _open_base_gguf(base_gguf: Path, config: dict):
    """Open a base GGUF: check it is the same architecture and head layout as the MLX
    model, and return (its GGUFReader, {tensor name: numpy shape} to check every pair
    against)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(base_gguf))
    except Exception as exc:  # gguf raises ValueError, struct.error, OSError ... for a bad file
        raise InputError(f"--base-gguf {base_gguf}: not a readable GGUF file ({exc})") from None

    def field(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise InputError(f"--base-gguf {base_gguf}: architecture {arch!r}, expected 'llama'")
    heads, kv = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    want = (config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"]))
    if (heads, kv if kv is not None else heads) != want:
        raise InputError(f"--base-gguf {base_gguf}: {heads} query / {kv} key-value heads, the adapters' base has "
                         f"{want[0]} / {want[1]}: not the same model")
    return reader, {t.name: tuple(int(x) for x in reversed(list(t.shape))) for t in reader.tensors}


def gguf_tensors(weights: dict, config: dict) -> tuple[dict, int, list[str], list[int]]:
    """Given mlx-lm LoRA weights and the model's config, return ({gguf tensor name:
    float32 numpy array}, rank, leaf names, layers); raise InputError for a module
    llama.cpp has no tensor for."""
    import mlx.core as mx
    import numpy as np

    peft, rank, leaves, layers = peft_tensors(weights)
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads", n_head))
    out = {}
    for name, value in peft.items():
        # base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
        path, ab = name[len("base_model.model."):].rsplit(".lora_", 1)
        ab = ab.split(".")[0].lower()
        prefix, _, module = path.partition(".layers.")
        layer, _, leaf_path = module.partition(".")
        if leaf_path not in LLAMA_NAMES:
            raise InputError(f"adapters: {path} has no llama.cpp tensor (GGUF adapters cover "
                             f"{', '.join(LLAMA_NAMES)}); use --format peft")
        array = np.array(value.astype(mx.float32))  # bf16/f16 adapters too
        if ab == "b" and leaf_path == "self_attn.q_proj":
            array = llama_permute(array, n_head)
        elif ab == "b" and leaf_path == "self_attn.k_proj":
            array = llama_permute(array, n_kv)
        out[f"blk.{int(layer)}.{LLAMA_NAMES[leaf_path]}.weight.lora_{ab}"] = np.ascontiguousarray(array)
    return out, rank, leaves, layers


def is_gguf_export(path: Path) -> bool:
    """Whether a directory is a previous GGUF export (so it may be replaced)."""
    path = Path(path)
    return (path / ADAPTER_FILE).is_file() and set(p.name for p in path.iterdir()) <= {ADAPTER_FILE, MODELFILE,
                                                                                        "README.md"}


def _adapter(adapter_dir: Path, model_dir: Path) -> tuple[dict, int, float, list[str], dict]:
    """Read the adapters for a llama base: (gguf-named tensors, rank, alpha, leaves, config)."""
    config = _model_config(model_dir)
    mlx_config, weights = read_mlx_adapters(adapter_dir)
    if not weights:
        raise InputError(f"--adapter-path {adapter_dir}: adapters.safetensors holds no tensors")
    tensors, rank, leaves, layers = gguf_tensors(weights, config)
    alpha = float(peft_config(mlx_config, rank, leaves, layers, "")["lora_alpha"])
    return tensors, rank, alpha, leaves, config


def _check_against(tensors: dict, rank: int, shapes: dict, base_gguf: Path) -> None:
    for name, array in tensors.items():
        base = name.rsplit(".lora_", 1)[0]
        if base not in shapes:
            raise InputError(f"--base-gguf {base_gguf}: has no tensor {base}")
        out_f, in_f = shapes[base][:2]
        want = (rank, in_f) if name.endswith("lora_a") else (out_f, rank)
        if array.shape != want:
            raise InputError(f"--base-gguf {base_gguf}: {name} is {array.shape}, the base tensor needs {want}")


def export_gguf(adapter_dir: Path, model_dir: Path, out_dir: Path, outtype: str = "f32",
                base_gguf: Path | None = None, modelfile: str | None = None) -> dict:
    """Given mlx-lm adapters, the MLX base model they were trained on and an output
    directory, write `adapter.gguf` (and `Modelfile` when given its text) there, whole or
    not at all; return a summary {path, file, tensors, rank, alpha, bytes, outtype,
    target_modules}. With `base_gguf`, every pair is checked against that file's tensors."""
    import gguf
    import numpy as np

    if outtype not in OUTTYPES:
        raise InputError(f"--outtype {outtype}: expected one of {', '.join(OUTTYPES)}")
    adapter_dir, model_dir, out_dir = Path(adapter_dir), Path(model_dir), Path(out_dir)
    tensors, rank, alpha, leaves, config = _adapter(adapter_dir, model_dir)
    if base_gguf is not None:
        _check_against(tensors, rank, _open_base_gguf(Path(base_gguf), config)[1], Path(base_gguf))
    check_replaceable(out_dir, is_gguf_export, "a previous GGUF export")
    tmp = new_tmp_dir(out_dir)
    try:
        writer = gguf.GGUFWriter(str(tmp / ADAPTER_FILE), "llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(f"{adapter_dir.resolve().parent.name} LoRA")
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        dtype = np.float32 if outtype == "f32" else np.float16
        for name in sorted(tensors, key=lambda n: (int(n.split(".")[1]), n)):
            writer.add_tensor(name, tensors[name].astype(dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if modelfile is not None:
            write_bytes_durable(tmp / MODELFILE, modelfile.encode("utf-8"))
        seal_tree(tmp)
        size = (tmp / ADAPTER_FILE).stat().st_size
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_replacing(tmp, out_dir, is_gguf_export, "a previous GGUF export")
    return {"path": str(out_dir), "file": str(out_dir / ADAPTER_FILE), "tensors": len(tensors), "rank": rank,
            "alpha": alpha, "bytes": size, "outtype": outtype, "target_modules": leaves}


# --- a fused GGUF ---------------------------------------------------------------------------

def check_gguf_fusable(adapter_dir: Path, model_dir: Path, base_gguf: Path) -> None:
    """Raise InputError, before any heavy work, unless the adapters fit the base GGUF."""
    if not Path(base_gguf).is_file():
        raise InputError(f"--base-gguf {base_gguf}: no such file")
    tensors, rank, _alpha, _leaves, config = _adapter(Path(adapter_dir), Path(model_dir))
    _check_against(tensors, rank, _open_base_gguf(Path(base_gguf), config)[1], Path(base_gguf))


def copy_gguf_metadata(reader, writer, replace: dict | None = None) -> None:
    """Copy every key of a GGUFReader's file to a GGUFWriter with its own types (arrays
    keep their element type), the architecture (the writer's own) and the reader's
    `GGUF.*` header fields aside; `replace` gives new values for some keys."""
    import gguf

    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = (replace or {}).get(field.name, field.contents())
        writer.add_key_value(field.name, value, vtype, sub_type=sub)


def fuse_gguf(adapter_dir: Path, model_dir: Path, base_gguf: Path, out_file: Path) -> dict:
    """Write the base GGUF with the adapters merged in: every tensor the adapters change
    becomes W + alpha / rank * B @ A (llama.cpp's own runtime formula, on the base file's
    dequantized values) in the base tensor's float type (float16 when it was quantized);
    everything else (tokenizer, metadata, the other tensors, quantized or not) is copied
    as it is. Return {tensors_fused, tensors, bytes, types}."""
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    tensors, rank, alpha, _leaves, config = _adapter(Path(adapter_dir), Path(model_dir))
    reader, shapes = _open_base_gguf(Path(base_gguf), config)
    _check_against(tensors, rank, shapes, Path(base_gguf))
    writer = gguf.GGUFWriter(str(out_file), "llama")
    copy_gguf_metadata(reader, writer)
    floats = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
    fused, types = 0, {}
    for t in reader.tensors:
        if f"{t.name}.lora_a" in tensors:
            shape = tuple(reversed([int(x) for x in t.shape]))  # numpy order: (out, in)
            w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
            delta = tensors[f"{t.name}.lora_b"] @ tensors[f"{t.name}.lora_a"]
            dtype = floats.get(t.tensor_type, np.float16)
            writer.add_tensor(t.name, (w + (alpha / rank) * delta).astype(dtype))
            fused += 1
            types[t.name] = np.dtype(dtype).name
        else:
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors_fused": fused, "tensors": len(reader.tensors), "bytes": Path(out_file).stat().st_size,
            "fused_types": sorted(set(types.values()))}


# --- Ollama -------------------------------------------------------------------------------

PLACEHOLDER = "\x00PROMPT\x00"


def ollama_template(fmt, markers: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """Given the adapters' PromptFormat (bound to the model's tokenizer) and, for the
    tutor format, the text markers generation stops at, return (an Ollama TEMPLATE that
    renders exactly the prompt training used, with `{{ .Prompt }}` for the problem, and
    the stop sequences)."""
    text = fmt.prompt_text(PLACEHOLDER)
    tok = fmt.tokenizer
    bos = getattr(tok, "bos_token", None)
    if bos and text.startswith(bos):
        text = text[len(bos):]  # llama.cpp adds BOS itself (the GGUF's add_bos_token)
    template = text.replace(PLACEHOLDER, "{{ .Prompt }}")
    stops = [s for s in (getattr(tok, "eos_token", None),) if s]
    if fmt.template == "tutor":
        stops += [m.strip() for m in markers]
    return template, list(dict.fromkeys(stops))


def modelfile_text(base: str, template: str, stops: list[str], note: str = "") -> str:
    """An Ollama Modelfile: FROM the base GGUF, ADAPTER the exported adapter, the
    training prompt format as TEMPLATE, its stop sequences, greedy decoding."""
    if '"""' in template:
        raise InputError("the prompt format contains three double quotes, which a Modelfile cannot hold")
    lines = [f"# Written by mathlora-daemon export --format gguf.{(' ' + note) if note else ''}",
             f"FROM {base}", f"ADAPTER ./{ADAPTER_FILE}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    lines += ["PARAMETER temperature 0", ""]
    return "\n".join(lines)
