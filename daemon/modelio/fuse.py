"""`fuse`: merge the run's LoRA adapters into the base model and save a standalone model.

Uses mlx-lm's own machinery (what `mlx_lm.fuse` does): load the base with the adapters,
replace every LoRA layer by `layer.fuse()` (W + scale * B^T A^T, in W's dtype), optionally
dequantize, and save with `mlx_lm.utils.save_model` and `save_config`. mlx-lm saves Llama
weights under Hugging Face names, so the directory loads with `mlx_lm.utils.load` and, for
an unquantized base (or with `--dequantize`), with
`transformers.AutoModelForCausalLM.from_pretrained`. The tokenizer and other side files
(generation_config.json, chat templates) are copied from the base model as they are.
The directory is built in a temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mathlora_checkpoints.fsio import seal_tree, write_bytes_durable
from mathlora_daemon.errors import InputError
from mathlora_daemon.modelio.export import check_replaceable, new_tmp_dir, publish_replacing, writing_output
from mathlora_daemon.modelio.loading import check_adapter_dir, check_model_dir
from mathlora_daemon.rundir import ADAPTER_CONFIG

# Files of the base model directory that the fused model must not inherit: the weights
# (replaced), config.json (rewritten) and the model card (rewritten).
_SKIP_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".npz", ".index.json")
_SKIP_NAMES = {"config.json", "README.md"}
CARD_MARK = "mathlora-daemon merged"  # in the model card: lets a re-run replace its own output, nothing else


FUSED_GGUF = "model.gguf"


def fuse_model(model_dir: Path, adapter_dir: Path, out_dir: Path, dequantize: bool = False,
               base_gguf: Path | None = None) -> dict:
    """Given an MLX model directory, an mlx-lm adapters directory and an output directory,
    write the base model with the adapters merged in (files 0600, whole or absent) and
    return a summary {path, fused_modules, dtype, quantized, dequantized,
    transformers_loadable}; raise InputError for a missing model or adapters, adapters
    that do not fit the model, or an output path that is not a previous fused model."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import dequantize_model, load, save_config, save_model

    model_dir, adapter_dir, out_dir = Path(model_dir), Path(adapter_dir), Path(out_dir)
    check_model_dir(model_dir)
    check_adapter_dir(adapter_dir)
    check_replaceable(out_dir, is_fused_model, "a previous fused model")
    if base_gguf is not None:
        from mathlora_daemon.modelio.gguf_export import check_gguf_fusable

        check_gguf_fusable(adapter_dir, model_dir, Path(base_gguf))
    try:
        # Not load_model: fit_to_device's float32 scales would be saved into the fused model.
        model, _tokenizer, config = load(str(model_dir), adapter_path=str(adapter_dir), return_config=True)
    except Exception as exc:  # mlx-lm raises many types for adapters that do not fit the model
        raise InputError(f"--adapter-path {adapter_dir} does not fit the model in {model_dir}: {exc}") from None

    fused = [(name, module.fuse(dequantize=dequantize)) for name, module in model.named_modules()
             if hasattr(module, "fuse")]
    if not fused:
        raise InputError(f"--adapter-path {adapter_dir}: no LoRA layers to fuse (a full fine-tune is a model already)")
    model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    quantized = "quantization" in config
    if "tie_word_embeddings" not in config:
        # mlx-lm's Llama ties by default, transformers' does not: say what the weights hold,
        # or transformers would give a tied model a random lm_head.
        config["tie_word_embeddings"] = not any(k.startswith("lm_head.") for k in weights)
    dtype = str(weights["model.embed_tokens.weight"].dtype if "model.embed_tokens.weight" in weights
                else next(iter(weights.values())).dtype).replace("mlx.core.", "")
    del weights

    with writing_output(out_dir):  # a full disk: exit 75 naming --out, nothing left half-written
        tmp = new_tmp_dir(out_dir)
        try:
            save_model(tmp, model, donate_model=False)
            save_config(config, config_path=tmp / "config.json")
            for src in sorted(model_dir.iterdir()):
                if src.is_file() and src.name not in _SKIP_NAMES and not src.name.endswith(_SKIP_SUFFIXES):
                    shutil.copyfile(src, tmp / src.name)  # the tokenizer exactly as training saw it
            gguf_info = None
            if base_gguf is not None:
                from mathlora_daemon.modelio.gguf_export import fuse_gguf

                gguf_info = fuse_gguf(adapter_dir, model_dir, Path(base_gguf), tmp / FUSED_GGUF)
            write_bytes_durable(tmp / "README.md", _model_card(model_dir, adapter_dir, len(fused),
                                                               quantized).encode())
            seal_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_replacing(tmp, out_dir, is_fused_model, "a previous fused model")
    return {"path": str(out_dir), "fused_modules": len(fused), "dtype": dtype, "quantized": quantized,
            "dequantized": dequantize, "transformers_loadable": not quantized,
            "gguf": {**gguf_info, "path": str(out_dir / FUSED_GGUF)} if gguf_info else None}


def is_fused_model(path: Path) -> bool:
    """Given a directory, return True when it holds a model written by `fuse`."""
    try:
        return CARD_MARK in (Path(path) / "README.md").read_text(encoding="utf-8")
    except OSError:
        return False


def _model_card(model_dir: Path, adapter_dir: Path, modules: int, quantized: bool) -> str:
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    base = config.get("model", str(model_dir))
    note = ("MLX-quantized: loads with mlx-lm only (fuse with --dequantize for transformers)." if quantized
            else "Loads with `mlx_lm.utils.load` and `transformers.AutoModelForCausalLM.from_pretrained`.")
    return (f"---\nbase_model: {json.dumps(base)}\nlibrary_name: mlx\ntags: [mlx, lora, mathlora-daemon]\n---\n\n"
            f"# {base} with fused LoRA\n\n{CARD_MARK} LoRA adapters (rank "
            f"{config.get('lora_parameters', {}).get('rank')}, {modules} modules) into the base weights. {note}\n")
