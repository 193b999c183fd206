"""training/oom.py: what counts as running out of memory, and how micro-batches split."""

from __future__ import annotations

import numpy as np

from mathlora_daemon.training.oom import is_out_of_memory, split_micro_batches


def test_mlx_allocation_failures_count_and_other_errors_do_not():
    assert is_out_of_memory(RuntimeError("[metal::malloc] Attempting to allocate 8 GB: Insufficient Memory"))
    assert is_out_of_memory(RuntimeError("[METAL] Command buffer execution failed: Insufficient Memory "
                                         "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)"))
    assert is_out_of_memory(RuntimeError("[malloc] Unable to allocate 1073741824 bytes."))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("[matmul] Last dimension of first input with shape (2,3) must match"))
    assert not is_out_of_memory(ValueError("Insufficient Memory"))  # not what MLX raises


def test_micro_batches_split_in_order_and_never_empty():
    parts = split_micro_batches([np.arange(5), np.arange(5, 8)], 2)
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4], [5, 6], [7]]
    assert [p.tolist() for p in split_micro_batches([np.arange(2)], 4)] == [[0], [1]]
    assert [p.tolist() for p in split_micro_batches([np.arange(3)], 1)] == [[0, 1, 2]]
