"""`export --format peft`: the run's mlx-lm adapters as a Hugging Face PEFT LoRA adapter.

mlx-lm computes y = x W^T + scale * (x A) B with A of shape (in, r) and B of shape (r, out);
PEFT computes y = x W^T + (lora_alpha / r) * B'(A'(x)) with lora_A.weight (r, in) = A^T and
lora_B.weight (out, r) = B^T. So the export transposes both matrices, renames
`model.layers.N.<module>.lora_a` to `base_model.model.model.layers.N.<module>.lora_A.weight`
and writes `lora_alpha = scale * r`, which gives PEFT the very scale mlx-lm trained with
(even for adapters whose config has no `lora_alpha`). Dtypes are kept (bf16 stays bf16).

The output directory (`adapter_model.safetensors`, `adapter_config.json`, `README.md`) is
built in a temporary sibling and renamed into place, so it is whole or absent. The
directory helpers here are shared with `fuse`, and so is `writing_output`, which turns a
failed write (a full disk: MLX raises RuntimeError for it, not OSError) into the
contract's temporary failure naming the output path.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import psutil

from mathlora_checkpoints.fsio import (
    DIR_MODE,
    TMP_PREFIX,
    ensure_private_dir,
    publish_dir,
    seal_tree,
    write_bytes_durable,
)
from mathlora_daemon.errors import InputError, TemporaryFailure
from mathlora_daemon.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, RunDir

FORMATS = ("peft", "gguf")
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
# mlx-lm adapter keys: <module path>.lora_a / .lora_b, e.g. model.layers.3.self_attn.q_proj.lora_a
_KEY_RE = re.compile(r"^(?P<module>.*\.layers\.(?P<layer>\d+)\..+)\.lora_(?P<ab>[ab])$")


def new_tmp_dir(final: Path) -> Path:
    """Given the final output directory, create (user-only) and return an empty temporary
    sibling for building it; leftovers of dead processes are removed first."""
    final = Path(final)
    parent = ensure_private_dir(final.parent)
    for leftover in parent.glob(f"{TMP_PREFIX}{final.name}.*"):
        pid = leftover.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = parent / f"{TMP_PREFIX}{final.name}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=DIR_MODE)
    return tmp


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# MLX's writers (mx.save_safetensors, which mlx-lm's save_model uses) report a short
# write as RuntimeError("[write] Unable to write N bytes to file."), without an errno.
_MLX_WRITE_RE = re.compile(r"(?i)unable to write (\d+) bytes|\[write\]")


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def write_failure(exc: BaseException, out_dir: Path, option: str = "--out") -> TemporaryFailure | None:
    """Given an exception raised while writing an output directory, return the temporary
    failure (exit 75) it is when the disk is full or a write failed, naming the option,
    the output path and the reason in one line; None for any other exception."""
    out_dir = Path(out_dir)
    free = _free_bytes(out_dir.parent)
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        reason = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    elif isinstance(exc, RuntimeError) and _MLX_WRITE_RE.search(str(exc)):
        match = re.search(r"(\d+) bytes", str(exc))
        needed = int(match.group(1)) if match else 1 << 20
        if free is not None and free >= needed:
            reason = f"a write failed ({exc})"
        else:
            reason = "no space left on device"
    else:
        return None
    where = f" ({free} bytes free there)" if free is not None else ""
    return TemporaryFailure(f"{option} {out_dir}: {reason}{where}; the partial output was removed: free some "
                            "space and run it again")


@contextmanager
def writing_output(out_dir: Path, option: str = "--out"):
    """Around the code that builds and publishes an output directory: a full disk (OSError
    ENOSPC/EDQUOT, or MLX's RuntimeError for a short write) becomes `write_failure`'s
    TemporaryFailure, and a parent directory created for the output is removed again
    when it is left empty. The temporary directory itself is the builder's to remove."""
    out_dir = Path(out_dir)
    made = [d for d in (out_dir.parent, *out_dir.parent.parents) if not d.exists()]
    try:
        yield
    except (OSError, RuntimeError) as exc:
        for directory in made:  # innermost first; only the empty ones this command created
            try:
                directory.rmdir()
            except OSError:
                break
        error = write_failure(exc, out_dir, option)
        if error is None:
            raise
        raise error from None


def check_replaceable(final: Path, is_previous, what: str) -> None:
    """Given an output directory, a predicate recognising a previous output and its
    description, return when the path is free, empty or a previous output; raise
    InputError otherwise (called before heavy work, and again before replacing)."""
    final = Path(final)
    if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not is_previous(final))):
        raise InputError(f"{final} exists and is not {what}; choose another output path or remove it")


def publish_replacing(tmp: Path, final: Path, is_previous, what: str) -> None:
    """Given a sealed temporary directory, its final path, a predicate that recognises a
    previous output of the same command and a description of it, rename tmp into place.

    An existing `final` is replaced only when it is empty or `is_previous(final)`, so a
    mistyped --out (the base model, the mlx adapters) is never deleted; raise InputError
    otherwise (the temporary copy is removed)."""
    final = Path(final)
    old = None
    try:
        check_replaceable(final, is_previous, what)
    except InputError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}{final.name}.old.{os.getpid()}")
        os.rename(final, old)
    try:
        publish_dir(tmp, final)
    except BaseException:
        if old is not None and not final.exists():
            os.rename(old, final)  # put the previous output back rather than leave nothing
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_peft_export(path: Path) -> bool:
    """Given a directory, return True when it holds a PEFT adapter (not mlx-lm adapters)."""
    try:
        return "peft_type" in json.loads((Path(path) / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


# --- the conversion ------------------------------------------------------------------------

def read_mlx_adapters(adapter_dir: Path) -> tuple[dict, dict]:
    """Given an mlx-lm adapters directory, return (its adapter_config dict, its weights as
    MLX arrays); raise InputError when either file is missing or unreadable."""
    import mlx.core as mx

    from mathlora_daemon.modelio.loading import check_adapter_dir

    check_adapter_dir(adapter_dir)
    weights_path, config_path = adapter_dir / ADAPTER_WEIGHTS, adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        weights = mx.load(str(weights_path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"--adapter-path {adapter_dir}: unreadable adapters: {exc}") from None
    return config, weights


def peft_tensors(weights: dict) -> tuple[dict, int, list[str], list[int]]:
    """Given mlx-lm LoRA weights ({...lora_a: (in, r), ...lora_b: (r, out)}), return
    (PEFT-named weights with A and B transposed, the rank, the sorted leaf module names,
    the sorted layer indices); raise InputError for a key that is not a LoRA matrix, a
    module without both matrices, or ranks that differ between modules."""
    import mlx.core as mx

    out, ranks, leaves, layers, seen = {}, set(), set(), set(), {}
    for key, value in weights.items():
        m = _KEY_RE.match(key)
        if m is None or value.ndim != 2:
            raise InputError(f"adapters: {key} {tuple(value.shape)} is not a LoRA matrix of a layer "
                             "(only LoRA adapters can be exported to PEFT; DoRA and full fine-tunes cannot)")
        module, ab = m.group("module"), m.group("ab")
        ranks.add(value.shape[1] if ab == "a" else value.shape[0])
        leaves.add(module.rsplit(".", 1)[-1])
        layers.add(int(m.group("layer")))
        seen.setdefault(module, set()).add(ab)
        # PEFT stores nn.Linear weights, (out, in): lora_A maps in -> r, lora_B maps r -> out.
        # mx.contiguous: safetensors stores the bytes in row-major order of the new shape.
        out[f"base_model.model.{module}.lora_{ab.upper()}.weight"] = mx.contiguous(value.T)
    half = sorted(module for module, abs_ in seen.items() if abs_ != {"a", "b"})
    if half:
        raise InputError(f"adapters: {half[0]} has only one of lora_a/lora_b")
    if len(ranks) != 1:
        raise InputError(f"adapters: modules have different ranks {sorted(ranks)}; PEFT export needs one rank")
    return out, ranks.pop(), sorted(leaves), sorted(layers)


def peft_config(mlx_config: dict, rank: int, leaves: list[str], layers: list[int], base_model: str) -> dict:
    """Given an mlx-lm adapter_config, the rank, leaf module names, adapted layer indices
    and the base model's name or path, return PEFT's adapter_config.json content with
    lora_alpha / r equal to mlx-lm's scale; raise InputError for a non-LoRA fine-tune or
    a config whose rank disagrees with the weights."""
    kind = mlx_config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise InputError(f"adapter_config.json: fine_tune_type {kind!r}; only 'lora' adapters export to PEFT")
    params = mlx_config.get("lora_parameters", {})
    if params.get("rank", rank) != rank:
        raise InputError(f"adapter_config.json: rank {params['rank']} but the weights have rank {rank}")
    scale = float(params.get("scale", 20.0))  # mlx-lm's own default when a config omits it
    alpha = scale * rank
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": float(params.get("dropout", 0.0)),
        "target_modules": leaves,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,  # rslora would scale by alpha / sqrt(r) and break the equality
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    # mlx-lm adapts the last num_layers layers; when that is not every layer, say which,
    # or PEFT would wrap (zero-initialised) LoRA around the others and warn of missing keys.
    if layers != list(range(int(mlx_config.get("num_layers", len(layers))))):
        config["layers_to_transform"] = layers
        config["layers_pattern"] = "layers"
    return config


def default_base_model(cfg, run: RunDir) -> str:
    """Given the run's config and directory, return what PEFT should name as the base
    model: the config's Hugging Face repo id, or the absolute path of a local model
    (a local HF directory as given, the run's MLX model for a .gguf source or the demo)."""
    name = cfg.model.name
    local = Path(name).expanduser()
    if not local.is_absolute():
        local = run.root / local
    if name.endswith(".gguf"):
        # A GGUF file is not loadable by transformers; the run's unquantized MLX model
        # directory is (HF names, config.json, tokenizer).
        return str(run.model(cfg.model.path).resolve())
    if local.exists():
        return str(local.resolve())
    return name


def export_peft(adapter_dir: Path, out_dir: Path, base_model: str) -> dict:
    """Given an mlx-lm adapters directory, an output directory and the base model's HF
    repo id or path, write a PEFT LoRA adapter there (adapter_model.safetensors,
    adapter_config.json, README.md; files 0600, whole or absent) and return a summary
    {path, tensors, rank, lora_alpha, scale, target_modules, base_model_name_or_path};
    raise InputError for missing or non-LoRA adapters, or an --out that is not a
    previous export."""
    import mlx.core as mx

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    mlx_config, weights = read_mlx_adapters(adapter_dir)
    if not weights:
        raise InputError(f"--adapter-path {adapter_dir}: adapters.safetensors holds no tensors")
    check_replaceable(out_dir, is_peft_export, "a previous PEFT export")
    tensors, rank, leaves, layers = peft_tensors(weights)
    config = peft_config(mlx_config, rank, leaves, layers, base_model)
    with writing_output(out_dir):
        tmp = new_tmp_dir(out_dir)
        try:
            mx.save_safetensors(str(tmp / PEFT_WEIGHTS), tensors, metadata={"format": "pt"})
            write_bytes_durable(tmp / PEFT_CONFIG, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
            write_bytes_durable(tmp / "README.md", _model_card(config, mlx_config).encode())
            seal_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_replacing(tmp, out_dir, is_peft_export, "a previous PEFT export")
    return {"path": str(out_dir), "tensors": len(tensors), "rank": rank, "lora_alpha": config["lora_alpha"],
            "scale": config["lora_alpha"] / rank, "target_modules": leaves, "layers": layers,
            "base_model_name_or_path": base_model}


def _model_card(config: dict, mlx_config: dict) -> str:
    base = config["base_model_name_or_path"]
    return (f"---\nbase_model: {json.dumps(base)}\nlibrary_name: peft\ntags: [lora, mlx, mathlora-daemon]\n---\n\n"
            f"# LoRA adapter for {base}\n\n"
            f"Trained with mathlora-daemon (MLX) and exported to PEFT: rank {config['r']}, "
            f"lora_alpha {config['lora_alpha']} (scale {config['lora_alpha'] / config['r']:g}) on "
            f"{', '.join(config['target_modules'])}; trained on {mlx_config.get('model', base)}.\n\n"
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
            f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
            "model = PeftModel.from_pretrained(base, \"path/to/this/directory\")\n```\n")
