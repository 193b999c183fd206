"""Checkpoint store: atomic save, verify, list, restore and retention of checkpoints.

On-disk contract (docs/DESIGN.md, "Checkpoint contract")::

    <root>/step-00000012/          one checkpoint, named by its zero-padded global step
        adapters.safetensors       one file per tensor group (any group names; these two
        optimizer.safetensors      are the ones the trainer writes)
        trainer_state.json         the trainer's state dict (sorted keys, indented)
        MANIFEST.json              format version, step, created, eval_loss, groups, and
                                   size + SHA-256 of every other file; written LAST

A checkpoint is built in a temporary sibling ``<root>/.tmp-step-...``: every file is
fsynced, then the directory, then it is renamed into place and the parent is fsynced.
A ``step-*`` directory without a manifest that verifies does not exist as a checkpoint.
Anything in ``<root>`` whose name starts with ``.tmp-`` is a leftover of a killed save
or prune and is removed by :func:`cleanup_temporaries`.

Tensor groups are given to :func:`save_checkpoint` either as a mapping of names to numpy
arrays (or anything numpy can convert through ``__array__``), serialized here with
``safetensors.numpy``, or as the raw bytes of a complete safetensors file. Use the second
form for dtypes numpy lacks (bfloat16)::

    buf = io.BytesIO()
    mx.save_safetensors(buf, dict(tree_flatten(model.trainable_parameters())))
    groups = {"adapters": buf.getvalue(), "optimizer": optimizer_bytes}

Loading is the caller's job (``mx.load(path)`` or ``safetensors.numpy.load_file``) on the
paths :func:`load_checkpoint` returns after verifying them. This module never imports
MLX (numpy and safetensors only when saving) and never uses pickle.

Mutating functions (save, prune, cleanup) assume a single writer per run directory, which
the daemon's ``daemon.lock`` guarantees; a CLI that prunes must hold that lock too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import numbers
import os
import re
import secrets
import shutil
import stat
import struct
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from mathlora_checkpoints import fsio

FORMAT_NAME = "mathlora-checkpoint"
FORMAT_VERSION = 1
MANIFEST_NAME = "MANIFEST.json"
STATE_NAME = "trainer_state.json"
GROUP_SUFFIX = ".safetensors"
MAX_STEP = 99_999_999

_STEP_DIR_RE = re.compile(r"^step-(\d{8})$")
_GROUP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

#: A tensor group: name -> array (numpy or anything with ``__array__``), or the bytes of
#: a complete safetensors file.
Group = Union[Mapping[str, Any], bytes, bytearray, memoryview]
#: Writes ``data`` to a new file at ``path`` (inside the temporary directory), durably.
Writer = Callable[[Path, bytes], None]


class CheckpointError(Exception):
    """A checkpoint that cannot be used; ``reason`` says why, ``path`` which one."""

    def __init__(self, reason: str, path: Path | None = None):
        self.reason = reason
        self.path = path
        super().__init__(f"{path}: {reason}" if path is not None else reason)


@dataclass(frozen=True)
class CheckpointInfo:
    """One ``step-*`` directory as listed (not necessarily verified).

    ``bytes`` is the on-disk size of its files; ``eval_loss`` and ``created`` (a Unix
    time) come from the manifest, or are None / the directory's mtime without one.
    """

    path: Path
    step: int
    bytes: int
    eval_loss: float | None
    created: float


# --------------------------------------------------------------------------- naming


def step_dir_name(step: int) -> str:
    """Given a global step, return its directory name ``step-00000012``; raise ValueError
    when it is not an int in 0..99,999,999."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise ValueError(f"checkpoint step must be an int, got {step!r}")
    step = int(step)
    if not 0 <= step <= MAX_STEP:
        raise ValueError(f"checkpoint step must be in 0..{MAX_STEP}, got {step}")
    return f"step-{step:08d}"


def parse_step_dir(name: str) -> int | None:
    """Given a directory name, return its step when it is ``step-<8 digits>``, else None."""
    match = _STEP_DIR_RE.match(name)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- save


def save_checkpoint(
    root: Path,
    step: int,
    groups: Mapping[str, Group],
    state: Mapping[str, Any],
    *,
    writer: Writer | None = None,
) -> CheckpointInfo:
    """Given the checkpoints directory, the global step, tensor groups and the trainer
    state, write ``root/step-<N>/`` atomically and durably and return its info.

    Each group becomes ``<name>.safetensors`` (see the module docstring for the two
    accepted forms); ``state`` becomes ``trainer_state.json`` and its ``eval_loss``, when
    a finite number, is recorded in the manifest for retention. ``writer(path, data)``
    writes each file (default :func:`fsio.write_bytes_durable`); tests inject failures
    through it.

    Raise ValueError/TypeError for a bad step, group name, tensor or non-JSON state
    (leaving nothing behind); FileExistsError when ``step-<N>`` already exists and
    verifies (a durable checkpoint is never overwritten; one that does not verify is
    retired and replaced). On any failure the temporary directory is removed, the
    exception propagates (OSError with errno ENOSPC for a full disk) and existing
    checkpoints are untouched.
    """
    root = Path(root)
    name = step_dir_name(step)
    step = int(step)
    for group in groups:
        if not isinstance(group, str) or not _GROUP_NAME_RE.match(group):
            raise ValueError(
                f"tensor group name {group!r} must be 1-100 of [A-Za-z0-9_.-], "
                "not starting with '.', '_' or '-'"
            )
    for group, value in groups.items():
        if isinstance(value, (bytes, bytearray, memoryview)):
            _check_safetensors_bytes(group, value)
        elif not isinstance(value, Mapping):
            raise TypeError(
                f"tensor group {group!r} must be a dict of arrays or safetensors bytes, "
                f"got {type(value).__name__}"
            )
    state_bytes = _state_json(state).encode("utf-8")
    eval_loss = _finite_or_none(state.get("eval_loss"))
    write = writer or fsio.write_bytes_durable

    if not root.is_dir():
        fsio.ensure_private_dir(root)
        fsio.fsync_dir(root.parent)
    final = root / name
    if final.exists() or final.is_symlink():
        reason = verify_checkpoint(final)
        if reason is None:
            raise FileExistsError(errno.EEXIST, "checkpoint already exists", str(final))
        _retire(final, "replaced")

    tmp = root / f"{fsio.TMP_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(4)}"
    published = False
    try:
        tmp.mkdir(mode=fsio.DIR_MODE)
        os.chmod(tmp, fsio.DIR_MODE)
        files: dict[str, dict[str, Any]] = {}
        group_files: dict[str, str] = {}

        def put(filename: str, data: bytes) -> dict[str, Any]:
            path = tmp / filename
            size = len(data)
            write(path, data)
            st = os.stat(path)
            if st.st_size != size:
                raise OSError(errno.EIO, f"short write: {st.st_size} of {size} bytes", str(path))
            if st.st_mode & 0o777 != fsio.FILE_MODE:  # a custom writer ignored the mode
                os.chmod(path, fsio.FILE_MODE)
                fsio.fsync_file(path)
            return {"bytes": size, "sha256": _sha256(data)}

        for group, value in groups.items():
            filename = group + GROUP_SUFFIX
            data = _serialize(group, value) if isinstance(value, Mapping) else bytes(value)
            files[filename] = put(filename, data)
            group_files[group] = filename
            del data
        files[STATE_NAME] = put(STATE_NAME, state_bytes)
        created = time.time()
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "step": step,
            "created": created,
            "eval_loss": eval_loss,
            "groups": group_files,
            "files": files,
        }
        manifest_bytes = (json.dumps(manifest, sort_keys=True, indent=2) + "\n").encode()
        put(MANIFEST_NAME, manifest_bytes)  # last: its presence makes the checkpoint
        published = fsio.publish_dir(tmp, final)  # fsyncs tmp, renames, fsyncs root
        if not published:
            raise FileExistsError(errno.EEXIST, "checkpoint appeared while saving", str(final))
    except BaseException:
        if not published:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(f["bytes"] for f in files.values()) + len(manifest_bytes)
    return CheckpointInfo(path=final, step=step, bytes=total, eval_loss=eval_loss, created=created)


# --------------------------------------------------------------------------- verify / load


def verify_checkpoint(path: Path) -> str | None:
    """Given a checkpoint directory, return None when it is complete and intact, else a
    short reason ("no MANIFEST.json", "missing file X", "size mismatch for X: expected A,
    got B", "sha256 mismatch for X", "unexpected file X", "step in manifest 12 !=
    directory name 13", ...). Reads every file fully to hash it; never raises for a bad
    checkpoint."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return "not a directory"
    try:
        manifest = _read_manifest(path)
    except FileNotFoundError:
        return f"no {MANIFEST_NAME}"
    except (OSError, ValueError) as exc:
        return f"{MANIFEST_NAME} unreadable: {exc}"
    files = manifest["files"]
    dir_step = parse_step_dir(path.name)
    if dir_step is not None and manifest["step"] != dir_step:
        return f"step in manifest {manifest['step']} != directory name {dir_step}"
    try:
        present = sorted(os.listdir(path))
    except OSError as exc:
        return f"cannot list directory: {exc}"
    for entry in present:
        if entry != MANIFEST_NAME and entry not in files:
            return f"unexpected file {entry}"
    for filename, meta in sorted(files.items()):  # sizes first: cheap, catches truncation
        try:
            st = os.lstat(path / filename)
        except FileNotFoundError:
            return f"missing file {filename}"
        except OSError as exc:
            return f"cannot stat {filename}: {exc}"
        if not stat.S_ISREG(st.st_mode):
            return f"not a regular file: {filename}"
        if st.st_size != meta["bytes"]:
            return f"size mismatch for {filename}: expected {meta['bytes']}, got {st.st_size}"
    for filename, meta in sorted(files.items()):
        try:
            digest = fsio.sha256_file(path / filename)
        except OSError as exc:
            return f"cannot read {filename}: {exc}"
        if digest != meta["sha256"]:
            return f"sha256 mismatch for {filename}"
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """Given a checkpoint directory, verify it and return (trainer state dict,
    {group name: path of its .safetensors file}); raise CheckpointError with the reason
    when it does not verify. Load the tensors with ``mx.load`` / safetensors yourself."""
    path = Path(path)
    reason = verify_checkpoint(path)
    if reason is not None:
        raise CheckpointError(reason, path)
    try:
        manifest = _read_manifest(path)
        state = json.loads((path / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable after verification: {exc}", path) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{STATE_NAME} is not a JSON object", path)
    return state, {group: path / filename for group, filename in manifest["groups"].items()}


# --------------------------------------------------------------------------- listing


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Given the checkpoints directory, return every ``step-<8 digits>`` directory in it
    by ascending step, without verifying (``.tmp-*`` and other names are ignored; a
    missing root gives []). Cheap: reads only manifests and file sizes."""
    root = Path(root)
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    infos = []
    for entry in entries:
        step = parse_step_dir(entry.name)
        if step is None or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        size = 0
        try:
            for sub in os.scandir(path):
                if sub.is_file(follow_symlinks=False):
                    size += sub.stat(follow_symlinks=False).st_size
            created = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:  # pruned while we looked
            continue
        eval_loss = None
        try:
            manifest = _read_manifest(path)
            eval_loss = manifest["eval_loss"]
            created = manifest["created"]
        except (OSError, ValueError):
            pass
        infos.append(CheckpointInfo(path, step, size, eval_loss, created))
    infos.sort(key=lambda info: info.step)
    return infos


def manifest_problem(path: Path) -> str | None:
    """Given a checkpoint directory, return why its MANIFEST.json cannot be read (one
    line), or None when it reads. Cheap: no hashes (``verify_checkpoint`` checks those)."""
    try:
        _read_manifest(Path(path))
    except FileNotFoundError:
        return f"no {MANIFEST_NAME} (an incomplete checkpoint)"
    except (OSError, ValueError) as exc:
        return f"{MANIFEST_NAME}: {exc}"
    return None


def manifested_newest_first(root: Path) -> Iterator[Path]:
    """Given the checkpoints directory, yield its ``step-<8 digits>`` directories that
    have a MANIFEST.json, highest step first. Cheap and unverified (a directory without a
    manifest is not a checkpoint; hashes are checked only by verify and restore): for
    `status` and the budget's lower bound."""
    try:
        names = [entry.name for entry in os.scandir(root)]
    except OSError:
        return
    for _, name in sorted(((s, n) for n in names if (s := parse_step_dir(n)) is not None), reverse=True):
        if (Path(root) / name / MANIFEST_NAME).is_file():
            yield Path(root) / name


def newest_checkpoint(root: Path) -> tuple[int, float | None] | None:
    """Given the checkpoints directory, return (step, created Unix time or None) of the
    newest directory with a manifest, or None (unverified, see manifested_newest_first)."""
    for path in manifested_newest_first(root):
        created = read_json_object(path / MANIFEST_NAME) or {}
        created = created.get("created")
        if isinstance(created, bool) or not isinstance(created, (int, float)):
            try:
                created = (path / MANIFEST_NAME).stat().st_mtime
            except OSError:
                created = None
        return parse_step_dir(path.name), created
    return None


def read_json_object(path: Path) -> dict | None:
    """Given a path, return the JSON object in it; None when it is missing, unreadable,
    damaged or not an object (readers of a run directory describe damage, never crash)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_latest_valid(
    root: Path, on_rejected: Callable[[Path, str], None] | None = None
) -> CheckpointInfo | None:
    """Given the checkpoints directory, return the newest checkpoint that verifies, or
    None when there is none. Each newer one that fails is reported as
    ``on_rejected(path, reason)`` and skipped; nothing is deleted here."""
    for info in reversed(list_checkpoints(root)):
        reason = verify_checkpoint(info.path)
        if reason is None:
            return info
        if on_rejected is not None:
            on_rejected(info.path, reason)
    return None


# --------------------------------------------------------------------------- cleanup / retention


def cleanup_temporaries(root: Path) -> list[Path]:
    """Given the checkpoints directory, remove every ``.tmp-*`` entry in it (leftovers of
    a killed save or prune) and return the removed paths. Call it at the start of a run,
    while holding the run lock (a concurrent save's temporary would be removed too)."""
    root = Path(root)
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        if not entry.name.startswith(fsio.TMP_PREFIX):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def select_for_pruning(
    infos: Iterable[CheckpointInfo],
    keep: int,
    protect: Collection[Path] = frozenset(),
    invalid: Collection[Path] = frozenset(),
) -> list[CheckpointInfo]:
    """Given listed checkpoints, how many newest to keep, paths never to remove and the
    paths known not to verify, return those to delete, oldest first (pure; no I/O).

    Kept: the newest ``keep`` valid ones, the valid one with the lowest finite eval_loss,
    everything in ``protect``, and invalid ones newer than the newest valid one (left
    for inspection; nothing is deleted at all when none is valid). Invalid ones never
    count toward ``keep``. Raise ValueError when keep < 1.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    infos = sorted(infos, key=lambda info: info.step)
    bad = {_norm(p) for p in invalid}
    valid = [info for info in infos if _norm(info.path) not in bad]
    if not valid:
        return []
    kept = {_norm(p) for p in protect}
    kept.update(_norm(info.path) for info in valid[-keep:])
    scored = [info for info in valid if _finite_or_none(info.eval_loss) is not None]
    if scored:
        best = min(scored, key=lambda info: (info.eval_loss, -info.step))
        kept.add(_norm(best.path))
    newest_valid = valid[-1].step
    return [
        info
        for info in infos
        if _norm(info.path) not in kept
        and not (_norm(info.path) in bad and info.step > newest_valid)
    ]


def prune(
    root: Path,
    keep: int,
    protect: Collection[Path] = frozenset(),
    *,
    on_pruned: Callable[[CheckpointInfo], None] | None = None,
    on_rejected: Callable[[Path, str], None] | None = None,
    _after_rename: Callable[[Path], None] | None = None,
) -> list[CheckpointInfo]:
    """Given the checkpoints directory and a retention count, delete what
    :func:`select_for_pruning` selects (after verifying every checkpoint, reporting each
    that fails through ``on_rejected``) and return the deleted ones, oldest first.

    Safe to kill at any moment: each victim is first renamed to ``.tmp-pruned-...`` (from
    then on it is not a checkpoint), the parent fsynced, then removed; ``on_pruned(info)``
    follows each removal. ``_after_rename(tmp_path)`` is a test hook. Raise ValueError
    when keep < 1; OSError from the file system.
    """
    infos = list_checkpoints(root)
    invalid = set()
    for info in infos:
        reason = verify_checkpoint(info.path)
        if reason is not None:
            invalid.add(info.path)
            if on_rejected is not None:
                on_rejected(info.path, reason)
    victims = select_for_pruning(infos, keep, protect, invalid)
    for info in victims:
        _retire(info.path, "pruned", _after_rename)
        if on_pruned is not None:
            on_pruned(info)
    return victims


# --------------------------------------------------------------------------- helpers


def _retire(path: Path, tag: str, after_rename: Callable[[Path], None] | None = None) -> None:
    """Rename a step directory to a ``.tmp-<tag>-...`` sibling (atomic: from then on it
    is not a checkpoint), fsync the parent, then delete it."""
    parent = path.parent
    tmp = parent / f"{fsio.TMP_PREFIX}{tag}-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(path, tmp)
    fsio.fsync_dir(parent)
    if after_rename is not None:
        after_rename(tmp)
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp)
    else:
        tmp.unlink()


def _read_manifest(path: Path) -> dict[str, Any]:
    """Return the checkpoint's manifest, checked for shape; raise FileNotFoundError when
    absent, ValueError (with a short reason) when malformed, OSError when unreadable."""
    raw = (path / MANIFEST_NAME).read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc.__class__.__name__})") from None
    if not isinstance(manifest, dict):
        raise ValueError("not a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"unsupported format version {version!r} (this build reads {FORMAT_VERSION})")
    step = manifest.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"bad step {step!r}")
    created = manifest.get("created")
    if isinstance(created, bool) or not isinstance(created, (int, float)):
        raise ValueError(f"bad created {created!r}")
    eval_loss = manifest.get("eval_loss")
    if eval_loss is not None and _finite_or_none(eval_loss) is None:
        raise ValueError(f"bad eval_loss {eval_loss!r}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ValueError("no files table")
    for filename, meta in files.items():
        if not _safe_filename(filename) or filename == MANIFEST_NAME:
            raise ValueError(f"bad file name {filename!r}")
        if (
            not isinstance(meta, dict)
            or isinstance(meta.get("bytes"), bool)
            or not isinstance(meta.get("bytes"), int)
            or not isinstance(meta.get("sha256"), str)
        ):
            raise ValueError(f"bad entry for {filename}")
    if STATE_NAME not in files:
        raise ValueError(f"does not list {STATE_NAME}")
    groups = manifest.get("groups")
    if not isinstance(groups, dict):
        raise ValueError("no groups table")
    for group, filename in groups.items():
        if not isinstance(filename, str) or filename not in files:
            raise ValueError(f"group {group!r} refers to unlisted file {filename!r}")
    return manifest


def _serialize(group: str, tensors: Mapping[str, Any]) -> bytes:
    """Return the safetensors bytes of a name -> array mapping (numpy or ``__array__``)."""
    import numpy as np  # imported here so that listing checkpoints stays fast
    from safetensors.numpy import save

    arrays = {}
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"tensor group {group!r}: tensor names must be str, got {key!r}")
        try:
            array = np.asarray(value)
            if not array.flags.c_contiguous:  # (np.ascontiguousarray would make 0-d 1-d)
                array = array.copy(order="C")
            arrays[key] = array
        except Exception as exc:  # e.g. an MLX bfloat16 array
            raise TypeError(
                f"tensor group {group!r}, tensor {key!r}: cannot convert to numpy ({exc}); "
                "pass the group as safetensors bytes (mx.save_safetensors to io.BytesIO)"
            ) from exc
        if arrays[key].dtype == object:
            raise TypeError(f"tensor group {group!r}, tensor {key!r}: object arrays are not tensors")
    return save(arrays)


def _check_safetensors_bytes(group: str, data: bytes | bytearray | memoryview) -> None:
    """Raise ValueError unless data is laid out as one complete safetensors file."""
    view = memoryview(data).cast("B")
    problem = None
    if view.nbytes < 8:
        problem = "shorter than the 8-byte header length"
    else:
        (n,) = struct.unpack("<Q", view[:8])
        if n > view.nbytes - 8:
            problem = "header length beyond the end"
        else:
            try:
                header = json.loads(bytes(view[8 : 8 + n]).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                header = None
            if not isinstance(header, dict):
                problem = "header is not a JSON object"
            else:
                ends = [
                    meta.get("data_offsets", [0, -1])[1]
                    for key, meta in header.items()
                    if key != "__metadata__" and isinstance(meta, dict)
                ]
                if max(ends, default=0) != view.nbytes - 8 - n:
                    problem = "data section size does not match the header"
    if problem:
        raise ValueError(f"tensor group {group!r}: not a safetensors file ({problem})")


def _state_json(state: Mapping[str, Any]) -> str:
    if not isinstance(state, Mapping):
        raise TypeError(f"trainer state must be a dict, got {type(state).__name__}")
    try:
        return json.dumps(dict(state), sort_keys=True, indent=2) + "\n"
    except (TypeError, ValueError) as exc:
        raise TypeError(f"trainer state is not JSON-serializable: {exc}") from exc


def _finite_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safe_filename(name: Any) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
    )


def _norm(path: Path) -> str:
    return os.path.abspath(os.fspath(path))
