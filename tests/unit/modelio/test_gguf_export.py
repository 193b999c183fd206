"""`export --format gguf` without llama.cpp: the adapter GGUF holds the metadata and
tensor names llama.cpp reads, and its matrices give back the very delta MLX applies
(after undoing llama.cpp's Q/K row permutation); other architectures are refused; the
Ollama template renders the training prompt. (tests/e2e/test_llama_cpp.py runs the files
in the real llama.cpp.)"""

from __future__ import annotations

import json
import shutil

import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tuner.lora import LoRALinear

from mathlora_daemon.config import Config, LoraConfig, ModelConfig, to_toml
from mathlora_daemon.errors import InputError
from mathlora_daemon.evaluation.evaluate import STOP_MARKERS
from mathlora_daemon.modelio.gguf_export import export_gguf, llama_permute, modelfile_text, ollama_template
from mathlora_daemon.training.template import PromptFormat

DIMS = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from mathlora_daemon.demo.assets import build_demo_model_dir
    from mathlora_daemon.demo.mathgen import generate_problems
    from mathlora_daemon.training.model import adapter_config, apply_lora, load_base, save_adapters
    from mathlora_daemon.training.template import format_example

    run = tmp_path_factory.mktemp("gguf-export") / "run"
    build_demo_model_dir(run / "mlx_model", [format_example(r["problem"], r["solution"])
                                             for r in generate_problems(40, 0)], seed=0, **DIMS)
    cfg = Config(model=ModelConfig(name="tests/tiny", path="mlx_model"),
                 lora=LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.0, targets=TARGETS))
    (run / "mathlora.toml").write_text(to_toml(cfg))
    model, _, _ = load_base(run / "mlx_model")
    keys = apply_lora(model, cfg)
    key = mx.random.key(7)
    for _, module in model.named_modules():
        if isinstance(module, LoRALinear):
            key, ka, kb = mx.random.split(key, 3)
            module.lora_a = 0.1 * mx.random.normal(module.lora_a.shape, key=ka)
            module.lora_b = 0.1 * mx.random.normal(module.lora_b.shape, key=kb)
    save_adapters(model, run / "adapters", adapter_config(cfg, len(model.layers), keys))
    return run


def test_the_adapter_gguf_is_what_llama_cpp_reads_and_gives_mlx_s_delta(run, tmp_path):
    info = export_gguf(run / "adapters", run / "mlx_model", tmp_path / "gguf")
    assert info["tensors"] == 2 * 7 * DIMS["num_layers"] and info["alpha"] == ALPHA and info["rank"] == RANK
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / "adapter.gguf"))
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == pytest.approx(ALPHA)
    tensors = {t.name: np.array(t.data).reshape(tuple(reversed([int(x) for x in t.shape]))) for t in reader.tensors}
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}

    adapters = mx.load(str(run / "adapters" / "adapters.safetensors"))
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for layer in range(DIMS["num_layers"]):
        for leaf, gname in names.items():
            part = "self_attn" if leaf in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            a = np.array(adapters[f"model.layers.{layer}.{part}.{leaf}.lora_a"])  # (in, r)
            b = np.array(adapters[f"model.layers.{layer}.{part}.{leaf}.lora_b"])  # (r, out)
            mlx_delta = (ALPHA / RANK) * (a @ b).T  # (out, in), Hugging Face row order
            ga, gb = tensors[f"blk.{layer}.{gname}.weight.lora_a"], tensors[f"blk.{layer}.{gname}.weight.lora_b"]
            assert ga.shape == (RANK, a.shape[0]) and gb.shape == (b.shape[1], RANK)
            gguf_delta = (ALPHA / RANK) * gb @ ga  # llama.cpp: scale * B @ A, in its row order
            want = llama_permute(mlx_delta, DIMS["num_heads"]) if leaf in ("q_proj", "k_proj") else mlx_delta
            np.testing.assert_allclose(gguf_delta, want, rtol=1e-5, atol=1e-6)


def test_f16_and_replacing_a_previous_export(run, tmp_path):
    export_gguf(run / "adapters", run / "mlx_model", tmp_path / "gguf")
    export_gguf(run / "adapters", run / "mlx_model", tmp_path / "gguf", outtype="f16")
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / "adapter.gguf"))
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F16}
    with pytest.raises(InputError, match="not a previous GGUF export"):
        export_gguf(run / "adapters", run / "mlx_model", run / "mlx_model")
    with pytest.raises(InputError, match="--outtype q4"):
        export_gguf(run / "adapters", run / "mlx_model", tmp_path / "x", outtype="q4")


def test_other_architectures_are_refused_with_what_is_supported(run, tmp_path):
    model = shutil.copytree(run / "mlx_model", tmp_path / "qwen")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    with pytest.raises(InputError, match=r"'qwen2'.*llama.*--format peft"):
        export_gguf(run / "adapters", model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_ollama_template_renders_the_training_prompt(run):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(run / "mlx_model")
    for template in ("chat", "tutor"):
        fmt = PromptFormat.of(template, tok)
        text, stops = ollama_template(fmt, STOP_MARKERS)
        assert "{{ .Prompt }}" in text
        rendered = text.replace("{{ .Prompt }}", "What is 7 times 8?")
        bos = tok.bos_token or ""
        assert bos + rendered == fmt.prompt_text("What is 7 times 8?") or rendered == fmt.prompt_text(
            "What is 7 times 8?")
        assert tok.eos_token in stops
        if template == "tutor":
            assert "### Problem:" in stops
        card = modelfile_text("/models/base.gguf", text, stops)
        assert card.splitlines()[1:3] == ["FROM /models/base.gguf", "ADAPTER ./adapter.gguf"]
        assert f'TEMPLATE """{text}"""' in card and "PARAMETER temperature 0" in card
