"""Tests for training/rollouts.py on the tiny Llama: batched sampling with a KV cache that
matches a cache-free greedy decode, per-completion seeds (the same ids run after run, in
a fresh process, whatever the batch size or the global random state), end-of-sequence
and length limits, temperature and top-p, eval mode, and the current adapters."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tuner.lora import LoRALinear

from mathlora_daemon.config import load_config
from mathlora_daemon.training.model import adapters_off, apply_lora, load_base
from mathlora_daemon.training.rollouts import (
    Rollout,
    cache_bytes_per_token,
    sample_rollouts,
    sample_tokens,
)
from mathlora_daemon.training.template import PromptFormat

PROBLEMS = ["What is 2 + 3?", "Solve for x: 3x + 4 = 19. Show every step of the working, please.",
            "Find gcd(12, 18).", "Compute 7 * 8 - 5."]
G = 6
MAX_NEW = 24


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    """A tiny model and tokenizer of this module's own (the session's are shared)."""
    model, tokenizer, _ = load_base(tiny_model_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts(loaded) -> list[list[int]]:
    ids = [PromptFormat.of("tutor", loaded[1]).prompt_ids(p) for p in PROBLEMS]
    assert len({len(p) for p in ids}) > 1  # the batches really are padded
    return ids


def seeds_for(n: int, g: int = G, base: int = 1000) -> list[list[int]]:
    return [[base + 37 * i + j for j in range(g)] for i in range(n)]


def ids_of(rollouts: list[Rollout]) -> list[list[int]]:
    return [r.completion_ids for r in rollouts]


def greedy_no_cache(model, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    """The reference: the whole sequence through the model at every token, no cache, no padding."""
    tokens, out = list(prompt), []
    for _ in range(n):
        token = int(mx.argmax(model(mx.array([tokens]))[0, -1]).item())
        out.append(token)
        tokens.append(token)
        if token in eos:
            break
    return out


# --- shape of the result --------------------------------------------------------------

def test_rollouts_come_in_order_with_consistent_fields(loaded, prompts):
    model, tokenizer = loaded
    eos = set(tokenizer.eos_token_ids)
    rollouts, stats = sample_rollouts(model, tokenizer, prompts, seeds_for(len(prompts)), MAX_NEW)
    assert [(r.row, r.sample) for r in rollouts] == [(i, g) for i in range(len(prompts)) for g in range(G)]
    for r in rollouts:
        assert r.prompt_ids == prompts[r.row]
        assert 1 <= len(r.completion_ids) <= MAX_NEW
        assert not eos & set(r.completion_ids[:-1])  # nothing after an end-of-sequence token
        assert r.finished == (r.completion_ids[-1] in eos)
        if not r.finished:
            assert len(r.completion_ids) == MAX_NEW
        assert r.text == tokenizer.decode(r.completion_ids, skip_special_tokens=True)
    assert any(r.finished for r in rollouts) and not all(r.finished for r in rollouts)  # both ends are exercised
    assert stats["tokens"] == sum(len(r.completion_ids) for r in rollouts)
    assert stats["completions"] == len(rollouts) and stats["finished"] == sum(r.finished for r in rollouts)
    assert stats["seconds"] >= 0 and stats["tokens_per_s"] >= 0


def test_prompts_may_have_different_sample_counts(loaded, prompts):
    model, tokenizer = loaded
    rollouts, _ = sample_rollouts(model, tokenizer, prompts[:2], [[5], [6, 7, 8]], 4)
    assert [(r.row, r.sample) for r in rollouts] == [(0, 0), (1, 0), (1, 1), (1, 2)]


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(batch_size=0), "batch_size"),
    (dict(seeds=[[1]]), "seeds for 1"),
    (dict(seeds=[[1], [-1]]), "seeds"),
    (dict(prompts=[[5], []]), "no tokens"),
])
def test_bad_arguments_are_refused(loaded, kwargs, match):
    model, tokenizer = loaded
    args = dict(prompts=[[5, 6], [7]], seeds=[[1], [2]], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        sample_rollouts(model, tokenizer, **args)


# --- the KV cache and the padding -------------------------------------------------------

@pytest.mark.parametrize("batch_size", [1, 32])
def test_temperature_zero_is_greedy_and_matches_a_cache_free_decode(loaded, prompts, batch_size):
    """Greedy decoding (validation accuracy) through the same batched, cached path."""
    model, tokenizer = loaded
    eos = set(tokenizer.eos_token_ids)
    rollouts, _ = sample_rollouts(model, tokenizer, prompts, seeds_for(len(prompts), g=1), 16,
                                  temperature=0.0, batch_size=batch_size)
    for r in rollouts:
        assert r.completion_ids == greedy_no_cache(model, r.prompt_ids, 16, eos)


@pytest.mark.parametrize("batch_size", [1, 32])
def test_near_zero_temperature_is_greedy_and_matches_a_cache_free_decode(loaded, prompts, batch_size):
    # Prompts of different lengths share a batch: padding that leaked into a row, a wrong
    # position or a stale cache entry would change its argmax path.
    model, tokenizer = loaded
    eos = set(tokenizer.eos_token_ids)
    rollouts, _ = sample_rollouts(model, tokenizer, prompts, seeds_for(len(prompts), g=2), 16,
                                  temperature=1e-6, batch_size=batch_size)
    for r in rollouts:
        assert r.completion_ids == greedy_no_cache(model, r.prompt_ids, 16, eos)


def test_a_tiny_nucleus_is_greedy(loaded, prompts):
    model, tokenizer = loaded
    eos = set(tokenizer.eos_token_ids)
    rollouts, _ = sample_rollouts(model, tokenizer, prompts, seeds_for(len(prompts), g=2), 12, top_p=1e-6)
    for r in rollouts:
        assert r.completion_ids == greedy_no_cache(model, r.prompt_ids, 12, eos)


# --- seeding and determinism -----------------------------------------------------------

def test_same_seeds_same_completions_whatever_the_global_random_state(loaded, prompts):
    model, tokenizer = loaded
    seeds = seeds_for(len(prompts))
    mx.random.seed(1)
    first, _ = sample_rollouts(model, tokenizer, prompts, seeds, MAX_NEW)
    mx.random.seed(2)
    before = np.array(mx.random.state[0])
    second, _ = sample_rollouts(model, tokenizer, prompts, seeds, MAX_NEW)
    assert ids_of(first) == ids_of(second)
    assert (np.array(mx.random.state[0]) == before).all()  # the global generator is not consumed


def test_batch_split_does_not_change_any_completion(loaded, prompts):
    # On the CPU the tiny model's logits for a row are bitwise the same whatever shares
    # its batch (and however much padding that brings), so the ids are equal.
    model, tokenizer = loaded
    seeds = seeds_for(len(prompts))
    by_size = {size: ids_of(sample_rollouts(model, tokenizer, prompts, seeds, MAX_NEW, batch_size=size)[0])
               for size in (32, 4, 5, 1)}
    assert by_size[32] == by_size[4] == by_size[5] == by_size[1]


def test_the_default_batch_holds_every_completion_of_a_small_model_and_changes_none(loaded, prompts):
    model, tokenizer = loaded
    seeds = seeds_for(len(prompts))
    default, stats = sample_rollouts(model, tokenizer, prompts, seeds, MAX_NEW)
    assert stats["batch_size"] == len(prompts) * G  # one batch: one decode pass for the whole step
    assert ids_of(default) == ids_of(sample_rollouts(model, tokenizer, prompts, seeds, MAX_NEW, batch_size=1)[0])


def test_cache_bytes_per_token_is_the_models_kv_geometry(loaded):
    model, _ = loaded
    args = model.args
    kv_heads = args.num_key_value_heads or args.num_attention_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    dtype_bytes = model.layers[0].self_attn.k_proj.weight.dtype.size
    assert cache_bytes_per_token(model) == 2 * args.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def test_a_rows_draws_depend_on_its_seed_only(loaded, prompts):
    model, tokenizer = loaded
    # One seed used by two samples of a prompt, in different batch positions: the same completion.
    rollouts, _ = sample_rollouts(model, tokenizer, prompts[:2], [[11, 12, 11], [12, 11, 13]], MAX_NEW)
    by = {(r.row, r.sample): r.completion_ids for r in rollouts}
    assert by[0, 0] == by[0, 2] != by[0, 1]
    assert by[1, 0] != by[1, 1]
    # ... and the same (prompt, seed) alone, in another order, gives it again.
    alone, _ = sample_rollouts(model, tokenizer, [prompts[0]], [[11]], MAX_NEW)
    assert alone[0].completion_ids == by[0, 0]


def test_distinct_seeds_give_diverse_completions(loaded, prompts):
    model, tokenizer = loaded
    rollouts, _ = sample_rollouts(model, tokenizer, prompts, seeds_for(len(prompts)), MAX_NEW)
    for i in range(len(prompts)):
        assert len({tuple(r.completion_ids) for r in rollouts if r.row == i}) > 1


def test_a_longer_limit_extends_the_same_completions(loaded, prompts):
    # The key of token t comes from the seed and t, not from max_new_tokens.
    model, tokenizer = loaded
    seeds = seeds_for(len(prompts))
    short, _ = sample_rollouts(model, tokenizer, prompts, seeds, 8)
    long, _ = sample_rollouts(model, tokenizer, prompts, seeds, MAX_NEW)
    for s, l in zip(short, long):
        assert l.completion_ids[:len(s.completion_ids)] == s.completion_ids
        assert s.finished == (l.finished and len(l.completion_ids) <= 8)


def test_a_fresh_process_draws_the_same_completions(tiny_model_dir, loaded, prompts):
    model, tokenizer = loaded
    seeds = seeds_for(len(prompts))
    here, _ = sample_rollouts(model, tokenizer, prompts, seeds, MAX_NEW, temperature=0.8, top_p=0.9, batch_size=8)
    script = textwrap.dedent(f"""
        import json, sys
        import mlx.core as mx
        from mathlora_daemon.training.model import load_base
        from mathlora_daemon.training.rollouts import sample_rollouts
        mx.random.seed(12345)  # a different global state: it must not matter
        model, tokenizer, _ = load_base({str(tiny_model_dir)!r})
        rollouts, _ = sample_rollouts(model, tokenizer, {prompts!r}, {seeds!r}, {MAX_NEW},
                                      temperature=0.8, top_p=0.9, batch_size=32)
        json.dump([r.completion_ids for r in rollouts], sys.stdout)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ids_of(here)


# --- end of sequence --------------------------------------------------------------------

def test_every_eos_id_ends_a_completion(tiny_model_dir, prompts):
    model, tokenizer, _ = load_base(tiny_model_dir)
    seeds = seeds_for(len(prompts))
    before, _ = sample_rollouts(model, tokenizer, prompts, seeds, MAX_NEW)
    target = next(r for r in before if not r.finished)
    stop = target.completion_ids[3]  # a token it draws, now also an end-of-sequence id
    tokenizer.eos_token_ids = set(tokenizer.eos_token_ids) | {stop}
    after, _ = sample_rollouts(model, tokenizer, prompts, seeds, MAX_NEW)
    for b, a in zip(before, after):
        cut = next((k + 1 for k, t in enumerate(b.completion_ids) if t in tokenizer.eos_token_ids),
                   len(b.completion_ids))
        assert a.completion_ids == b.completion_ids[:cut]
        assert a.finished == (a.completion_ids[-1] in tokenizer.eos_token_ids)
    changed = after[before.index(target)]
    assert changed.finished and changed.completion_ids[-1] == stop and len(changed.completion_ids) <= 4


# --- sampling ---------------------------------------------------------------------------

def frequencies(probs: list[float], temperature: float, top_p: float, n: int = 4000) -> np.ndarray:
    logits = mx.broadcast_to(mx.log(mx.array(probs)), (n, len(probs)))
    keys = mx.stack([mx.random.key(s) for s in range(n)])
    tokens = np.array(sample_tokens(logits, keys, temperature, top_p))
    return np.bincount(tokens, minlength=len(probs)) / n


def test_samples_follow_the_tempered_distribution():
    probs = [0.5, 0.3, 0.15, 0.05]
    assert np.abs(frequencies(probs, 1.0, 1.0) - probs).max() < 0.03
    tempered = np.array(probs) ** 2 / (np.array(probs) ** 2).sum()  # temperature 0.5 squares p
    assert np.abs(frequencies(probs, 0.5, 1.0) - tempered).max() < 0.03


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.5 + 0.3 reaches 0.7: the two top tokens, renormalized (0.625, 0.375).
    freq = frequencies([0.5, 0.3, 0.15, 0.05], 1.0, 0.7)
    assert freq[2] == freq[3] == 0
    assert abs(freq[0] - 0.625) < 0.03


# --- model mode and adapters ------------------------------------------------------------

def test_runs_in_eval_mode_and_restores_the_mode(tiny_model_dir, prompts):
    model, tokenizer, _ = load_base(tiny_model_dir)
    apply_lora(model, load_config(None, ["lora.dropout=0.5"]))
    for m in model.modules():
        if isinstance(m, LoRALinear):  # nonzero B, so dropout on the LoRA input would show
            m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(1)) * 0.5
    seeds = seeds_for(len(prompts))
    model.eval()
    reference, _ = sample_rollouts(model, tokenizer, prompts, seeds, MAX_NEW)
    assert not model.training
    model.train()
    in_training, _ = sample_rollouts(model, tokenizer, prompts, seeds, MAX_NEW)
    assert model.training
    assert ids_of(in_training) == ids_of(reference)


def test_completions_follow_the_current_adapters(tiny_model_dir, prompts):
    model, tokenizer, _ = load_base(tiny_model_dir)
    seeds = seeds_for(len(prompts))
    base, _ = sample_rollouts(model, tokenizer, prompts, seeds, MAX_NEW)
    apply_lora(model, load_config(None, []))
    fresh, _ = sample_rollouts(model, tokenizer, prompts, seeds, MAX_NEW)
    assert ids_of(fresh) == ids_of(base)  # LoRA starts with B = 0: the base model
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for k, m in enumerate(layers):
        m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(k)) * 0.5
    trained, _ = sample_rollouts(model, tokenizer, prompts, seeds, MAX_NEW)
    assert ids_of(trained) != ids_of(base)
    with adapters_off(model):
        off, _ = sample_rollouts(model, tokenizer, prompts, seeds, MAX_NEW)
    assert ids_of(off) == ids_of(base)


# --- throughput (printed, not asserted) -----------------------------------------------

def test_throughput_batch_32_by_64_tokens(tiny_model_dir, prompts):
    model, tokenizer, _ = load_base(tiny_model_dir)
    tokenizer.eos_token_ids = set()  # every completion runs its 64 tokens
    rollouts, stats = sample_rollouts(model, tokenizer, prompts, seeds_for(len(prompts), g=8), 64, batch_size=32)
    assert stats["tokens"] == 32 * 64
    print(f"\nrollouts, tiny model, batch 32 x 64 tokens: {stats['tokens']} tokens in {stats['seconds']:.2f} s, "
          f"{stats['tokens_per_s']:.0f} tokens/s")
