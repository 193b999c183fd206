"""The token cache: every training and validation sequence as flat token arrays plus offsets.

Layout of `cache/<key>/` (format 2):

    meta.json                        identity, counts, the validation split's size
    train/tokens.npy                 int32, all training sequences back to back
    train/offsets.npy                int64, n + 1 boundaries
    train/prompt_lens.npy            int32, each sequence's leading prompt tokens (0 for a
                                     later chunk of a long row): what train.mask_prompt masks
    validation/...                   the same three arrays for the held-out rows
    validation/problems.jsonl        the held-out rows themselves (problem, solution, answer,
                                     kind), for the final eval
    train/problems.jsonl             with train.method = "grpo" only: the training rows'
                                     problem, reference answer and kind

Loading memory-maps the arrays, so a 220k-row cache costs no RAM until touched. The
directory is built under a temporary name and renamed into place: a cache either exists
whole or not at all. No pickle: numpy files are loaded with allow_pickle=False.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from mathlora_checkpoints.fsio import TMP_PREFIX, ensure_private_dir, fsync_file, publish_dir, write_bytes_durable

FORMAT_VERSION = 2
SPLITS = ("train", "validation")
PROBLEMS_FILE = "problems.jsonl"


def cache_key(identity: dict) -> str:
    """Given the cache identity (dataset, tokenizer, template, max_seq_len ...), return
    its short stable hash."""
    blob = json.dumps({"format": FORMAT_VERSION, **identity}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


@dataclass
class TokenCache:
    """One split's sequences backed by memory-mapped arrays; `meta` holds the cache's
    identity and counts. The training split carries the validation split (or None)."""

    path: Path  # cache/<key> for the training split, cache/<key>/validation for the other
    tokens: np.ndarray
    offsets: np.ndarray
    meta: dict
    prompt_lens: np.ndarray | None = None  # None: no prompt is masked (a cache made in memory)
    validation: "TokenCache | None" = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @cached_property
    def lengths(self) -> np.ndarray:
        # Once per cache, not per step: a distributed step reads it for every micro-batch.
        return np.diff(self.offsets)

    @cached_property
    def starts(self) -> np.ndarray:
        """Each sequence's prompt length (zeros when the cache has none)."""
        return np.asarray(self.prompt_lens) if self.prompt_lens is not None else np.zeros(len(self), np.int32)

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]

    def train_problems(self) -> list[dict]:
        """GRPO's training rows (problem, answer, kind), kept by `prepare` when asked
        (`train/problems.jsonl`); [] without them."""
        path = self.path / "train" / PROBLEMS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def problems(self) -> list[dict]:
        """The validation split's rows (problem, solution, answer, kind); [] without any."""
        path = self.path / PROBLEMS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _load_split(folder: Path, meta: dict) -> TokenCache | None:
    try:
        tokens = np.load(folder / "tokens.npy", mmap_mode="r", allow_pickle=False)
        offsets = np.load(folder / "offsets.npy", mmap_mode="r", allow_pickle=False)
        prompt_lens = np.load(folder / "prompt_lens.npy", mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    ok = (offsets.ndim == 1 and len(offsets) >= 1 and int(offsets[0]) == 0 and int(offsets[-1]) == tokens.shape[0]
          and prompt_lens.shape == (len(offsets) - 1,))
    return TokenCache(folder, tokens, offsets, meta, prompt_lens) if ok else None


def load_cache(cache_dir: Path) -> TokenCache | None:
    """Given a cache directory, return its training TokenCache (with `.validation`), or
    None when it is absent, of another format or inconsistent (then it is rebuilt; a
    damaged cache is never trusted)."""
    try:
        meta = json.loads((Path(cache_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        return None
    train = _load_split(Path(cache_dir) / "train", meta)
    if train is None or len(train) != meta.get("sequences"):
        return None
    train.path = Path(cache_dir)  # the cache is known by its directory, cache/<key>
    if meta.get("validation_sequences"):
        train.validation = _load_split(Path(cache_dir) / "validation", meta)
        if train.validation is None or len(train.validation) != meta["validation_sequences"]:
            return None
    return train


@dataclass
class Split:
    """A split being written: its sequences, their prompt lengths, and (validation) rows."""

    sequences: list[np.ndarray] = field(default_factory=list)
    prompt_lens: list[int] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)

    def add(self, ids, prompt_len: int) -> None:
        self.sequences.append(np.asarray(ids, dtype=np.int32))
        self.prompt_lens.append(prompt_len)


def _write_split(folder: Path, split: Split) -> int:
    folder.mkdir(mode=0o700)
    lengths = np.array([len(s) for s in split.sequences], dtype=np.int64)
    offsets = np.zeros(len(split.sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(split.sequences).astype(np.int32) if split.sequences else np.zeros(0, np.int32)
    arrays = (("tokens.npy", tokens), ("offsets.npy", offsets),
              ("prompt_lens.npy", np.asarray(split.prompt_lens, dtype=np.int32)))
    for name, array in arrays:
        np.save(folder / name, array, allow_pickle=False)
        (folder / name).chmod(0o600)  # np.save leaves the umask's mode; run-dir files are user-only
        fsync_file(folder / name)
    if split.problems:
        text = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in split.problems)
        write_bytes_durable(folder / PROBLEMS_FILE, text.encode("utf-8"))
    return int(tokens.shape[0])


def write_cache(root: Path, key: str, train: Split, validation: Split, meta: dict) -> TokenCache:
    """Given the cache root, key, the two splits and metadata, write `root/<key>/`
    atomically and return it loaded (memory-mapped). If another process published the
    same key first, its copy is used."""
    ensure_private_dir(root)
    final = root / key
    tmp = root / f"{TMP_PREFIX}{key}.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    try:
        tokens = _write_split(tmp / "train", train)
        val_tokens = _write_split(tmp / "validation", validation)
        meta = {**meta, "format": FORMAT_VERSION, "key": key, "sequences": len(train.sequences), "tokens": tokens,
                "validation_sequences": len(validation.sequences), "validation_tokens": val_tokens,
                "validation_rows": len(validation.problems)}
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
