"""GRPO's pieces (training/grpo.py): seeds, advantages, and the loss's normalisations."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mathlora_daemon.training.group_batch import GroupBatch, completion_logprobs, group_batches
from mathlora_daemon.training.grpo import group_advantages, grpo_loss, grpo_objective, rollout_seeds

from models import ALL_PROJECTIONS, live_lora


def test_seeds_depend_on_seed_step_problem_and_attempt_only():
    a = rollout_seeds(7, 3, 11, 8)
    assert a == rollout_seeds(7, 3, 11, 8) and len(set(a)) == 8
    assert a != rollout_seeds(7, 4, 11, 8) and a != rollout_seeds(7, 3, 12, 8) and a != rollout_seeds(8, 3, 11, 8)
    assert a != rollout_seeds(7, 3, 11, 8, attempt=1)  # a resampled flat group draws anew
    assert rollout_seeds(7, 3, 11, 4) == a[:4]  # the group's size does not reshuffle the first ones


def test_advantages_are_relative_to_the_group():
    rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.1, 0.1, 0.1, 0.1]])
    grpo = group_advantages(rewards, "grpo")
    assert grpo[0] == pytest.approx([1, -1, -1, 1], rel=1e-3)  # centred, divided by the std (0.5)
    assert np.all(grpo[1] == 0)  # a flat group carries no signal
    dr = group_advantages(rewards, "dr_grpo")
    assert dr[0] == pytest.approx([0.5, -0.5, -0.5, 0.5])  # Dr. GRPO: not divided by the std


def token_logprobs(model, tokens):
    """Log-probability of each next token (B, T-1) under a plain model."""
    logits = model(tokens[:, :-1])
    return mx.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0] - mx.logsumexp(logits, axis=-1)


def toy_loss(model, tokens, mask, adv, ref, old, beta, epsilon, loss, norm):
    return grpo_objective(token_logprobs(model, tokens), mask, adv, ref, old, beta, epsilon, loss, norm)


class Toy(nn.Module):
    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def __call__(self, x):
        return self.head(self.embed(x))


@pytest.fixture
def toy():
    mx.random.seed(0)
    model = Toy()
    tokens = mx.array([[1, 2, 3, 4, 0, 0], [5, 6, 7, 8, 9, 10]])
    mask = mx.array([[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=mx.float32)  # completion positions
    return model, tokens, mask


def test_on_policy_loss_is_minus_advantage_weighted_tokens(toy):
    """With ratio 1 and no KL, DAPO's loss is -sum(A * mask) / tokens, and its gradient is
    the advantage-weighted log-likelihood gradient (a policy gradient)."""
    model, tokens, mask = toy
    adv = mx.array([1.0, -0.5])
    loss, (kl, clipped) = toy_loss(model, tokens, mask, adv, None, None, 0.0, 0.2, "dapo", 5.0)
    assert loss.item() == pytest.approx(-(1.0 * 2 - 0.5 * 3) / 5.0, abs=1e-6)
    assert kl.item() == 0 and clipped.item() == 0

    def surrogate(m):
        lp = token_logprobs(m, tokens)
        return -(lp * mask * adv[:, None]).sum() / 5.0

    grads = nn.value_and_grad(model, lambda m, *a: toy_loss(m, *a)[0])(model, tokens, mask, adv, None, None, 0.0,
                                                                       0.2, "dapo", 5.0)[1]
    expected = nn.value_and_grad(model, surrogate)(model)[1]
    for (name, g), (_, e) in zip(sorted(_flat(grads)), sorted(_flat(expected))):
        assert np.allclose(np.array(g), np.array(e), atol=1e-6), name


def test_grpo_normalises_per_completion_and_dapo_per_token(toy):
    model, tokens, mask = toy
    adv = mx.array([1.0, 1.0])
    grpo, _ = toy_loss(model, tokens, mask, adv, None, None, 0.0, 0.2, "grpo", 2.0)
    dapo, _ = toy_loss(model, tokens, mask, adv, None, None, 0.0, 0.2, "dapo", 5.0)
    assert grpo.item() == pytest.approx(-1.0) and dapo.item() == pytest.approx(-1.0)
    adv = mx.array([1.0, 0.0])  # only the short completion counts
    grpo, _ = toy_loss(model, tokens, mask, adv, None, None, 0.0, 0.2, "grpo", 2.0)
    dapo, _ = toy_loss(model, tokens, mask, adv, None, None, 0.0, 0.2, "dapo", 5.0)
    assert grpo.item() == pytest.approx(-0.5)  # its mean token loss, averaged over 2 completions
    assert dapo.item() == pytest.approx(-2 / 5)  # its 2 tokens among the batch's 5


def test_kl_to_the_reference_is_zero_at_the_reference_and_positive_elsewhere(toy):
    model, tokens, mask = toy
    adv = mx.zeros((2,))
    ref = token_logprobs(model, tokens)
    _, (kl, _) = toy_loss(model, tokens, mask, adv, ref, None, 0.04, 0.2, "dapo", 5.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    _, (kl, _) = toy_loss(model, tokens, mask, adv, ref + 0.3 * mx.random.normal(ref.shape), None, 0.04, 0.2,
                           "dapo", 5.0)
    assert kl.item() > 0


def test_off_policy_ratios_are_clipped(toy):
    model, tokens, mask = toy
    old = token_logprobs(model, tokens) - 1.0  # the policy moved far from the rollouts' own
    loss, (_, clipped) = toy_loss(model, tokens, mask, mx.array([1.0, 1.0]), None, old, 0.0, 0.2, "dapo", 5.0)
    assert clipped.item() == 5  # every completion token's ratio (e ~ 2.7) is beyond 1.2
    assert loss.item() == pytest.approx(-1.2)  # min(r A, clip(r) A) with A = 1: the clipped 1.2


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def _lora_model(model, seed=11):
    """`model` with LoRA on every projection and a non-zero B (so the adapters matter)."""
    return live_lora(model, ALL_PROJECTIONS, "lora.dropout=0.0", seed=seed)[0]


def _qwen3():
    from mlx_lm.models import qwen3

    mx.random.seed(3)
    args = qwen3.ModelArgs(model_type="qwen3", hidden_size=32, num_hidden_layers=2, intermediate_size=48,
                           num_attention_heads=4, rms_norm_eps=1e-5, vocab_size=200, num_key_value_heads=2,
                           max_position_embeddings=256, rope_theta=10000.0, head_dim=8, tie_word_embeddings=False)
    model = qwen3.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture(params=["llama", "qwen3"])
def arch_model(request, tiny_model_dir):
    from mathlora_daemon.training.model import load_base

    model = load_base(tiny_model_dir)[0] if request.param == "llama" else _qwen3()
    return _lora_model(model)


def _groups(rng, n_prompts=3, g=4):
    """Prompts of different lengths; completions of different lengths (1 to 9 tokens)."""
    prompts = [list(map(int, rng.integers(3, 200, size=n))) for n in (5, 11, 8)[:n_prompts]]
    completions = [list(map(int, rng.integers(3, 200, size=int(rng.integers(1, 10))))) for _ in range(n_prompts * g)]
    advantages = rng.standard_normal(n_prompts * g).astype(np.float32)
    return prompts, completions, advantages


def test_a_groups_prompt_runs_once_with_the_whole_sequences_values_and_gradients(arch_model):
    """The shared-prompt pass (each prompt once, left-padded, its keys and values reused by
    its G completions) gives every completion token the log-probability that sequence gets
    alone, unpadded; the loss and the LoRA gradients equal the whole-sequence path's."""
    from mathlora_daemon.training.group_batch import shares_prefix

    model = arch_model
    assert shares_prefix(model)  # the path under test
    prompts, completions, advantages = _groups(np.random.default_rng(0))
    batch = group_batches(prompts, completions, advantages, group_size=4, rows=64)[0]
    shared = completion_logprobs(model, batch, shared=True)
    whole = completion_logprobs(model, batch, shared=False)
    for i, c in enumerate(completions):  # each sequence alone: no padding anywhere
        seq = mx.array([prompts[i // 4] + c])
        alone = token_logprobs(model, seq)[0, len(prompts[i // 4]) - 1:]
        assert np.allclose(np.array(shared[i, :len(c)]), np.array(alone), atol=2e-5), i
        assert np.all(np.array(shared[i, len(c):]) == 0)
    assert np.allclose(np.array(shared), np.array(whole), atol=2e-5)

    def value_and_grads(flag):
        fn = nn.value_and_grad(model, lambda m: grpo_loss(m, batch, None, None, 0.0, 0.2, "dapo", 30.0, flag)[0])
        return fn(model)

    (v1, g1), (v2, g2) = value_and_grads(True), value_and_grads(False)
    assert v1.item() == pytest.approx(v2.item(), abs=1e-5)
    flat1, flat2 = dict(_flat(g1)), dict(_flat(g2))
    assert flat1.keys() == flat2.keys() and any("lora_a" in k for k in flat1)
    for name in flat1:
        scale = float(np.abs(np.array(flat2[name])).max()) + 1e-6
        assert np.allclose(np.array(flat1[name]), np.array(flat2[name]), atol=1e-4 * scale), name


def test_with_checkpointing_the_head_runs_in_slices_with_the_same_values_and_gradients(arch_model, monkeypatch):
    """Gradient checkpointing takes the whole-sequence path and makes the completions'
    logits a slice of positions at a time (recomputed in the backward, not kept): the
    log-probabilities, the loss and the LoRA gradients are those of the unsliced head."""
    from mathlora_daemon.training import step
    from mathlora_daemon.training.group_batch import shares_prefix
    from mathlora_daemon.training.model import use_grad_checkpoint

    model = arch_model
    prompts, completions, advantages = _groups(np.random.default_rng(1))
    batch = group_batches(prompts, completions, advantages, group_size=4, rows=64)[0]

    def value_and_grads():
        fn = nn.value_and_grad(model, lambda m: grpo_loss(m, batch, None, None, 0.0, 0.2, "dapo", 30.0, False)[0])
        return completion_logprobs(model, batch, shared=False), *fn(model)

    lp1, v1, g1 = value_and_grads()
    use_grad_checkpoint(model)
    monkeypatch.setattr(step, "HEAD_CHUNK_ROWS", 24)  # 12 rows: slices of 2 positions
    assert not shares_prefix(model)  # checkpointed layers take whole sequences
    lp2, v2, g2 = value_and_grads()
    assert np.allclose(np.array(lp1), np.array(lp2), atol=2e-5)
    assert v1.item() == pytest.approx(v2.item(), abs=1e-5)
    flat1, flat2 = dict(_flat(g1)), dict(_flat(g2))
    assert flat1.keys() == flat2.keys()
    for name in flat1:
        scale = float(np.abs(np.array(flat1[name])).max()) + 1e-6
        assert np.allclose(np.array(flat1[name]), np.array(flat2[name]), atol=1e-4 * scale), name


@pytest.mark.parametrize("loss", ["dapo", "grpo"])
def test_with_checkpointing_the_head_stays_out_of_the_graph_with_the_same_values_and_gradients(
        arch_model, monkeypatch, loss):
    """The three-pass gradient (the body without gradients, the head slice by slice with
    vector-Jacobian products, the body again under mx.vjp) gives the loss, the metrics and
    the LoRA gradients of plain autograd, for a policy against a reference and old
    log-probabilities (the clipped ratios)."""
    from mathlora_daemon.training import step
    from mathlora_daemon.training.group_batch import evaluated_logprobs, head_apart
    from mathlora_daemon.training.grpo import grpo_value_and_grad
    from mathlora_daemon.training.model import use_grad_checkpoint

    model = arch_model
    rng = np.random.default_rng(2)
    prompts, completions, advantages = _groups(rng)
    batch = group_batches(prompts, completions, advantages, group_size=4, rows=64)[0]
    ref = completion_logprobs(model, batch, shared=False) + mx.array(rng.normal(0, 0.1, batch.mask.shape)
                                                                     .astype(np.float32))
    old = completion_logprobs(model, batch, shared=False) + mx.array(rng.normal(0, 0.3, batch.mask.shape)
                                                                     .astype(np.float32))
    args = (batch, ref * batch.mask, old * batch.mask, 0.04, 0.2, loss, 30.0, False)
    (v1, (kl1, clip1)), g1 = nn.value_and_grad(model, grpo_loss)(model, *args)
    use_grad_checkpoint(model)
    monkeypatch.setattr(step, "HEAD_CHUNK_ROWS", 24)  # 12 rows: slices of 2 positions
    assert head_apart(model)
    (v2, (kl2, clip2)), g2 = grpo_value_and_grad(model)(model, *args)
    lp = completion_logprobs(model, batch, shared=False)
    assert np.allclose(np.array(evaluated_logprobs(model, batch, False)), np.array(lp), atol=2e-5)
    assert v1.item() == pytest.approx(v2.item(), abs=1e-5)
    assert kl1.item() == pytest.approx(kl2.item(), rel=1e-4) and clip1.item() == clip2.item() > 0
    flat1, flat2 = dict(_flat(g1)), dict(_flat(g2))
    assert flat1.keys() == flat2.keys()
    for name in flat1:
        scale = float(np.abs(np.array(flat1[name])).max()) + 1e-6
        assert np.allclose(np.array(flat1[name]), np.array(flat2[name]), atol=1e-4 * scale), name


def test_micro_batches_hold_whole_groups():
    prompts, completions, advantages = _groups(np.random.default_rng(1))
    batches = group_batches(prompts, completions, advantages, group_size=4, rows=8)
    assert [len(b.prompts) for b in batches] == [2, 1]  # 8 rows: two groups of 4, then the last
    assert [c for b in batches for c in b.completions] == completions
    assert np.array_equal(np.concatenate([b.advantages for b in batches]), advantages)
    # A micro-batch smaller than a group still holds one whole group.
    assert [len(b.prompts) for b in group_batches(prompts, completions, advantages, 4, rows=2)] == [1, 1, 1]
    b = batches[0]  # prompts of 5 and 11 tokens, completions up to 9
    assert b.positions(shared=False) == 8 * max(len(prompts[i // 4]) + len(c) for i, c in enumerate(b.completions))


def test_completions_run_in_passes_of_similar_length():
    """One completion that ran long does not pad the group's short ones to its length."""
    prompt = list(range(3, 13))
    lengths = [40, 3, 2, 2, 30, 21, 1, 2]
    b = GroupBatch(prompts=[prompt], completions=[[5] * n for n in lengths], advantages=np.zeros(8, np.float32),
                   group_size=8)
    chunks = b.chunks()
    assert sorted(i for rows in chunks for i in rows) == list(range(8))
    widths = [[lengths[i] for i in rows] for rows in chunks]
    assert widths == [[40, 30, 21], [3, 2, 2, 2], [1]]  # longest first, down to half the pass's widest
    assert b.positions(shared=True) == 10 + 3 * 40 + 4 * 3 + 1
    assert b.positions(shared=False) == 8 * 50
