"""Demo model assets: a byte-level BPE tokenizer and a tiny random Llama, written in
the same directory layout as a model converted with mlx_lm, so the demo exercises the
real loading path (`mlx_lm.utils.load`) without downloading anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model, ModelArgs
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from mathlora_checkpoints.fsio import atomic_write_text, ensure_private_dir
from mathlora_daemon.training.model import save_safetensors_durable

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# Order fixes the ids: the trainer assigns special tokens 0, 1, 2 in this order.
SPECIAL_TOKENS = (BOS, EOS, PAD)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
# The output layer is tied to the embedding and frozen under LoRA, so the embedding's
# scale caps how confident the model can ever get: with hidden 128 and std 0.02 no logit
# exceeds ~2.5 and the loss cannot fall below ~5.8. Std 0.1 starts near uniform (loss
# ~6.8 for 512 tokens) and leaves LoRA room to learn (measured: ~4.8 after 80 steps).
EMBED_INIT_STD = 0.1
# DeepSeek-Math-7B-Instruct's own chat template, so the demo prompts its tiny model the
# way the real run prompts the real one (data.template = "chat").
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _private_dir(path: Path) -> Path:
    path = ensure_private_dir(Path(path))
    # ensure_private_dir leaves an existing directory's mode as it was.
    path.chmod(0o700)
    return path


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def train_tokenizer(
    texts: Iterable[str], out_dir: Path, vocab_size: int = 512, *, model_max_length: int = 512
) -> None:
    """Given training texts, an output directory and a vocabulary size, train a
    byte-level BPE and write tokenizer.json, tokenizer_config.json and
    special_tokens_map.json there (user-only modes).

    Ids 0, 1, 2 are <s>, </s>, <pad>; encoding prepends <s> like Llama tokenizers, and
    decoding the remaining ids gives the text back byte for byte. The same texts give
    the same files. Raise ValueError when vocab_size cannot hold the 256 byte symbols
    plus the special tokens.
    """
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be >= {min_vocab} for a byte-level BPE, got {vocab_size}")
    out_dir = _private_dir(out_dir)

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False so decode(encode(text)) is exact, not " " + text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # Seeding the full byte alphabet means any text encodes, even bytes unseen here.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    for token, want in zip(SPECIAL_TOKENS, (BOS_ID, EOS_ID, PAD_ID)):
        got = tok.token_to_id(token)
        if got != want:
            raise RuntimeError(f"special token {token} got id {got}, expected {want}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, BOS_ID)],
    )

    atomic_write_text(out_dir / "tokenizer.json", tok.to_str(pretty=True) + "\n")
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "model_max_length": model_max_length,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD},
    )


def write_tiny_model(
    out_dir: Path,
    vocab_size: int,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    max_position_embeddings: int = 512,
) -> dict:
    """Given an output directory, a vocabulary size, a seed and model dimensions,
    write config.json and model.safetensors for a randomly initialised float32 Llama
    with tied embeddings, and return the config dict.

    The same arguments give byte-identical weights. Raise ValueError when hidden_size
    is not divisible by num_heads or the head size is odd (RoPE rotates pairs).
    """
    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ValueError(
            f"hidden_size {hidden_size} must split into {num_heads} heads of even size"
        )
    out_dir = _private_dir(out_dir)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_heads,
        "head_dim": hidden_size // num_heads,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": EMBED_INIT_STD,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": "float32",
    }
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(config))
    # MLX's embedding init (std 1/sqrt(hidden)) is used tied as the output layer too,
    # which gives initial logits of std ~1; HF's 0.02 starts near ln(vocab) loss.
    embed = model.model.embed_tokens
    embed.weight = mx.random.normal(embed.weight.shape, scale=EMBED_INIT_STD, key=mx.random.key(seed))
    weights = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}
    mx.eval(weights)

    save_safetensors_durable(out_dir / "model.safetensors", weights)
    _write_json(out_dir / "config.json", config)
    return config


def build_demo_model_dir(
    out_dir: Path, texts: Iterable[str], seed: int = 0, vocab_size: int = 512, **dims
) -> Path:
    """Given an output directory, tokenizer training texts, a seed, a vocabulary size
    and optional model dimensions (the keyword arguments of write_tiny_model), write a
    loadable model directory (tokenizer + tiny Llama) and return its path.

    Files are 0o600 and the directory 0o700. Raise ValueError on bad dimensions or a
    vocabulary too small for a byte-level BPE; TypeError on an unknown dimension.
    """
    out_dir = _private_dir(out_dir)
    max_len = dims.get("max_position_embeddings", 512)
    train_tokenizer(texts, out_dir, vocab_size=vocab_size, model_max_length=max_len)
    # The trained vocabulary can come out smaller than asked when the texts run out of
    # merges; the embedding must match the real size or ids and rows disagree.
    real_vocab = Tokenizer.from_file(str(out_dir / "tokenizer.json")).get_vocab_size()
    write_tiny_model(out_dir, vocab_size=real_vocab, seed=seed, **dims)
    return out_dir


def pretrain_base(model_dir: Path, texts: list[str], steps: int, seed: int = 0, batch_size: int = 8,
                  learning_rate: float = 3e-3) -> list[float]:
    """Given a demo model directory, training texts and a step count, train every weight
    of the model for that many Adam steps on random batches of the texts, save it back
    in place and return the per-step losses.

    A random base gives LoRA nothing to build on (its generations stay noise), so the
    demo makes its base the way real ones are made, only smaller: pretrain first, then
    fine-tune. Deterministic for the same arguments.
    """
    import mlx.nn as nn
    import mlx.optimizers as optim
    import numpy as np
    from mlx_lm.utils import load

    from mathlora_daemon.training.batches import pad_batch
    from mathlora_daemon.training.prepare import encode_example
    from mathlora_daemon.training.step import masked_loss

    model, tokenizer = load(str(model_dir))
    sequences = [np.asarray(encode_example(tokenizer, t), dtype=np.int32) for t in texts]
    optimizer = optim.Adam(learning_rate=learning_rate)
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        picked = rng.choice(len(sequences), size=min(batch_size, len(sequences)), replace=False)
        tokens, lengths = pad_batch([sequences[i] for i in picked])
        (loss, _), grads = loss_and_grad(model, mx.array(tokens), mx.array(lengths))
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        losses.append(loss.item())
    save_safetensors_durable(model_dir / "model.safetensors", dict(tree_flatten(model.parameters())))
    return losses
