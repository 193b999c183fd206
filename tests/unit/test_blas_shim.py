"""The tests' fast matrix products (tests/blas.py): MLX binds to the shim here and in
the processes the tests start, and its products stay right."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import numpy as np

import blas

BOUND = """
import ctypes, sys
import mlx.core as mx
shim = ctypes.CDLL(sys.argv[1])
glob = ctypes.CDLL(None)
print(ctypes.cast(glob.cblas_sgemm, ctypes.c_void_p).value == ctypes.cast(shim.cblas_sgemm, ctypes.c_void_p).value)
"""


def test_mlx_products_bind_to_the_shim_here_and_in_child_processes_and_stay_right():
    import mlx.core as mx

    shim = blas.shim_path()
    if shim is not None:  # Linux with MLX's reference BLAS: the tests' processes use OpenBLAS
        here = ctypes.CDLL(None).cblas_sgemm
        assert ctypes.cast(here, ctypes.c_void_p).value == \
            ctypes.cast(ctypes.CDLL(str(shim)).cblas_sgemm, ctypes.c_void_p).value
        child = subprocess.run([sys.executable, "-c", BOUND, str(shim)], capture_output=True, text=True, check=True)
        assert child.stdout.strip() == "True", child.stderr
    rng = np.random.default_rng(0)
    for m, k, n in ((1, 7, 5), (33, 64, 300), (257, 32, 96)):  # odd sizes: the kernels' edge cases
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        for x, y, want in ((a, b, a @ b), (a, b.T.copy().T, a @ b), (a.T.copy(), b, a @ b)):
            got = mx.matmul(mx.array(x).T, mx.array(y)) if x.shape[0] == k else mx.array(x) @ mx.array(y)
            np.testing.assert_allclose(np.array(got), want, rtol=1e-4, atol=1e-4)
    doubled = np.array(mx.array(np.eye(3)) @ mx.array(np.arange(9.0).reshape(3, 3)), copy=True)
    np.testing.assert_array_equal(doubled, np.arange(9.0).reshape(3, 3))
