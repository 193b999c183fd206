"""Tests for daemon.demo_assets: the demo model directory loads with mlx_lm offline,
its tokenizer round-trips text exactly, and builds are reproducible."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import mlx_lm.utils
import pytest
from mlx.utils import tree_flatten

from mathlora_daemon.demo.assets import build_demo_model_dir, train_tokenizer, write_tiny_model
from mathlora_daemon.demo.mathgen import generate_problems

VOCAB = 512

ROUND_TRIP = [
    "Solve for x: 3x + 7 = 22",
    "Divide both sides by 3: x = 5.\nThe final answer is $\\boxed{5}$.",
    "Compute 4 + 3 * (8 - 5)^2.",
    "What is 35% of 240?",
    "f'(x) = 9x^2 - 4x + 5",
    "  leading spaces,   multi   space,\ttabs\t\tand trailing  ",
    "\n\nblank lines\n\n\n",
    "unseen bytes: é × ∑ 🙂 \\frac{1}{2} {}[]<>~`|",
]


def _texts(n: int = 300) -> list[str]:
    return [f"{it['problem']}\n{it['solution']}" for it in generate_problems(n, seed=0)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_demo_model_dir(tmp_path_factory.mktemp("demo") / "model", _texts(), seed=0)


@pytest.fixture
def loaded(model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_hub(*args, **kwargs):
        raise AssertionError("the demo model must load without the Hugging Face Hub")

    # mlx_lm reaches the hub only through snapshot_download; forbid it outright.
    monkeypatch.setattr(mlx_lm.utils, "snapshot_download", no_hub)
    return mlx_lm.utils.load(str(model_dir))


def test_directory_layout_and_modes(model_dir):
    names = sorted(p.name for p in model_dir.iterdir())
    assert names == [
        "config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert model_dir.stat().st_mode & 0o777 == 0o700
    for path in model_dir.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path.name


def test_config_is_hf_llama_style(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["torch_dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)
    assert config["vocab_size"] == VOCAB
    assert config["rms_norm_eps"] == 1e-5
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["add_bos_token"] is True
    assert tok_config["clean_up_tokenization_spaces"] is False
    assert tok_config["model_max_length"] == config["max_position_embeddings"]


def test_weights_are_float32_with_loader_names(model_dir):
    weights = mx.load(str(model_dir / "model.safetensors"))
    assert all(v.dtype == mx.float32 for v in weights.values())
    assert "model.embed_tokens.weight" in weights
    assert not any(k.startswith("lm_head") for k in weights)
    assert weights["model.embed_tokens.weight"].shape == (VOCAB, 128)


def test_load_offline_and_forward(loaded):
    model, tokenizer = loaded
    logits = model(mx.array([[0, 5, 6]]))
    assert logits.shape == (1, 3, VOCAB)
    assert logits.dtype == mx.float32
    assert bool(mx.all(mx.isfinite(logits)))
    names = {k for k, _ in tree_flatten(model.parameters())}
    assert "model.layers.1.self_attn.q_proj.weight" in names


def test_special_token_ids(loaded):
    _, tokenizer = loaded
    assert tokenizer.bos_token_id == 0
    assert tokenizer.eos_token_id == 1
    assert tokenizer.pad_token_id == 2
    assert tokenizer.eos_token_ids == {1}


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_encode_adds_bos_and_decode_round_trips(loaded, text):
    _, tokenizer = loaded
    ids = tokenizer.encode(text)
    assert ids[0] == 0
    assert 0 not in ids[1:] and 1 not in ids[1:]
    assert tokenizer.decode(ids[1:]) == text


def test_bpe_actually_merges(loaded):
    _, tokenizer = loaded
    text = "Solve for x: 3x + 7 = 22\nThe final answer is $\\boxed{5}$."
    # A trained vocabulary should compress the demo text well below one id per byte.
    assert len(tokenizer.encode(text)) < len(text.encode()) / 2


def test_demo_sequences_fit_the_context(loaded):
    _, tokenizer = loaded
    lengths = [len(tokenizer.encode(t)) for t in _texts(600)]
    assert max(lengths) + 1 <= 256  # + 1 for the EOS the trainer appends


def test_initial_loss_is_near_uniform(loaded):
    model, tokenizer = loaded
    ids = mx.array([tokenizer.encode(_texts(1)[0])])
    loss = nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).mean().item()
    # Std 0.1 embeddings start a little above uniform (about 6.8 against ln 512 = 6.24);
    # a saturated start (std 1.0 gives ~120) would make the demo's falling loss a sham.
    assert abs(loss - math.log(VOCAB)) < 1.0


def test_same_seed_builds_identical_files(tmp_path, model_dir):
    texts = _texts()
    other = build_demo_model_dir(tmp_path / "again", texts, seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (other / name).read_bytes() == (model_dir / name).read_bytes(), name
    changed = write_tiny_model(tmp_path / "seed1", vocab_size=VOCAB, seed=1)
    assert changed["vocab_size"] == VOCAB
    assert (tmp_path / "seed1" / "model.safetensors").read_bytes() != (
        model_dir / "model.safetensors"
    ).read_bytes()


def test_custom_dimensions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = build_demo_model_dir(
        tmp_path / "m",
        _texts(120),
        vocab_size=300,
        hidden_size=64,
        num_layers=1,
        num_heads=2,
        intermediate_size=96,
        max_position_embeddings=128,
    )
    model, tokenizer, config = mlx_lm.utils.load(str(out), return_config=True)
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 1)
    assert len(model.model.layers) == 1
    assert model(mx.array([[0, 3]])).shape == (1, 2, 300)
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 128


def test_bad_sizes_raise(tmp_path):
    with pytest.raises(ValueError):
        train_tokenizer(["abc"], tmp_path / "t", vocab_size=100)
    with pytest.raises(ValueError):
        write_tiny_model(tmp_path / "m", vocab_size=VOCAB, hidden_size=100, num_heads=3)
    assert not (tmp_path / "m").exists()


def test_streaming_detokenizer_matches_text(loaded):
    _, tokenizer = loaded
    text = "Compute 4 + 3 * (8 - 5)^2.\n  The final answer is $\\boxed{31}$. é 🙂"
    detok = tokenizer.detokenizer
    detok.reset()
    for token in tokenizer.encode(text)[1:]:
        detok.add_token(token)
    detok.finalize()
    assert detok.text == text


def test_small_corpus_shrinks_vocab_consistently(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Too little text to learn 512 entries: the model must follow the real vocabulary.
    out = build_demo_model_dir(tmp_path / "m", ["x = 1\n", "x = 2\n"], vocab_size=512)
    model, tokenizer, config = mlx_lm.utils.load(str(out), return_config=True)
    real = len(tokenizer.get_vocab())
    assert 259 <= real < 512
    assert config["vocab_size"] == real
    assert model(mx.array([[0, real - 1]])).shape == (1, 2, real)
