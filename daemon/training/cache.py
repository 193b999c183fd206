"""The token cache: every training sequence as one flat token array plus offsets.

Layout of `cache/<key>/`: `tokens.npy` (int32, all sequences back to back),
`offsets.npy` (int64, n+1 boundaries), `meta.json` (identity and counts). Loading
memory-maps the arrays, so a 220k-row cache costs no RAM until touched. The directory
is built under a temporary name and renamed into place: a cache either exists whole or
not at all. No pickle: numpy files are loaded with allow_pickle=False.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from mathlora_checkpoints.fsio import TMP_PREFIX, ensure_private_dir, fsync_file, publish_dir, write_bytes_durable

FORMAT_VERSION = 1


def cache_key(identity: dict) -> str:
    """Given the cache identity (dataset, tokenizer, template, max_seq_len ...), return
    its short stable hash."""
    blob = json.dumps({"format": FORMAT_VERSION, **identity}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


@dataclass
class TokenCache:
    """Sequences backed by memory-mapped arrays; `meta` holds identity and counts."""

    path: Path
    tokens: np.ndarray
    offsets: np.ndarray
    meta: dict

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @cached_property
    def lengths(self) -> np.ndarray:
        # Once per cache, not per step: a distributed step reads it for every micro-batch.
        return np.diff(self.offsets)

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]


def load_cache(cache_dir: Path) -> TokenCache | None:
    """Given a cache directory, return the TokenCache, or None when it is absent or
    inconsistent (then it is rebuilt; a damaged cache is never trusted)."""
    meta_path = cache_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        tokens = np.load(cache_dir / "tokens.npy", mmap_mode="r", allow_pickle=False)
        offsets = np.load(cache_dir / "offsets.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    ok = (meta.get("format") == FORMAT_VERSION and offsets.ndim == 1 and len(offsets) >= 1
          and int(offsets[0]) == 0 and int(offsets[-1]) == tokens.shape[0]
          and len(offsets) - 1 == meta.get("sequences"))
    return TokenCache(cache_dir, tokens, offsets, meta) if ok else None


def write_cache(root: Path, key: str, sequences: list[np.ndarray], meta: dict) -> TokenCache:
    """Given the cache root, key, token sequences and metadata, write `root/<key>/`
    atomically and return it loaded (memory-mapped). If another process published the
    same key first, its copy is used."""
    ensure_private_dir(root)
    final = root / key
    tmp = root / f"{TMP_PREFIX}{key}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    try:
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate(sequences).astype(np.int32) if sequences else np.zeros(0, np.int32)
        for name, array in (("tokens.npy", tokens), ("offsets.npy", offsets)):
            np.save(tmp / name, array, allow_pickle=False)
            (tmp / name).chmod(0o600)  # np.save leaves the umask's mode; run-dir files are user-only
            fsync_file(tmp / name)
        meta = {**meta, "format": FORMAT_VERSION, "key": key, "sequences": len(sequences),
                "tokens": int(tokens.shape[0])}
        write_bytes_durable(tmp / "meta.json", json.dumps(meta, indent=2, sort_keys=True).encode())
        if final.exists() and load_cache(final) is None:
            # A damaged cache under this key is never trusted: move it aside so the fresh
            # copy can take its place (publish_dir would otherwise keep the damaged one).
            trash = root / f"{TMP_PREFIX}damaged-{key}.{os.getpid()}"
            shutil.rmtree(trash, ignore_errors=True)
            try:
                os.rename(final, trash)
            except FileNotFoundError:
                pass  # another writer moved it first
            shutil.rmtree(trash, ignore_errors=True)
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    loaded = load_cache(final)
    if loaded is None:  # pragma: no cover - only if the disk lies to us
        raise OSError(f"token cache {final} did not read back after writing")
    return loaded
