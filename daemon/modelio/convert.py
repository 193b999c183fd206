"""`convert`: turn a base model into the run's MLX model directory (`mlx_model/`).

Sources (docs/DESIGN.md, "Architecture"): a Hugging Face repo id or a local Hugging Face / MLX
directory with `*.safetensors` (converted by mlx-lm's own `mlx_lm.convert.convert`), one
with only PyTorch `.bin` shards (read with `torch.load(weights_only=True)` one shard at a
time and restaged as safetensors, then the same mlx-lm path), or a local `.gguf` file
(`daemon.gguf.convert_gguf`). `quantize_bits` 4 or 8 quantizes with mlx-lm (affine, group
size 64) so LoRA trains on a quantized base (QLoRA).

Output is written atomically: everything is built in a `.tmp-convert-*` sibling of the
target, fsynced, then renamed into place, so the model directory appears whole or not at
all. Replacing an existing model (`--force`) keeps the old one until the new one is
complete. torch is imported only for `.bin` sources (the optional `convert` extra).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import struct
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

from mathlora_checkpoints.fsio import TMP_PREFIX, ensure_private_dir, fsync_dir, publish_dir, seal_tree
from mathlora_daemon.config import Config
from mathlora_daemon.errors import InputError, TemporaryFailure
from mathlora_daemon.rundir import RunDir

KIND_DIR, KIND_GGUF, KIND_REPO = "dir", "gguf", "repo"
QUANT_GROUP_SIZE = 64
DTYPES = ("float16", "bfloat16", "float32")
# What a repo download fetches; only one weight format is kept (see download_repo). The
# weight patterns are the files weight_format() uses: a repo's consolidated.safetensors
# (Mistral) or training_args.bin would be gigabytes or pickles fetched for nothing.
ST_PATTERN, BIN_PATTERN = "model*.safetensors", "pytorch_model*.bin"
DOWNLOAD_PATTERNS = ["*.json", ST_PATTERN, BIN_PATTERN, "tokenizer.model", "*.txt", "*.tiktoken"]
# Files besides the weights that a `.bin` source's staging copy needs (config, tokenizer,
# generation config). `*.py` is left out on purpose: no remote code is ever run.
SIDE_FILES = ("*.json", "tokenizer.model", "*.txt", "*.tiktoken", "*.jinja")
BIN_INDEX = "pytorch_model.bin.index.json"
EXTRA_HINT = "pip install 'mathlora-daemon[convert]'"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_STAGE, _OLD = TMP_PREFIX + "convert-", TMP_PREFIX + "old-"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model source: kind (dir, gguf, repo) and where it is."""

    kind: str
    location: str  # the repo id, or the absolute local path

    @property
    def path(self) -> Path:
        return Path(self.location)


# ---------------------------------------------------------------- source resolution

def resolve_source(name: str, search_dirs: tuple[Path, ...] | list[Path] = ()) -> ModelSource:
    """Given `model.name` (a local directory, a `.gguf` file or a HF repo id) and the
    directories a relative path is looked up in (then the current directory), return the
    ModelSource; raise InputError when a local path is named but missing or is neither a
    directory with config.json nor a .gguf file.
    """
    raw = Path(name).expanduser()
    candidates = [raw] if raw.is_absolute() else [Path(d) / raw for d in search_dirs] + [Path.cwd() / raw]
    for path in candidates:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise InputError(f"model.name = {name!r}: {path} has no config.json, so it is not a Hugging Face "
                                 f"or MLX model directory (found: {_listing(path)})")
            return ModelSource(KIND_DIR, str(path.resolve()))
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise InputError(f"model.name = {name!r}: {path} is a file but not a .gguf; expected a HF repo id, "
                                 "a model directory (config.json + weights) or a .gguf file")
            return ModelSource(KIND_GGUF, str(path.resolve()))
    looks_local = name.startswith((".", "/", "~")) or raw.suffix.lower() == ".gguf" or name.count("/") != 1
    if looks_local or not _REPO_ID.match(name):
        where = ", ".join(str(c.parent) for c in candidates)
        raise InputError(f"model.name = {name!r}: no such file or directory (looked in {where}), and not a "
                         "Hugging Face repo id like 'owner/name'")
    return ModelSource(KIND_REPO, name)


def _listing(directory: Path, limit: int = 12) -> str:
    names = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    if not names:
        return "nothing"
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_model_config(directory: Path) -> dict:
    """Given a model directory, return its config.json; raise InputError when it is
    missing or not a JSON object."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{directory}: no config.json (found: {_listing(directory)})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object")
    return config


def check_architecture(config: dict, where: str) -> str:
    """Given a model config and where it came from, return its model_type; raise
    InputError naming the model_type when mlx-lm has no model module for it."""
    import mlx_lm
    from mlx_lm.utils import _get_classes  # mlx-lm's own lookup, remappings included

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise InputError(f"{where}: config.json has no model_type, so the architecture is unknown")
    try:
        _get_classes(config)
    except (ValueError, ImportError, AttributeError):
        raise InputError(f"{where}: unsupported architecture: model_type {model_type!r} has no model in "
                         f"mlx-lm {getattr(mlx_lm, '__version__', '')} (mlx_lm/models/); upgrade mlx-lm or choose "
                         "a model of a supported architecture (e.g. llama, mistral, qwen2)") from None
    return model_type


def weight_format(directory: Path) -> str:
    """Given a model directory, return "safetensors" when it has `model*.safetensors`
    (what mlx-lm loads), else "bin" when it has PyTorch `.bin` shards; raise InputError
    listing what it found when it has neither."""
    if any(directory.glob(ST_PATTERN)):
        return "safetensors"
    if bin_shards(directory):
        return "bin"
    raise InputError(f"{directory}: no model weights: expected model*.safetensors or pytorch_model*.bin "
                     f"(with {BIN_INDEX}); found: {_listing(directory)}")


def bin_shards(directory: Path) -> list[Path]:
    """Given a directory, return its PyTorch weight shards: those named by
    `pytorch_model.bin.index.json` when present, else `pytorch_model*.bin`; raise
    InputError when the index names a shard that is missing."""
    index = directory / BIN_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{index}: not a valid shard index ({exc})") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise InputError(f"{index} names shards that are missing: {', '.join(missing)}")
        return [directory / n for n in names]
    # Other *.bin files (training_args.bin, optimizer.bin) are pickles, not weights.
    return sorted(directory.glob(BIN_PATTERN))


# ---------------------------------------------------------------- Hugging Face download

def download_repo(repo: str) -> Path:
    """Given a HF repo id, return the local snapshot directory holding its config,
    tokenizer files and one weight format (safetensors when the repo has any, else .bin);
    raise InputError naming the repo when it does not exist, is gated or private without
    a login, or is not cached in offline mode, or has an unsupported architecture
    (checked before the weights are fetched); raise TemporaryFailure for network errors.
    """
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        # Config first: refuse an unsupported architecture before fetching gigabytes.
        meta = Path(snapshot_download(repo, allow_patterns=["*.json"]))
        check_architecture(read_model_config(meta), f"model.name = {repo!r}")
        patterns = list(DOWNLOAD_PATTERNS)
        try:
            files = HfApi().list_repo_files(repo)
        except Exception:  # offline with a cached snapshot: the snapshot decides
            files = None
        if files is not None:
            # A repo with both formats would otherwise download the model twice.
            has_st = any(fnmatch.fnmatch(f, ST_PATTERN) for f in files)
            patterns.remove(BIN_PATTERN if has_st else ST_PATTERN)
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as exc:
        raise InputError(f"model.name = {repo!r}: not found on the Hugging Face Hub, or gated/private without a "
                         f"login (`hf auth login`): {str(exc).splitlines()[0]}") from None
    except LocalEntryNotFoundError as exc:
        if constants.HF_HUB_OFFLINE:
            raise InputError(f"model.name = {repo!r}: not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                             "set; download it once online or point model.name at a local directory") from None
        raise TemporaryFailure(f"model.name = {repo!r}: could not reach the Hugging Face Hub: {exc}") from None
    except OSError as exc:  # HTTP 5xx, connection resets, timeouts: a later start may succeed
        raise TemporaryFailure(f"model.name = {repo!r}: download failed: {exc}") from None
    except Exception as exc:
        # The hub client's transport errors (httpx/requests) are not OSErrors; they are
        # network trouble all the same, which a restart can get past.
        if type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3"):
            raise TemporaryFailure(f"model.name = {repo!r}: download failed: {exc}") from None
        raise


# ---------------------------------------------------------------- .bin -> safetensors

# torch dtype name -> safetensors dtype tag
_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
              "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}


def _import_torch():
    from mathlora_daemon.runtime import imports

    try:
        torch = imports.load("torch")
    except ImportError:
        raise InputError("this model has only PyTorch .bin weights, and reading them needs PyTorch, which is not "
                         f"installed: {EXTRA_HINT}") from None
    return torch


def _load_bin(torch, path: Path) -> dict:
    """Given torch and a .bin shard, return its state dict (tensors memory-mapped when the
    file allows it); raise InputError when it is not a plain tensor checkpoint."""
    def load(mmap: bool):
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            state = load(True)
        except RuntimeError:  # the legacy (pre-1.6, non-zip) format cannot be memory-mapped
            state = load(False)
    except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, EOFError ...) for a bad file
        raise InputError(f"{path}: not a readable PyTorch weights file for torch.load(weights_only=True): "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InputError(f"{path}: expected a flat dict of named tensors (a Hugging Face state dict)")
    return state


def write_safetensors_shard(tensors: dict, path: Path) -> int:
    """Given named torch tensors and a target path, write them as one safetensors file,
    tensor by tensor, and return the bytes of tensor data written; raise InputError for a
    dtype safetensors cannot hold.

    The bytes are copied as they are (no cast), so bf16 stays bf16 bit for bit. Streaming
    one tensor at a time keeps extra memory to one tensor: the shard itself is
    memory-mapped, whereas safetensors.torch.save_file would first build the whole
    shard's bytes in memory (10 GB for DeepSeek-Math's first shard).
    """
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        tag = _ST_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if tag is None:
            raise InputError(f"{path.name}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot hold")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": tag, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format wants the data 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for t in tensors.values():
            if t.numel():
                # Byte view of a contiguous copy; works for bf16, which numpy has no type for.
                fh.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return offset


def stage_bin_as_safetensors(src: Path, staging: Path, log=None) -> dict:
    """Given a directory with PyTorch `.bin` shards and an empty staging directory, write
    there an equivalent Hugging Face directory with `model-0000N-of-0000M.safetensors`
    shards, `model.safetensors.index.json` and the config and tokenizer files, reading
    one shard at a time; return {"shards", "tensors", "bytes"}. Raise InputError when
    torch is missing or a shard is not a plain tensor checkpoint.
    """
    torch = _import_torch()
    shards = bin_shards(src)
    ensure_private_dir(staging)
    for pattern in SIDE_FILES:
        for file in src.glob(pattern):
            if file.name != BIN_INDEX and file.is_file():
                shutil.copyfile(file, staging / file.name)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        started = time.monotonic()
        state = _load_bin(torch, shard)
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        nbytes = write_safetensors_shard(state, staging / name)
        weight_map.update((k, name) for k in state)
        total += nbytes
        count = len(state)
        del state  # drop the shard (and its mapping) before the next one is read
        if log is not None:
            log.debug("model.convert.shard", shard=shard.name, to=name, tensors=count, bytes=nbytes,
                      seconds=round(time.monotonic() - started, 3))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return {"shards": len(shards), "tensors": len(weight_map), "bytes": total}


# ---------------------------------------------------------------- mlx-lm conversion

def _mlx_convert(hf_dir: Path, out: Path, quantize_bits: int, dtype: str | None) -> None:
    """Given a Hugging Face / MLX directory with safetensors, write the MLX model to
    `out` (which must not exist) with mlx-lm; raise InputError when mlx-lm refuses the
    checkpoint (missing or mismatched weights, a custom-code model)."""
    from mlx_lm.convert import convert

    kwargs = dict(quantize=True, q_group_size=QUANT_GROUP_SIZE, q_bits=quantize_bits) if quantize_bits else {}
    try:
        # mlx-lm prints progress on stdout; keep stdout for our own summary.
        with contextlib.redirect_stdout(sys.stderr):
            convert(str(hf_dir), str(out), dtype=dtype, **kwargs)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise InputError(f"{hf_dir}: mlx-lm could not convert this model: {exc}") from None


def _convert_gguf(path: Path, out: Path, quantize_bits: int, log) -> dict:
    try:
        from mathlora_daemon.modelio.gguf import convert_gguf
    except ModuleNotFoundError as exc:
        if exc.name != "mathlora_daemon.modelio.gguf":
            raise
        raise InputError(f"{path}: GGUF conversion is not available in this installation") from None
    return convert_gguf(path, out, quantize_bits=quantize_bits, log=log) or {}


def _safetensors_stats(directory: Path) -> tuple[int, int, dict]:
    """Given a model directory, return (tensor count, file bytes, {dtype tag: count})
    from the safetensors headers alone."""
    tensors, nbytes, dtypes = 0, 0, {}
    for file in sorted(directory.glob("*.safetensors")):
        nbytes += file.stat().st_size
        with open(file, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                tensors += 1
                dtypes[entry["dtype"]] = dtypes.get(entry["dtype"], 0) + 1
    return tensors, nbytes, dtypes


def cleanup_stale(out_dir: Path) -> list[str]:
    """Given the target model directory, remove what conversions killed midway left
    beside it (`.tmp-convert-<name>-<pid>-*` of dead processes) and return their names.

    A `.tmp-old-<name>-*` is the previous model set aside by a `--force` replacement: when
    the process died before the new one took its place, it is put back rather than lost.
    """
    removed = []
    if not out_dir.parent.is_dir():
        return removed
    for entry in out_dir.parent.iterdir():
        for prefix in (_STAGE, _OLD):
            head = f"{prefix}{out_dir.name}-"
            if not entry.name.startswith(head):
                continue
            # Exactly <pid>-<8 hex>: `.tmp-convert-mlx_model-2-...` belongs to `mlx_model-2`.
            m = re.fullmatch(r"(\d+)-[0-9a-f]{8}", entry.name[len(head):])
            if m is None or psutil.pid_exists(int(m.group(1))):
                continue
            if prefix == _OLD and not out_dir.exists():
                os.rename(entry, out_dir)
            else:
                shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    if removed:
        fsync_dir(out_dir.parent)
    return removed


def _publish(new: Path, out_dir: Path, replace: bool) -> bool:
    """Given a sealed model directory and its target, put it in place; with replace, the
    old model is moved aside first and removed only once the new one is in place (and
    moved back if the rename fails). Return False when another writer won the race."""
    old = None
    if replace and out_dir.exists():
        old = out_dir.with_name(f"{_OLD}{out_dir.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, old)
    try:
        published = publish_dir(new, out_dir)
    except BaseException:
        if old is not None and not out_dir.exists():
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(out_dir.parent)
    return published


def convert_model(source: str, out_dir: Path, quantize_bits: int = 0, log=None, dtype: str | None = None,
                  *, replace: bool = False, search_dirs: tuple[Path, ...] | list[Path] = ()) -> dict:
    """Given a model source (HF repo id, local HF/MLX directory or .gguf file), the
    output directory, the quantization bits (0, 4, 8) and an optional dtype for the
    unquantized weights (float16, bfloat16, float32; default: mlx-lm's, which keeps the
    checkpoint's), write the MLX model directory atomically and return a summary
    (source, kind, format, model_type, path, tensors, bytes, dtypes, quantize_bits,
    seconds, published). Raise InputError for a bad source, an unsupported architecture or
    file, a missing torch for .bin weights, or an existing `out_dir` without `replace`;
    TemporaryFailure for a failed download. On any failure `out_dir` is as it was and no
    temporary sibling is left.
    """
    started = time.monotonic()
    if quantize_bits not in (0, 4, 8):
        raise InputError(f"quantize bits = {quantize_bits!r} is not allowed: expected one of 0, 4, 8")
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"dtype = {dtype!r} is not allowed: expected one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir).expanduser().absolute()
    src = resolve_source(source, search_dirs)
    cleanup_stale(out_dir)
    if out_dir.exists() and not replace:
        raise InputError(f"{out_dir} already exists; remove it or replace it (`convert --force`)")
    if src.kind != KIND_REPO and (out_dir == src.path or out_dir in src.path.parents):
        raise InputError(f"{out_dir}: the output cannot be the source itself or hold it")
    if log is not None:
        log.info("model.convert.start", source=source, kind=src.kind, path=str(out_dir), quantize_bits=quantize_bits)

    ensure_private_dir(out_dir.parent)
    stage = out_dir.with_name(f"{_STAGE}{out_dir.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    summary: dict = {"source": source, "kind": src.kind, "path": str(out_dir), "quantize_bits": quantize_bits}
    try:
        ensure_private_dir(stage)
        new = stage / "model"  # mlx-lm refuses to write into an existing directory
        if src.kind == KIND_GGUF:
            summary.update(format="gguf", gguf=_convert_gguf(src.path, new, quantize_bits, log))
        else:
            local = download_repo(src.location) if src.kind == KIND_REPO else src.path
            config = read_model_config(local)
            summary["model_type"] = check_architecture(config, str(source))
            if quantize_bits and config.get("quantization"):
                raise InputError(f"{source}: already quantized ({config['quantization'].get('bits')} bits); set "
                                 "model.quantize_bits = 0 (--quantize 0) to use it as it is")
            summary["format"] = weight_format(local)
            hf_dir = local
            if summary["format"] == "bin":
                hf_dir = stage / "hf"
                summary["staged"] = stage_bin_as_safetensors(local, hf_dir, log)
            _mlx_convert(hf_dir, new, quantize_bits, dtype)
            if hf_dir != local:
                shutil.rmtree(hf_dir)  # free the staged copy's disk before publishing
        if not (new / "config.json").is_file():
            raise InputError(f"{source}: the conversion wrote no config.json")
        summary["tensors"], summary["bytes"], summary["dtypes"] = _safetensors_stats(new)
        seal_tree(new)
        summary["published"] = _publish(new, out_dir, replace)
    except BaseException as exc:
        if log is not None:
            log.error("model.convert.failed", source=source, kind=src.kind, error=f"{type(exc).__name__}: {exc}",
                      seconds=round(time.monotonic() - started, 3))
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    summary["seconds"] = round(time.monotonic() - started, 3)
    if log is not None:
        log.info("model.convert.done", **{k: v for k, v in summary.items() if k not in ("gguf", "staged")})
    return summary


# ---------------------------------------------------------------- run start and the convert command



def ensure_model(cfg: Config, run: RunDir, log) -> Path:
    """Given the config, the run directory and the logger, return the MLX model
    directory, converting `model.name` into it first (with `model.quantize_bits`) when it
    has no config.json; raise InputError when the source cannot be converted or the
    model path exists but holds something else (it is never overwritten)."""
    mdir = run.model(cfg.model.path)
    cleanup_stale(mdir)  # may put back a model a killed `convert --force` had set aside
    if (mdir / "config.json").is_file():
        return mdir
    if mdir.is_dir() and not any(mdir.iterdir()):
        mdir.rmdir()  # an empty directory holds nothing to lose
    elif mdir.exists():
        raise InputError(f"model.path: {mdir} exists but is not a model directory (no config.json: "
                         f"{_listing(mdir) if mdir.is_dir() else 'a file'}); move it away or set model.path")
    convert_model(cfg.model.name, mdir, cfg.model.quantize_bits, log, search_dirs=(run.root,))
    return mdir


def convert_for_run(cfg: Config, run: RunDir, source: str | None, quantize: int | None, dtype: str | None,
                    force: bool) -> dict:
    """The `convert` command's work (its front-end is cli/models.py): convert `source`
    (default: model.name, looked up in the run directory) into the run's model directory
    under the run's lock and return convert_model's summary; raise InputError (exit 78)
    for a bad source or an existing model without `force`, TemporaryFailure (exit 75)
    while a daemon runs in the run directory or a download fails."""
    from mathlora_daemon.runtime.lock import LockHeld, acquire_lock
    from mathlora_daemon.runtime.logs import close_logging, setup_logging

    bits = cfg.model.quantize_bits if quantize is None else quantize
    out = run.model(cfg.model.path)
    if out.exists() and not force:
        raise InputError(f"{out} already exists; pass --force to replace it (the old model stays until the new "
                         "one is complete)")
    if source is not None:
        search = ()  # a path typed on the command line means the current directory
    else:
        source, search = cfg.model.name, (run.root,)
    resolve_source(source, search)  # a bad source fails before the run directory is touched
    ensure_private_dir(run.root)
    try:
        lock = acquire_lock(run, retries=0.5)
    except LockHeld as exc:
        raise TemporaryFailure(f"{exc}: stop the daemon before converting its model") from None
    log = setup_logging(run, run.root.resolve().name)
    try:
        return convert_model(source, out, bits, log, dtype, replace=force, search_dirs=search)
    finally:
        close_logging()
        lock.release()
