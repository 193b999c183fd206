"""GRPO's pieces (training/grpo.py): seeds, advantages, and the loss's normalisations."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mathlora_daemon.training.grpo import group_advantages, grpo_loss, rollout_seeds, token_logprobs


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
    loss, (kl, clipped) = grpo_loss(model, tokens, mask, adv, None, None, 0.0, 0.2, "dapo", 5.0)
    assert loss.item() == pytest.approx(-(1.0 * 2 - 0.5 * 3) / 5.0, abs=1e-6)
    assert kl.item() == 0 and clipped.item() == 0

    def surrogate(m):
        lp = token_logprobs(m, tokens)
        return -(lp * mask * adv[:, None]).sum() / 5.0

    grads = nn.value_and_grad(model, lambda m, *a: grpo_loss(m, *a)[0])(model, tokens, mask, adv, None, None, 0.0,
                                                                       0.2, "dapo", 5.0)[1]
    expected = nn.value_and_grad(model, surrogate)(model)[1]
    for (name, g), (_, e) in zip(sorted(_flat(grads)), sorted(_flat(expected))):
        assert np.allclose(np.array(g), np.array(e), atol=1e-6), name


def test_grpo_normalises_per_completion_and_dapo_per_token(toy):
    model, tokens, mask = toy
    adv = mx.array([1.0, 1.0])
    grpo, _ = grpo_loss(model, tokens, mask, adv, None, None, 0.0, 0.2, "grpo", 2.0)
    dapo, _ = grpo_loss(model, tokens, mask, adv, None, None, 0.0, 0.2, "dapo", 5.0)
    assert grpo.item() == pytest.approx(-1.0) and dapo.item() == pytest.approx(-1.0)
    adv = mx.array([1.0, 0.0])  # only the short completion counts
    grpo, _ = grpo_loss(model, tokens, mask, adv, None, None, 0.0, 0.2, "grpo", 2.0)
    dapo, _ = grpo_loss(model, tokens, mask, adv, None, None, 0.0, 0.2, "dapo", 5.0)
    assert grpo.item() == pytest.approx(-0.5)  # its mean token loss, averaged over 2 completions
    assert dapo.item() == pytest.approx(-2 / 5)  # its 2 tokens among the batch's 5


def test_kl_to_the_reference_is_zero_at_the_reference_and_positive_elsewhere(toy):
    model, tokens, mask = toy
    adv = mx.zeros((2,))
    ref = token_logprobs(model, tokens)
    _, (kl, _) = grpo_loss(model, tokens, mask, adv, ref, None, 0.04, 0.2, "dapo", 5.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    _, (kl, _) = grpo_loss(model, tokens, mask, adv, ref + 0.3 * mx.random.normal(ref.shape), None, 0.04, 0.2,
                           "dapo", 5.0)
    assert kl.item() > 0


def test_off_policy_ratios_are_clipped(toy):
    model, tokens, mask = toy
    old = token_logprobs(model, tokens) - 1.0  # the policy moved far from the rollouts' own
    loss, (_, clipped) = grpo_loss(model, tokens, mask, mx.array([1.0, 1.0]), None, old, 0.0, 0.2, "dapo", 5.0)
    assert clipped.item() == 5  # every completion token's ratio (e ~ 2.7) is beyond 1.2
    assert loss.item() == pytest.approx(-1.2)  # min(r A, clip(r) A) with A = 1: the clipped 1.2


def _flat(tree):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def test_log_probabilities_from_a_start_skip_the_prompts_logits(tiny_model_dir):
    """From `start` on, the body-and-head path gives the full forward's values, and the
    loss over a mask that is zero before `start` is the same."""
    from mathlora_daemon.training.model import body_and_head, load_base

    model, _, _ = load_base(tiny_model_dir)
    assert body_and_head(model) is not None  # the path under test
    tokens = mx.array(np.random.default_rng(0).integers(3, 200, size=(3, 17)), dtype=mx.int32)
    full = token_logprobs(model, tokens)
    for start in (0, 5, 12):
        assert np.allclose(np.array(token_logprobs(model, tokens, start)), np.array(full[:, start:]), atol=1e-5)
    mask = np.zeros((3, 16), dtype=np.float32)
    mask[:, 9:] = 1
    adv = mx.array([1.0, -1.0, 0.5])
    whole, _ = grpo_loss(model, tokens, mx.array(mask), adv, None, None, 0.0, 0.2, "dapo", 21.0)
    cut, _ = grpo_loss(model, tokens, mx.array(mask[:, 9:]), adv, None, None, 0.0, 0.2, "dapo", 21.0, start=9)
    assert cut.item() == pytest.approx(whole.item(), abs=1e-6)
