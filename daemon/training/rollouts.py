"""Rollouts for GRPO: G sampled completions per prompt, under the model's current adapters.

Completions are decoded `batch_size` at a time with one forward pass per token for the
whole batch and a KV cache (mlx-lm's batch caches): the prompts are left-padded, the cache
knows each row's padding, so the attention mask hides the padding from every row and the
rotary positions of each row start at 0 at its first real token, as they would alone.
A row that ends (an end-of-sequence token, or `max_new_tokens`) leaves the batch once a
quarter of the batch has ended. A batch holds as many completions as
memory_plan.ROLLOUT_CACHE_BYTES of KV cache does (measured per model: `cache_bytes_per_token`).

Seeding: completion g of prompt i is drawn with its own seed, `seeds[i][g]` (the caller
derives it from the run's seed, the step, the dataset index and g). Token t of that row
is sampled by the Gumbel-max trick with noise from the t-th key of the chain
key(seed) -> split -> split ... (one split per position), so a row's randomness depends
on its seed and the position only: not on the other rows of its batch, on the batch size
or on the global random state (which is left untouched). The same model, prompts and
seeds give the same token ids on the CPU, run after run and in a fresh process; a resumed
run regenerates the completions the interrupted one drew.

Sampling follows Hugging Face and vLLM: logits divided by the temperature, then the
nucleus (top-p) of that tempered distribution; a temperature of 0 (greedy) is not a
rollout and is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from mathlora_daemon.training.memory_plan import rollout_batch_size

PREFILL_STEP = 512  # prompt tokens per prefill forward pass (bounds the activations' memory)
PAD_ID = 0  # left padding; any id would do, the mask hides it


@dataclass
class Rollout:
    row: int  # index of the prompt in the caller's list
    sample: int  # 0..G-1
    prompt_ids: list[int]
    completion_ids: list[int]  # without padding; ends with the EOS id when finished
    text: str  # decoded completion (special tokens skipped)
    finished: bool  # ended with an end-of-sequence token (False: hit max_new_tokens)


def _gumbel_rows(keys: mx.array, vocab: int) -> mx.array:
    """Given keys (B, 2), return Gumbel noise (B, vocab), row b drawn from keys[b] alone."""
    return mx.vmap(lambda k: mx.random.gumbel(shape=(vocab,), key=k))(keys)


def _split_rows(keys: mx.array) -> tuple[mx.array, mx.array]:
    """Given keys (B, 2), return (the next key of each row's chain, the key to sample with)."""
    pairs = mx.vmap(lambda k: mx.random.split(k))(keys)
    return pairs[:, 0], pairs[:, 1]


def sample_tokens(logits: mx.array, keys: mx.array, temperature: float, top_p: float) -> mx.array:
    """Given last-position logits (B, V), one key per row (B, 2), a temperature > 0 and
    top_p in (0, 1], return one sampled token id per row (B,).

    Gumbel-max: argmax(log p + Gumbel noise) is a draw from p, and every row's noise
    comes from its own key, so a row's draw does not depend on the other rows."""
    from mlx_lm.sample_utils import apply_top_p

    if temperature == 0:  # greedy: validation accuracy
        return mx.argmax(logits, axis=-1)
    logprobs = logits.astype(mx.float32) / temperature
    logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
    if top_p < 1.0:
        logprobs = apply_top_p(logprobs, top_p)  # tokens outside the nucleus become -inf
    return mx.argmax(logprobs + _gumbel_rows(keys, logprobs.shape[-1]), axis=-1)


def cache_bytes_per_token(model: nn.Module) -> int:
    """The KV cache bytes one position of one row takes in this model (all layers):
    measured with a one-token forward pass, so it holds for any architecture mlx-lm has."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([[PAD_ID]]), cache=cache)
    layers = [c for c in cache if getattr(c, "keys", None) is not None]
    mx.eval([(c.keys, c.values) for c in layers])
    # A cache allocates positions ahead (keys: batch, heads, positions, head_dim).
    return max(1, sum((c.keys.nbytes + c.values.nbytes) // c.keys.shape[-2] for c in layers))


def _batch_cache(model: nn.Module, left_padding: list[int]) -> list:
    """A batch KV cache for the model (one per layer) with the rows' left padding."""
    from mlx_lm.models.cache import make_prompt_cache

    per_row = [make_prompt_cache(model) for _ in left_padding]
    cache = [layer[0].merge([row[i] for row in per_row]) for i, layer in enumerate(zip(*per_row))]
    for c in cache:
        c.prepare(left_padding=left_padding)
    return cache


def _generate_batch(model, prompts: list[list[int]], seeds: list[int], max_new_tokens: int, eos: set[int],
                    temperature: float, top_p: float) -> list[tuple[list[int], bool]]:
    """Given a batch of prompts (token ids) with one seed each, return each row's
    (completion ids, finished)."""
    # A group's G completions share their prompt: prefill each distinct prompt once, then
    # give every completion its own copy of that prompt's cache rows (GRPO's groups).
    distinct: dict[tuple, int] = {}
    rows = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    unique = [list(p) for p in distinct]
    width = max(len(p) for p in unique)
    padding = [width - len(p) for p in unique]
    inputs = mx.array([[PAD_ID] * pad + p for pad, p in zip(padding, unique)])
    cache = _batch_cache(model, padding)
    # Prefill: the cache's mask hides each row's padding (keys before its first token).
    for start in range(0, width - 1, PREFILL_STEP):
        model(inputs[:, start:min(start + PREFILL_STEP, width - 1)], cache=cache)
        mx.eval([c.state for c in cache])
    logits = model(inputs[:, width - 1:], cache=cache)[:, -1, :]
    if len(unique) < len(prompts):
        index = mx.array(rows)
        for c in cache:
            c.filter(index)  # a gather: repeated rows are copies
        logits = logits[index]

    # The decode is pipelined as mlx-lm's generate_step is: the forward pass of token t+1
    # is queued (mx.async_eval) before the host reads token t, so the device never waits
    # for Python building the next graph; on a GPU that halves a small model's step. A
    # row that ends keeps its cache row until a quarter of the rows have ended (then the
    # batch is compacted): each compaction gathers every layer's cache, and its one extra
    # token is computed and dropped. Neither changes a token of any row: a row's tokens
    # depend on its prompt, its seed and the model only.
    chain = mx.stack([mx.random.key(s) for s in seeds])
    out: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    done = [False] * len(prompts)
    rows = list(range(len(prompts)))  # rows[b]: which prompt of this batch sits at cache row b
    chain, keys = _split_rows(chain)
    tokens = sample_tokens(logits, keys, temperature, top_p)
    mx.async_eval(tokens, chain)
    for t in range(max_new_tokens):
        last = t == max_new_tokens - 1
        if not last:  # queue token t+1 before reading token t
            logits = model(tokens[:, None], cache=cache)[:, -1, :]
            chain, keys = _split_rows(chain)
            upcoming = sample_tokens(logits, keys, temperature, top_p)
            mx.async_eval(upcoming, chain)
        for i, token in zip(rows, tokens.tolist()):
            if done[i]:
                continue
            out[i].append(token)
            if token in eos:
                finished[i] = done[i] = True
            elif len(out[i]) >= max_new_tokens:
                done[i] = True
        ended = sum(done[i] for i in rows)
        if last or ended == len(rows):
            break
        tokens = upcoming
        if ended * 4 >= len(rows):  # ended rows leave the batch (and its compute)
            keep = [b for b, i in enumerate(rows) if not done[i]]
            index = mx.array(keep)
            for c in cache:
                c.filter(index)
            rows = [rows[b] for b in keep]
            tokens, chain = tokens[index], chain[index]
    return list(zip(out, finished))


def sample_rollouts(model, tokenizer, prompts: list[list[int]], seeds: list[list[int]], max_new_tokens: int,
                    temperature: float = 1.0, top_p: float = 1.0,
                    batch_size: int | None = None) -> tuple[list[Rollout], dict]:
    """Given a model (with whatever adapters it has now), its tokenizer (mlx-lm's
    TokenizerWrapper), prompts as token ids and `seeds[i]`: one seed per completion of
    prompt i, return (the rollouts in order: prompt 0's samples, then prompt 1's ...,
    stats: tokens generated, seconds, tokens_per_s, completions, finished, batch_size).
    `batch_size`: completions decoded together (None: as many as memory_plan.ROLLOUT_CACHE_BYTES
    holds).

    Each completion ends at any of the tokenizer's end-of-sequence ids or after
    `max_new_tokens`. The model runs in eval mode (no dropout) and gets its previous mode
    back. Raise ValueError for mismatched lists, an empty prompt, a seed outside
    [0, 2^64) or bad settings."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but seeds for {len(seeds)}")
    if any(not p for p in prompts):
        raise ValueError("a prompt has no tokens")
    if max_new_tokens < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError(f"max_new_tokens {max_new_tokens} and batch_size {batch_size}: expected integers >= 1")
    if not temperature >= 0:
        raise ValueError(f"temperature {temperature}: expected >= 0 (0: greedy)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p {top_p}: expected a value in (0, 1]")
    if any(not 0 <= int(seed) < 2**64 for row in seeds for seed in row):
        raise ValueError("seeds: expected integers from 0 to 2^64-1")
    eos = set(tokenizer.eos_token_ids)
    jobs = [(i, g, int(seed)) for i, row in enumerate(seeds) for g, seed in enumerate(row)]

    started = time.monotonic()
    was_training = model.training
    model.eval()
    try:
        if batch_size is None:
            batch_size = rollout_batch_size(cache_bytes_per_token(model), max(map(len, prompts)), max_new_tokens,
                                            len(jobs))
        results = []
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start:start + batch_size]
            results += _generate_batch(model, [prompts[i] for i, _, _ in batch], [s for _, _, s in batch],
                                       max_new_tokens, eos, temperature, top_p)
    finally:
        model.train(was_training)
    seconds = time.monotonic() - started

    rollouts = [Rollout(row=i, sample=g, prompt_ids=list(prompts[i]), completion_ids=ids,
                        text=tokenizer.decode(ids, skip_special_tokens=True), finished=done)
                for (i, g, _), (ids, done) in zip(jobs, results)]
    tokens = sum(len(r.completion_ids) for r in rollouts)
    stats = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
             "completions": len(rollouts), "finished": sum(r.finished for r in rollouts), "batch_size": batch_size}
    return rollouts, stats
