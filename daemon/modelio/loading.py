"""Load a base model (and adapters) through mlx-lm, the one way every command does.

`load_model` checks the files before mlx-lm reads them, so a missing or damaged file is
an InputError naming it (exit 78), not a traceback from deep inside a loader: config.json
and adapter_config.json must be JSON objects, every .safetensors file must have a
readable header that fits the file. Then mlx-lm loads, and `fit_to_device` adjusts what
the device needs: on MLX's CPU backend a quantized matmul with float16 scales is ~40x
slower than with float32 ones, so there the scales and biases become float32 (exact:
float16 values are float32 values). Metal and CUDA keep the checkpoint's dtypes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from mathlora_daemon.errors import InputError
from mathlora_daemon.rundir import ADAPTER_CONFIG, ADAPTER_WEIGHTS

# A safetensors file starts with the header's length (u64, little-endian), then that
# many bytes of JSON; anything above this is not a header (the format caps it at 100 MB).
_MAX_HEADER = 100 * 1024 * 1024
# Files any of which gives transformers a tokenizer (fast, sentencepiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tiktoken.model")


def safetensors_problem(path: Path) -> str | None:
    """Given a .safetensors file, return why it cannot be one (one line), or None when
    its header reads and its tensors fit in the file. Reads the header only."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, too short to be a safetensors file"
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER, size - 8):
                return "not a safetensors file (its header length does not fit the file)"
            header = json.loads(f.read(length).decode("utf-8"))
    except OSError as exc:
        return exc.strerror or str(exc)
    except (UnicodeDecodeError, ValueError):
        return "not a safetensors file (its header is not JSON)"
    if not isinstance(header, dict):
        return "not a safetensors file (its header is not a JSON object)"
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)),
              default=0)
    if 8 + length + end > size:
        return f"truncated: {size} bytes, its header describes {8 + length + end}"
    return None


def _json_object_problem(path: Path) -> str | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        return exc.strerror or str(exc)
    except (UnicodeDecodeError, ValueError) as exc:
        return f"not valid JSON ({exc})"
    return None if isinstance(value, dict) else "not a JSON object"


def check_model_dir(model_dir: Path, key: str = "model.path") -> None:
    """Given an MLX model directory, raise InputError naming the first file that is
    missing or damaged (config.json, the weights, tokenizer.json)."""
    config = model_dir / "config.json"
    if not config.is_file():
        raise InputError(f"{key}: {model_dir} is not an MLX model directory (no config.json). Convert the model "
                         f"first (`mathlora-daemon convert`), or point {key} at a converted model.")
    problem = _json_object_problem(config)
    if problem:
        raise InputError(f"{key}: {config}: {problem}")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise InputError(f"{key}: {model_dir} holds no *.safetensors weights (an unfinished conversion? run "
                         "`mathlora-daemon convert --force`)")
    for path in weights:
        problem = safetensors_problem(path)
        if problem:
            raise InputError(f"{key}: {path}: {problem} (convert the model again: `mathlora-daemon convert --force`)")
    tokenizer = model_dir / "tokenizer.json"
    if tokenizer.exists():
        problem = _json_object_problem(tokenizer)
        if problem:
            raise InputError(f"{key}: {tokenizer}: {problem}")
    elif not any((model_dir / name).is_file() for name in TOKENIZER_FILES) and not any(model_dir.glob("*.tiktoken")):
        # Without one, transformers falls back to asking for sentencepiece or tiktoken,
        # both installed: name what is missing instead.
        raise InputError(f"{key} {model_dir}: no tokenizer files (tokenizer.json, or tokenizer.model, vocab.json + "
                         "merges.txt, *.tiktoken); copy them from the original model into it, or convert again "
                         "(`mathlora-daemon convert --force`)")


def check_adapter_dir(adapter_dir: Path, option: str = "--adapter-path") -> None:
    """Given an adapters directory, raise InputError naming a missing or damaged
    adapters.safetensors or adapter_config.json."""
    weights, config = adapter_dir / ADAPTER_WEIGHTS, adapter_dir / ADAPTER_CONFIG
    if not adapter_dir.is_dir():
        raise InputError(f"{option} {adapter_dir}: no such directory (no adapters yet? train first: "
                         "`mathlora-daemon run`)")
    for path in (weights, config):
        if not path.is_file():
            raise InputError(f"{option} {adapter_dir}: no {path.name} (train first, or point {option} at a "
                             f"directory with {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG})")
    problem = safetensors_problem(weights)
    if problem:
        raise InputError(f"{option}: {weights}: {problem} (restore it from a checkpoint: the newest one in "
                         "checkpoints/ holds the same adapters)")
    problem = _json_object_problem(config)
    if problem:
        raise InputError(f"{option}: {config}: {problem}")


def fit_to_device(model) -> int:
    """Given a loaded model, cast quantized layers' float16/bfloat16 scales and biases to
    float32 when MLX runs on the CPU (see the module docstring); return how many arrays
    were cast (0 on Metal/CUDA)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    if mx.default_device() != mx.cpu:
        return 0
    cast = [(name, value.astype(mx.float32)) for name, value in tree_flatten(model.parameters())
            if name.rsplit(".", 1)[-1] in ("scales", "biases") and value.dtype in (mx.float16, mx.bfloat16)
            and _is_quantized_owner(model, name)]
    if cast:
        model.update(tree_unflatten(cast))
    return len(cast)


def _is_quantized_owner(model, name: str) -> bool:
    # `biases` is also a plain layer's name in some models; only quantized layers' count.
    owner = model
    for part in name.split(".")[:-1]:
        owner = owner[int(part)] if isinstance(owner, list) else getattr(owner, part, None)
        if owner is None:
            return False
    return hasattr(owner, "group_size") and hasattr(owner, "bits")


def load_model(model_dir: Path, adapter_path: Path | None = None, key: str = "model.path",
               option: str = "--adapter-path", return_config: bool = False):
    """Given a model directory and optional adapters, check the files, load them with
    mlx-lm and fit the model to the device; return (model, tokenizer) or, with
    return_config, (model, tokenizer, config). Raise InputError naming a bad file."""
    from mlx_lm.utils import load

    model_dir = Path(model_dir)
    check_model_dir(model_dir, key)
    if adapter_path is not None:
        check_adapter_dir(Path(adapter_path), option)
    try:
        model, tokenizer, config = load(str(model_dir), adapter_path=str(adapter_path) if adapter_path else None,
                                        return_config=True)
    except Exception as exc:  # mlx-lm/tokenizers raise many types for a file that does not fit
        where = f"{option} {adapter_path} with " if adapter_path is not None else ""
        raise InputError(f"{where}{key} {model_dir}: could not be loaded by mlx-lm: "
                         f"{type(exc).__name__}: {exc}") from None
    fit_to_device(model)
    return (model, tokenizer, config) if return_config else (model, tokenizer)
