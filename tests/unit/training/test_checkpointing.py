"""Checkpoint files as bytes: the same arrays give the same file, whatever order the
dict that holds them was built in (a resumed optimizer rebuilds its state in another)."""

from __future__ import annotations

import random

import mlx.core as mx

from mathlora_daemon.training.checkpointing import _safetensors_bytes


def test_the_same_arrays_in_another_insertion_order_give_the_same_bytes(tmp_path):
    mx.random.seed(0)
    names = [f"model.layers.{i}.self_attn.{p}_proj.lora_{ab}" for i in range(4) for p in "qv" for ab in "ab"]
    arrays = {name: mx.random.normal((3, 5)) for name in names}
    arrays["step"] = mx.array(12, dtype=mx.uint64)
    arrays["learning_rate"] = mx.array(1e-3)
    shuffled = list(arrays.items())
    random.Random(1).shuffle(shuffled)
    assert list(dict(shuffled)) != list(arrays)
    assert _safetensors_bytes(dict(shuffled)) == _safetensors_bytes(arrays)
    assert _safetensors_bytes(dict(reversed(shuffled))) == _safetensors_bytes(arrays)
    # The file holds what was given.
    path = tmp_path / "optimizer.safetensors"
    path.write_bytes(_safetensors_bytes(dict(shuffled)))
    loaded = mx.load(str(path))
    assert set(loaded) == set(arrays) and all(mx.array_equal(loaded[k], arrays[k]).item() for k in arrays)

