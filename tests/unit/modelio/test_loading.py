"""The one model loader: damaged files are named before mlx-lm reads them, and on the
CPU quantized layers get float32 scales (float16 ones are ~40x slower there)."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mathlora_daemon.errors import InputError
from mathlora_daemon.modelio.loading import check_adapter_dir, check_model_dir, fit_to_device, safetensors_problem


def _weights(path, **arrays):
    mx.save_safetensors(str(path), arrays or {"w": mx.ones((4, 4))})
    return path


def test_a_safetensors_file_is_checked_from_its_header(tmp_path):
    good = _weights(tmp_path / "good.safetensors")
    assert safetensors_problem(good) is None
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-10])
    assert "truncated" in safetensors_problem(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"garbage" * 10)
    assert "not a safetensors file" in safetensors_problem(garbage)
    (tmp_path / "short.safetensors").write_bytes(b"\x00" * 4)
    assert "too short" in safetensors_problem(tmp_path / "short.safetensors")


def test_model_and_adapter_directories_name_the_bad_file(tmp_path):
    model = tmp_path / "mlx_model"
    model.mkdir()
    with pytest.raises(InputError, match="no config.json"):
        check_model_dir(model)
    (model / "config.json").write_text("[1, 2")
    with pytest.raises(InputError, match=r"config\.json: not valid JSON"):
        check_model_dir(model)
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="no \\*.safetensors"):
        check_model_dir(model)
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InputError, match=r"model\.safetensors: not a safetensors file"):
        check_model_dir(model)

    adapters = tmp_path / "adapters"
    with pytest.raises(InputError, match="--adapter-path .*: no such directory"):
        check_adapter_dir(adapters)
    adapters.mkdir()
    _weights(adapters / "adapters.safetensors")
    with pytest.raises(InputError, match="no adapter_config.json"):
        check_adapter_dir(adapters)
    (adapters / "adapter_config.json").write_text("{}")
    check_adapter_dir(adapters)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 32)
        self.norm = nn.RMSNorm(32)


def test_quantized_scales_become_float32_on_the_cpu_and_only_theirs():
    model = _Tiny()
    nn.quantize(model, group_size=32, bits=4)
    model.set_dtype(mx.float16)
    x = mx.random.normal((2, 64)).astype(mx.float16)
    before = model.proj(x)
    mx.set_default_device(mx.cpu)
    assert fit_to_device(model) == 2  # proj.scales, proj.biases
    dtypes = dict((k, v.dtype) for k, v in tree_flatten(model.parameters()))
    assert dtypes["proj.scales"] == dtypes["proj.biases"] == mx.float32
    assert dtypes["norm.weight"] == mx.float16 and dtypes["proj.weight"] == mx.uint32
    after = model.proj(x)
    # The same values (float16 scales are exact in float32), computed in float32.
    assert mx.allclose(before.astype(mx.float32), after, atol=1e-2).item()


def test_a_model_without_tokenizer_files_names_them(tmp_path):
    """transformers' own message asked to install sentencepiece or tiktoken (both are)."""
    from pathlib import Path

    from runs import make_tiny_run

    run = make_tiny_run(tmp_path / "run")
    (run / "mlx_model" / "tokenizer.json").unlink()
    with pytest.raises(InputError) as info:
        check_model_dir(Path(run / "mlx_model"))
    msg = str(info.value)
    assert f"model.path {run / 'mlx_model'}" in msg and "tokenizer.json" in msg and "tokenizer.model" in msg, msg
    assert "sentencepiece" not in msg
