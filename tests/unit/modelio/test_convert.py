"""Tests for daemon.convert on a tiny Hugging Face Llama built with transformers: the
safetensors and PyTorch .bin paths give the same MLX model (and transformers' logits),
bf16 stays bf16 bit for bit, 4-bit output trains with LoRA (QLoRA), errors are clear, and
the model directory appears whole or not at all. Nothing touches the network."""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch

from mathlora_daemon.cli import arguments, models
from mathlora_daemon.config import Config, load_config
from mathlora_daemon.errors import EXIT_CONFIG, InputError, TemporaryFailure
from mathlora_daemon.modelio import convert as conv
from mathlora_daemon.modelio.convert import (
    KIND_DIR,
    KIND_GGUF,
    KIND_REPO,
    cleanup_stale,
    convert_model,
    ensure_model,
    resolve_source,
)
from mathlora_daemon.rundir import RunDir

HF_DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=300)
IDS = [[0, 5, 17, 42, 99, 250, 3, 7, 120, 64]]
HF_TOL = 1e-4  # fp32 transformers vs fp32 MLX: different kernels, same math


def _texts() -> list[str]:
    from mathlora_daemon.demo.mathgen import generate_problems
    from mathlora_daemon.training.template import format_example

    return [format_example(r["problem"], r["solution"]) for r in generate_problems(60, seed=0)]


def save_bin_shards(model, out: Path, shards: int = 3, extra: dict | None = None) -> Path:
    """Write `model` the way older transformers (and DeepSeek-Math-7B-Instruct) did:
    pytorch_model-0000N-of-0000M.bin shards + pytorch_model.bin.index.json + config.json.
    (transformers 5 writes only safetensors, whatever safe_serialization says.)"""
    out.mkdir(parents=True)
    model.config.save_pretrained(out)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update(extra or {})
    keys = list(state)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.arange(len(keys)), shards), 1):
        name = f"pytorch_model-{i:05d}-of-{shards:05d}.bin"
        torch.save({keys[j]: state[keys[j]] for j in part}, out / name)
        weight_map.update({keys[j]: name for j in part})
    (out / conv.BIN_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny random fp32 Llama saved as safetensors (`st`) and as three .bin shards
    (`bin`, with an old-style rotary inv_freq buffer mlx-lm drops), tokenizer in both,
    and a bf16 .bin copy (`bf16`) with its state dict. Tests must not modify the dirs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mathlora_daemon.demo.assets import train_tokenizer

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**HF_DIMS)).eval()
    model.save_pretrained(root / "st")
    inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.arange(8, dtype=torch.float32)}
    save_bin_shards(model, root / "bin", extra=inv_freq)
    bf16_model = LlamaForCausalLM(LlamaConfig(**HF_DIMS)).to(torch.bfloat16)
    bf16_model.load_state_dict(model.state_dict())  # same values, rounded to bf16
    save_bin_shards(bf16_model, root / "bf16", shards=2)
    for name in ("st", "bin", "bf16"):
        train_tokenizer(_texts(), root / name, vocab_size=300)
    with torch.no_grad():
        logits = model(torch.tensor(IDS)).logits.numpy()
    return {"st": root / "st", "bin": root / "bin", "bf16": root / "bf16", "logits": logits,
            "bf16_state": {k: v.clone() for k, v in bf16_model.state_dict().items()}}


@pytest.fixture(scope="module")
def converted(hf, tmp_path_factory):
    """Both fp32 sources converted once (shared, do not modify)."""
    root = tmp_path_factory.mktemp("out")
    return {"st": (root / "st", convert_model(str(hf["st"]), root / "st")),
            "bin": (root / "bin", convert_model(str(hf["bin"]), root / "bin"))}


def mlx_logits(model_dir: Path) -> np.ndarray:
    from mlx_lm.utils import load

    model, _ = load(str(model_dir))
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".tmp-"))


# ---------------------------------------------------------------- source resolution

def test_resolve_source_kinds(hf, tmp_path, monkeypatch):
    assert resolve_source(str(hf["st"])) == conv.ModelSource(KIND_DIR, str(hf["st"].resolve()))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(str(gguf)).kind == KIND_GGUF
    assert resolve_source("deepseek-ai/deepseek-math-7b-instruct") == conv.ModelSource(
        KIND_REPO, "deepseek-ai/deepseek-math-7b-instruct")
    # A relative path is looked up in the given directories (the run dir) first.
    monkeypatch.chdir(tmp_path)
    assert resolve_source("m.gguf", [hf["st"].parent]).kind == KIND_GGUF
    assert resolve_source(hf["st"].name, [hf["st"].parent]).location == str(hf["st"].resolve())


@pytest.mark.parametrize("name", ["./missing", "missing.gguf", "/no/such/dir", "a/b/c", "not a repo/x y"])
def test_resolve_source_missing_paths(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="no such file or directory"):
        resolve_source(name)


def test_resolve_source_refuses_dir_without_config_and_other_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no config.json.*found: nothing"):
        resolve_source(str(tmp_path / "empty"))
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(InputError, match="not a .gguf"):
        resolve_source(str(tmp_path / "weights.pt"))


# ---------------------------------------------------------------- conversion paths

def test_bin_and_safetensors_give_the_same_model(hf, converted):
    (st_dir, st), (bin_dir, bn) = converted["st"], converted["bin"]
    assert (st["kind"], st["format"], bn["format"]) == (KIND_DIR, "safetensors", "bin")
    assert st["model_type"] == bn["model_type"] == "llama"
    assert st["tensors"] == bn["tensors"] == 21 and st["bytes"] > 0  # inv_freq dropped by mlx-lm
    assert bn["staged"]["shards"] == 3 and bn["staged"]["tensors"] == 22
    for out in (st_dir, bin_dir):
        names = {p.name for p in out.iterdir()}
        assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= names
        assert any(n.endswith(".safetensors") for n in names)
        assert (out.stat().st_mode & 0o777) == 0o700
        assert all((p.stat().st_mode & 0o777) == 0o600 for p in out.iterdir())
        assert leftovers(out.parent) == []
    a, b = mlx_logits(st_dir), mlx_logits(bin_dir)
    assert np.array_equal(a, b)
    assert np.abs(a - hf["logits"]).max() < HF_TOL


def test_bf16_bin_stays_bf16_bit_for_bit(hf, tmp_path):
    out = tmp_path / "mlx_model"
    summary = convert_model(str(hf["bf16"]), out)
    assert summary["dtypes"] == {"BF16": summary["tensors"]}
    weights = {}
    for f in out.glob("*.safetensors"):
        weights.update(mx.load(str(f)))
    state = hf["bf16_state"]
    assert set(weights) == set(state)
    for name, arr in weights.items():
        assert arr.dtype == mx.bfloat16, name
        want = state[name].view(torch.int16).numpy()
        assert np.array_equal(np.array(arr.view(mx.int16)), want), name


def test_quantize_4_loads_quantized_and_trains_with_lora(hf, tmp_path, make_token_cache):
    from mathlora_daemon.training.model import apply_lora, load_base, trainable_count
    from mathlora_daemon.training.step import make_optimizer, train_step

    out = tmp_path / "q4"
    summary = convert_model(str(hf["bin"]), out, quantize_bits=4)
    assert summary["quantize_bits"] == 4
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    model, _tok, _ = load_base(out)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(model.layers[1].mlp.down_proj, nn.QuantizedLinear)
    cfg = Config()
    apply_lora(model, cfg)
    # rank 8 on q_proj and v_proj (64 x 64) of 2 layers: 2 * 2 * 8 * (64 + 64)
    assert trainable_count(model) == 4096
    cache = make_token_cache([[0, 5, 9, 11, 40, 7], [0, 3, 8, 2, 1]])
    before = np.array(model.layers[0].self_attn.q_proj.lora_b)
    result = train_step(model, make_optimizer(1e-2), cache, [np.array([0, 1])], seed=0, global_step=0)
    assert np.isfinite(result.loss) and result.tokens == 9
    assert not np.array_equal(np.array(model.layers[0].self_attn.q_proj.lora_b), before)


def test_shard_writer_is_plain_safetensors(tmp_path):
    from safetensors.torch import load_file

    base = torch.randn(4, 6)
    tensors = {"bf16": torch.randn(3, 5).to(torch.bfloat16), "f16": torch.randn(7).half(),
               "i64": torch.arange(5), "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
               "empty": torch.zeros(0, 3), "transposed": base.t(), "shares_storage": base,
               "flag": torch.tensor([True, False])}
    path = tmp_path / "s.safetensors"
    assert conv.write_safetensors_shard(tensors, path) == sum(t.numel() * t.element_size() for t in tensors.values())
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    with pytest.raises(InputError, match="complex64"):
        conv.write_safetensors_shard({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")


def test_already_quantized_source_refuses_requantizing(hf, tmp_path):
    q8 = tmp_path / "q8"
    convert_model(str(hf["st"]), q8, quantize_bits=8)
    with pytest.raises(InputError, match="already quantized"):
        convert_model(str(q8), tmp_path / "again", quantize_bits=4)
    copy = convert_model(str(q8), tmp_path / "copy")  # an MLX dir converts as it is
    assert copy["format"] == "safetensors" and (tmp_path / "copy" / "config.json").is_file()


# ---------------------------------------------------------------- errors

def test_unknown_model_type_names_it(hf, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf["st"], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "no_such_arch"}))
    with pytest.raises(InputError, match="no_such_arch") as err:
        convert_model(str(src), tmp_path / "out")
    assert err.value.exit_code == EXIT_CONFIG
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_dir_without_weights_lists_what_it_found(hf, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(hf["st"] / "config.json", src)
    (src / "training_args.bin").write_bytes(b"not weights")
    with pytest.raises(InputError, match=r"no model weights.*found: config.json, training_args.bin"):
        convert_model(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_torch_says_how_to_install(hf, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(InputError, match=r"pip install 'mathlora-daemon\[convert\]'"):
        convert_model(str(hf["bin"]), tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_bin_that_is_not_a_state_dict_is_refused(hf, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf["bin"], src)
    shard = sorted(src.glob("pytorch_model-*.bin"))[0]
    torch.save({"step": 3, "note": "a training state, not weights"}, shard)
    with pytest.raises(InputError, match=shard.name):
        convert_model(str(src), tmp_path / "out")
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------- atomicity

def test_failure_midway_leaves_nothing(hf, tmp_path, monkeypatch):
    real, calls = conv.write_safetensors_shard, []

    def failing(tensors, path):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(conv, "write_safetensors_shard", failing)
    with pytest.raises(OSError, match="No space left"):
        convert_model(str(hf["bin"]), tmp_path / "mlx_model")
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_failure_in_mlx_step_leaves_nothing(hf, tmp_path, monkeypatch, recording_log):
    def half_written(hf_dir, out, bits, dtype):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "_mlx_convert", half_written)
    with pytest.raises(KeyboardInterrupt):
        convert_model(str(hf["st"]), tmp_path / "mlx_model", log=recording_log)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert recording_log.names() == ["model.convert.start", "model.convert.failed"]


def test_stale_temporaries_are_cleaned_and_an_old_model_put_back(tmp_path):
    out = tmp_path / "mlx_model"
    dead = 2**22 + 12345  # above Linux's pid_max, so no such process
    (tmp_path / f".tmp-convert-mlx_model-{dead}-abcd0123/model").mkdir(parents=True)
    old = tmp_path / f".tmp-old-mlx_model-{dead}-ef012345"
    old.mkdir()
    (old / "config.json").write_text("{}")
    alive = tmp_path / f".tmp-convert-mlx_model-{os.getpid()}-01234567"
    alive.mkdir()
    other = tmp_path / f".tmp-convert-other-{dead}-abcd0123"
    other.mkdir()
    longer = tmp_path / f".tmp-convert-mlx_model-2-{dead}-abcd0123"  # belongs to mlx_model-2
    longer.mkdir()
    assert len(cleanup_stale(out)) == 2
    assert (out / "config.json").is_file()  # the set-aside model is back
    assert leftovers(tmp_path) == sorted([alive.name, other.name, longer.name])


def test_existing_output_needs_replace_and_replace_is_whole(hf, converted, tmp_path, monkeypatch):
    out = tmp_path / "mlx_model"
    shutil.copytree(converted["st"][0], out)
    before = (out / "config.json").read_text()
    with pytest.raises(InputError, match="already exists"):
        convert_model(str(hf["st"]), out, quantize_bits=4)

    def broken(hf_dir, new, bits, dtype):
        raise ValueError("boom")

    with monkeypatch.context() as m:
        m.setattr(conv, "_mlx_convert", broken)
        with pytest.raises(ValueError):
            convert_model(str(hf["st"]), out, quantize_bits=4, replace=True)
    assert (out / "config.json").read_text() == before and leftovers(tmp_path) == []

    summary = convert_model(str(hf["st"]), out, quantize_bits=4, replace=True)
    assert summary["published"] and "quantization" in json.loads((out / "config.json").read_text())
    assert leftovers(tmp_path) == []


def test_output_may_not_hold_the_source(hf, tmp_path):
    src = tmp_path / "run" / "hf"
    shutil.copytree(hf["st"], src)
    with pytest.raises(InputError, match="cannot be the source"):
        convert_model(str(src), tmp_path / "run", replace=True)
    assert (src / "config.json").is_file()


# ---------------------------------------------------------------- other sources

def test_repo_id_downloads_then_converts(hf, tmp_path, monkeypatch):
    import huggingface_hub

    asked = []

    def fake_snapshot(repo, allow_patterns=None, **kw):
        asked.append((repo, tuple(allow_patterns)))
        return str(hf["bin"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files",
                        lambda self, repo, **kw: ["config.json", "pytorch_model-00001-of-00003.bin"])
    summary = convert_model("someone/tiny-llama", tmp_path / "out")
    assert (summary["kind"], summary["format"]) == (KIND_REPO, "bin")
    assert asked[0] == ("someone/tiny-llama", ("*.json",))  # config first: architecture checked early
    assert "pytorch_model*.bin" in asked[1][1] and "model*.safetensors" not in asked[1][1]


def test_repo_errors_name_the_repo(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    response = types.SimpleNamespace(headers={}, request=None)

    def missing(repo, **kw):
        raise RepositoryNotFoundError("404 Client Error: Repository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(InputError, match="'nobody/nothing'.*not found"):
        convert_model("nobody/nothing", tmp_path / "out")

    def flaky(repo, **kw):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", flaky)
    with pytest.raises(TemporaryFailure, match="nobody/nothing"):
        convert_model("nobody/nothing", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_gguf_source_goes_to_convert_gguf(converted, tmp_path, monkeypatch):
    calls = []

    def fake_convert_gguf(gguf_path, out_dir, quantize_bits=0, log=None):
        calls.append((gguf_path, quantize_bits))
        shutil.copytree(converted["st"][0], out_dir)
        return {"tensors": 21}

    monkeypatch.setitem(sys.modules, "mathlora_daemon.modelio.gguf",
                        types.SimpleNamespace(convert_gguf=fake_convert_gguf))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    summary = convert_model(str(gguf), tmp_path / "mlx_model", quantize_bits=8)
    assert calls == [(gguf.resolve(), 8)]
    assert (summary["kind"], summary["format"], summary["gguf"]) == (KIND_GGUF, "gguf", {"tensors": 21})
    assert (tmp_path / "mlx_model" / "config.json").is_file() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- run start and CLI

def test_ensure_model_converts_once(hf, tmp_path, recording_log):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(hf["st"], run / "hf")
    cfg = load_config(None, ["model.name=hf"])  # relative: looked up in the run dir
    (run / "mlx_model").mkdir()  # an empty leftover directory is fine to replace
    assert ensure_model(cfg, RunDir(run), recording_log) == run / "mlx_model"
    done = recording_log.fields("model.convert.done")
    assert done["kind"] == KIND_DIR and done["bytes"] > 0 and done["seconds"] >= 0
    assert ensure_model(cfg, RunDir(run), recording_log) == run / "mlx_model"
    assert recording_log.names() == ["model.convert.start", "model.convert.done"]


def test_ensure_model_takes_back_a_model_set_aside_by_a_killed_replace(converted, tmp_path, recording_log):
    dead = 2**22 + 54321
    shutil.copytree(converted["st"][0], tmp_path / f".tmp-old-mlx_model-{dead}-0a1b2c3d")
    assert ensure_model(Config(), RunDir(tmp_path), recording_log) == tmp_path / "mlx_model"
    assert (tmp_path / "mlx_model" / "config.json").is_file() and leftovers(tmp_path) == []
    assert recording_log.names() == []  # nothing converted (the default model.name is never fetched)


def test_ensure_model_never_overwrites_other_content(tmp_path, recording_log):
    (tmp_path / "mlx_model").mkdir()
    (tmp_path / "mlx_model" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"not a model directory.*notes.txt"):
        ensure_model(Config(), RunDir(tmp_path), recording_log)
    assert recording_log.names() == []


def parse(argv: list[str]):
    return arguments.parse(["convert", *argv])


def test_cli_convert_then_force(hf, tmp_path, capsys):
    run = tmp_path / "run"
    assert models.convert(parse(["--run-dir", str(run), "--set", f"model.name={hf['bin']}"])) == 0
    assert "converted" in capsys.readouterr().out
    assert (run / "mlx_model" / "config.json").is_file()
    events = [json.loads(line)["event"] for line in (run / "logs" / "daemon.jsonl").read_text().splitlines()]
    assert "model.convert.start" in events and "model.convert.done" in events

    args = parse(["--run-dir", str(run), "--source", str(hf["st"]), "--quantize", "4"])
    with pytest.raises(InputError, match="--force") as err:
        models.convert(args)
    assert err.value.exit_code == EXIT_CONFIG
    assert "quantization" not in json.loads((run / "mlx_model" / "config.json").read_text())

    assert models.convert(parse(["--run-dir", str(run), "--source", str(hf["st"]), "--quantize", "4", "--force"])) == 0
    assert json.loads((run / "mlx_model" / "config.json").read_text())["quantization"]["bits"] == 4
    assert leftovers(run) == []


def test_cli_refuses_bad_input_before_writing(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(InputError, match="no such file or directory"):
        models.convert(parse(["--run-dir", str(run), "--source", "./nowhere"]))
    with pytest.raises(InputError, match="model.quantize_bits"):
        models.convert(parse(["--run-dir", str(run), "--set", "model.quantize_bits=3"]))
    assert not run.exists()


def test_cli_refuses_while_a_daemon_runs(hf, tmp_path):
    from mathlora_daemon.runtime.lock import acquire_lock

    run = tmp_path / "run"
    run.mkdir()
    with acquire_lock(RunDir(run)):
        with pytest.raises(TemporaryFailure, match="stop the daemon"):
            models.convert(parse(["--run-dir", str(run), "--source", str(hf["st"])]))
    assert not (run / "mlx_model").exists()
