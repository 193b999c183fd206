"""Tests for `export --format peft` and `fuse` with the real libraries: the tiny Llama
loads in transformers, the exported adapter loads with `PeftModel.from_pretrained` and
gives the logits MLX gives with the adapters, and the fused model gives them too, in
mlx-lm and in transformers. All in float32; tolerance atol 1e-4 on logits of std ~1."""

from __future__ import annotations

import json
import stat

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tuner.lora import LoRALinear

from mathlora_daemon.cli import actions, arguments
from mathlora_daemon.config import Config, LoraConfig, ModelConfig, to_toml
from mathlora_daemon.errors import InputError
from mathlora_daemon.modelio.export import export_peft
from mathlora_daemon.modelio.fuse import fuse_model

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft vs transformers 5

ATOL = 1e-4  # float32 end to end; measured differences are ~1e-6 (the only gap is op order)
TOKENS = [0, 5, 17, 42, 99, 150, 7, 260, 33, 12, 88, 201]
DIMS = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
TARGETS = ["q_proj", "v_proj", "down_proj"]
RANK, ALPHA = 4, 8.0


def lora_config() -> Config:
    return Config(model=ModelConfig(name="tests/tiny-llama", path="mlx_model"),
                  lora=LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.0, targets=TARGETS))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory: the tiny demo model, a mathlora.toml and adapters with random
    (non-zero) A and B, so that a wrong transpose, name or scale shows in the logits."""
    from mathlora_daemon.demo.assets import build_demo_model_dir
    from mathlora_daemon.demo.mathgen import generate_problems
    from mathlora_daemon.training.model import adapter_config, apply_lora, load_base, save_adapters
    from mathlora_daemon.training.template import format_example

    run = tmp_path_factory.mktemp("export") / "run"
    texts = [format_example(r["problem"], r["solution"]) for r in generate_problems(50, 0)]
    build_demo_model_dir(run / "mlx_model", texts, seed=0, **DIMS)
    cfg = lora_config()
    (run / "mathlora.toml").write_text(to_toml(cfg))
    model, _, _ = load_base(run / "mlx_model")
    keys = apply_lora(model, cfg)
    key = mx.random.key(123)
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):  # lora_b starts at zero: the adapters would be a no-op
            key, ka, kb = mx.random.split(key, 3)
            module.lora_a = 0.1 * mx.random.normal(module.lora_a.shape, key=ka)
            module.lora_b = 0.1 * mx.random.normal(module.lora_b.shape, key=kb)
    save_adapters(model, run / "adapters", adapter_config(cfg, len(model.layers), keys))
    return run


@pytest.fixture(scope="module")
def mlx_logits(run) -> np.ndarray:
    from mlx_lm.utils import load

    model, _ = load(str(run / "mlx_model"), adapter_path=str(run / "adapters"))
    base, _ = load(str(run / "mlx_model"))
    with_lora = np.array(model(mx.array([TOKENS])).astype(mx.float32))
    without = np.array(base(mx.array([TOKENS])).astype(mx.float32))
    assert np.abs(with_lora - without).max() > 0.05, "the adapters must change the logits for the test to mean anything"
    return with_lora


def in_process(*argv: str) -> int:
    """A command run in this process (its exit code), through the CLI's own parser and actions."""
    args = arguments.parse(list(argv))
    return actions.COMMANDS[args.command](args)


@pytest.fixture(scope="module")
def exported(run):
    assert in_process("export", "--run-dir", str(run), "--format", "peft") == 0
    return run / "export" / "peft"


@pytest.fixture(scope="module")
def fused(run):
    assert in_process("fuse", "--run-dir", str(run)) == 0
    return run / "fused"


def torch_logits(model) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits.float().numpy()


def test_transformers_loads_the_demo_model(run):
    import mlx_lm.utils
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(run / "mlx_model").eval()
    model, _ = mlx_lm.utils.load(str(run / "mlx_model"))
    want = np.array(model(mx.array([TOKENS])))
    got = torch_logits(base)
    assert np.abs(got - want).max() < ATOL


def test_peft_loads_the_export_and_matches_mlx(run, exported, mlx_logits):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(run / "mlx_model")
    model = PeftModel.from_pretrained(base, exported).eval()
    got = torch_logits(model)
    diff = np.abs(got - mlx_logits).max()
    print(f"PEFT vs MLX max |logit difference|: {diff:.2e}")
    assert diff < ATOL


def test_peft_names_shapes_and_scale(run, exported):
    from safetensors.numpy import load_file

    mlx = load_file(run / "adapters" / "adapters.safetensors")
    peft = load_file(exported / "adapter_model.safetensors")
    modules = [f"model.layers.{n}.{m}" for n in range(2)
               for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    assert sorted(peft) == sorted(f"base_model.model.{m}.lora_{ab}.weight" for m in modules for ab in "AB")
    for m in modules:
        a, b = mlx[f"{m}.lora_a"], mlx[f"{m}.lora_b"]
        assert a.shape[1] == RANK and b.shape[0] == RANK
        np.testing.assert_array_equal(peft[f"base_model.model.{m}.lora_A.weight"], a.T)
        np.testing.assert_array_equal(peft[f"base_model.model.{m}.lora_B.weight"], b.T)
        assert peft[f"base_model.model.{m}.lora_A.weight"].dtype == a.dtype
    config = json.loads((exported / "adapter_config.json").read_text())
    mlx_scale = json.loads((run / "adapters" / "adapter_config.json").read_text())["lora_parameters"]["scale"]
    assert config["lora_alpha"] / config["r"] == mlx_scale == ALPHA / RANK
    assert config["r"] == RANK and sorted(config["target_modules"]) == sorted(TARGETS)
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert config["use_rslora"] is False and "layers_to_transform" not in config
    # "tests/tiny-llama" is not a local path: it is recorded as the (Hub) name it is.
    assert config["base_model_name_or_path"] == "tests/tiny-llama"


def private_and_whole(out):
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), [oct(p.stat().st_mode) for p in files]
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


def test_outputs_are_private_and_atomic(exported, fused):
    private_and_whole(exported)
    private_and_whole(fused)


def test_fused_model_matches_in_mlx_and_transformers(fused, mlx_logits):
    import mlx_lm.utils
    from transformers import AutoModelForCausalLM

    model, _ = mlx_lm.utils.load(str(fused))
    got_mlx = np.array(model(mx.array([TOKENS])))
    hf = AutoModelForCausalLM.from_pretrained(fused).eval()
    got_hf = torch_logits(hf)
    d_mlx, d_hf = np.abs(got_mlx - mlx_logits).max(), np.abs(got_hf - mlx_logits).max()
    print(f"fused vs adapters max |logit difference|: mlx-lm {d_mlx:.2e}, transformers {d_hf:.2e}")
    assert d_mlx < ATOL and d_hf < ATOL
    assert (fused / "tokenizer.json").read_bytes() == (fused.parent / "mlx_model" / "tokenizer.json").read_bytes()
    config = json.loads((fused / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization" not in config


def test_export_again_replaces_and_refuses_foreign_dirs(run, exported, tmp_path):
    info = export_peft(run / "adapters", exported, "some/base")
    assert info["rank"] == RANK and info["scale"] == ALPHA / RANK
    assert json.loads((exported / "adapter_config.json").read_text())["base_model_name_or_path"] == "some/base"
    # The mlx adapters directory is not a PEFT export: never written over.
    with pytest.raises(InputError, match="not a previous PEFT export"):
        export_peft(run / "adapters", run / "adapters", "some/base")
    assert (run / "adapters" / "adapters.safetensors").is_file()
    with pytest.raises(InputError, match="not a previous fused model"):
        fuse_model(run / "mlx_model", run / "adapters", run / "mlx_model")
    with pytest.raises(InputError, match="nothing: no such directory"):
        export_peft(tmp_path / "nothing", tmp_path / "out", "x")
    assert not (tmp_path / "out").exists()


def test_bf16_adapters_on_some_layers(run, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    adapters = tmp_path / "adapters"
    adapters.mkdir()
    a = mx.random.normal((64, 4), key=mx.random.key(1)).astype(mx.bfloat16)
    b = mx.random.normal((4, 64), key=mx.random.key(2)).astype(mx.bfloat16)
    mx.save_safetensors(str(adapters / "adapters.safetensors"),
                        {"model.layers.1.self_attn.q_proj.lora_a": a, "model.layers.1.self_attn.q_proj.lora_b": b})
    # mlx-lm's num_layers counts from the end: 1 of 2 layers means layer 1 only.
    (adapters / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": {"rank": 4, "scale": 2.5, "keys": ["q_proj"]}}))
    export_peft(adapters, tmp_path / "peft", "org/base")
    got = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    weight = got["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    assert weight.dtype == torch.bfloat16 and tuple(weight.shape) == (4, 64)
    assert torch.equal(weight.float(), torch.from_numpy(np.array(a.astype(mx.float32))).T)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 10 and config["r"] == 4  # no lora_alpha in the mlx config: scale * r
    assert config["layers_to_transform"] == [1] and config["layers_pattern"] == "layers"
    # PEFT wraps layer 1 alone and loads both matrices (no missing or unexpected keys).
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(run / "mlx_model"), tmp_path / "peft")
    layers = model.base_model.model.model.layers
    assert not hasattr(layers[0].self_attn.q_proj, "lora_A") and hasattr(layers[1].self_attn.q_proj, "lora_A")
    assert torch.equal(layers[1].self_attn.q_proj.lora_B["default"].weight.float(),
                       torch.from_numpy(np.array(b.astype(mx.float32))).T)


def test_quantized_base_fuses_dequantized_for_transformers(run, tmp_path):
    """QLoRA: adapters trained on a 4-bit base; `--dequantize` gives a full-precision
    model that transformers loads, with the logits of the quantized base + adapters."""
    import shutil

    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import load, quantize_model, save_config, save_model
    from transformers import AutoModelForCausalLM

    from mathlora_daemon.training.model import adapter_config, apply_lora, load_base, save_adapters

    model, _, config = load_base(run / "mlx_model")
    model, config = quantize_model(model, config, group_size=64, bits=4)
    qdir = tmp_path / "q_model"
    save_model(qdir, model)
    save_config(config, config_path=qdir / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(run / "mlx_model" / name, qdir / name)
    model, _, _ = load_base(qdir)
    cfg = lora_config()
    keys = apply_lora(model, cfg)
    model.update(tree_unflatten([(name, 0.1 * mx.random.normal(value.shape, key=mx.random.key(i)))
                                 for i, (name, value) in enumerate(tree_flatten(model.trainable_parameters()))]))
    save_adapters(model, tmp_path / "adapters", adapter_config(cfg, len(model.layers), keys))
    qlora, _ = load(str(qdir), adapter_path=str(tmp_path / "adapters"))
    want = np.array(qlora(mx.array([TOKENS])))

    info = fuse_model(qdir, tmp_path / "adapters", tmp_path / "fused", dequantize=True)
    assert info["transformers_loadable"] and not info["quantized"]
    assert "quantization" not in json.loads((tmp_path / "fused" / "config.json").read_text())
    got = torch_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval())
    diff = np.abs(got - want).max()
    print(f"dequantized fused (transformers) vs QLoRA (mlx) max |logit difference|: {diff:.2e}")
    assert diff < ATOL


def test_a_failed_write_is_a_temporary_failure_naming_the_output(tmp_path):
    """MLX reports a full disk as RuntimeError, not OSError: both become exit 75 with
    the output path and the reason; anything else is left alone."""
    import errno

    from mathlora_daemon.errors import TemporaryFailure
    from mathlora_daemon.modelio.export import write_failure, writing_output

    out = tmp_path / "made" / "peft"
    error = write_failure(OSError(errno.ENOSPC, "No space left on device"), out)
    assert isinstance(error, TemporaryFailure) and f"--out {out}: no space left on device" in str(error)
    huge = RuntimeError(f"[write] Unable to write {1 << 60} bytes to file.")
    assert f"--out {out}: no space left on device" in str(write_failure(huge, out))
    assert write_failure(RuntimeError("some other MLX error"), out) is None
    assert write_failure(OSError(errno.EACCES, "Permission denied"), out) is None
    with pytest.raises(TemporaryFailure):
        with writing_output(out):
            out.parent.mkdir()
            raise huge
    assert not (tmp_path / "made").exists()  # the parent it created is removed again
