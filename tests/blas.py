"""A fast matrix multiply for MLX's CPU backend on Linux, for the tests only.

MLX's Linux CPU wheel (`mlx-cpu`) bundles the reference BLAS (netlib's libblas 3.10,
plain Fortran loops), and every float32 matmul goes through its `cblas_sgemm`: a
2-layer, 32-wide model trains at ~0.25 s a step, 3x slower than it needs to be, and the
suite spends most of its time there. NumPy's wheel already ships OpenBLAS, under
renamed 64-bit-index symbols (`scipy_cblas_sgemm64_`). A ten-line C shim exports the
standard `cblas_sgemm`/`dgemm`/`cgemm` and calls OpenBLAS; loaded before MLX (in this
process with RTLD_GLOBAL, in every child through LD_PRELOAD) it is what MLX's calls bind
to. Same function, same arguments: only the summation order inside a product differs,
and every comparison the tests make is between runs that use the same library.

OpenBLAS runs single-threaded (OPENBLAS_NUM_THREADS=1): its spinning worker threads
fight the test's other process for two cores and made products slower, not faster.

Nothing here is needed for correctness: where the platform is not Linux, NumPy's or
MLX's library is not where expected, or no C compiler is found, `install()` does
nothing and the tests run on the bundled BLAS. A Mac's MLX uses Accelerate and Metal.
The shim is built once into the test cache (MATHLORA_TEST_CACHE), keyed by the OpenBLAS
file it links (its path and bytes).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from artifacts import CACHE_ROOT

SHIM_C = r"""
#include <stdint.h>
void scipy_cblas_sgemm64_(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t,
                          const float*, int64_t, float, float*, int64_t);
void scipy_cblas_dgemm64_(int, int, int, int64_t, int64_t, int64_t, double, const double*, int64_t,
                          const double*, int64_t, double, double*, int64_t);
void scipy_cblas_cgemm64_(int, int, int, int64_t, int64_t, int64_t, const void*, const void*, int64_t,
                          const void*, int64_t, const void*, void*, int64_t);
void cblas_sgemm(int o, int ta, int tb, int m, int n, int k, float al, const float* a, int lda,
                 const float* b, int ldb, float be, float* c, int ldc)
{ scipy_cblas_sgemm64_(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); }
void cblas_dgemm(int o, int ta, int tb, int m, int n, int k, double al, const double* a, int lda,
                 const double* b, int ldb, double be, double* c, int ldc)
{ scipy_cblas_dgemm64_(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); }
void cblas_cgemm(int o, int ta, int tb, int m, int n, int k, const void* al, const void* a, int lda,
                 const void* b, int ldb, const void* be, void* c, int ldc)
{ scipy_cblas_cgemm64_(o, ta, tb, m, n, k, al, a, lda, b, ldb, be, c, ldc); }
"""


def _site_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent


def _openblas() -> Path | None:
    """NumPy's OpenBLAS, when MLX here is the Linux CPU build with the reference BLAS."""
    if platform.system() != "Linux":
        return None
    site = _site_dir("numpy")
    mlx_site = _site_dir("mlx")
    if site is None or mlx_site is None or not list((mlx_site / "mlx_cpu.libs").glob("libblas-*.so*")):
        return None
    found = sorted((site / "numpy.libs").glob("libscipy_openblas64_*.so"))
    return found[-1] if found else None


def shim_path() -> Path | None:
    """The built shim (building it when missing), or None where it does not apply."""
    openblas = _openblas()
    compiler = shutil.which("cc") or shutil.which("gcc")
    if openblas is None or compiler is None:
        return None
    # The shim finds OpenBLAS by its absolute path (rpath): one per venv and library.
    key = hashlib.sha256(SHIM_C.encode() + str(openblas).encode() + openblas.read_bytes()).hexdigest()[:16]
    target = CACHE_ROOT / "blas-shim" / f"libmlx-openblas-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source, built = Path(tmp) / "shim.c", Path(tmp) / target.name
        source.write_text(SHIM_C)
        done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", str(source), "-o", str(built), str(openblas),
                               f"-Wl,-rpath,{openblas.parent}"], capture_output=True, text=True)
        if done.returncode:
            return None
        os.replace(built, target)  # atomic: a concurrent session never loads half a file
    return target


def install() -> Path | None:
    """Route MLX's matrix products to OpenBLAS in this process and its children (call
    before MLX is imported). Return the shim's path, or None when the tests run on the
    bundled BLAS."""
    shim = shim_path()
    if shim is None:
        return None
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    except OSError:  # a shim that does not load here: the bundled BLAS, as without one
        return None
    os.environ["LD_PRELOAD"] = " ".join(p for p in (os.environ.get("LD_PRELOAD", ""), str(shim)) if p)
    return shim
