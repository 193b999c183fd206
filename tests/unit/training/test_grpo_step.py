"""GRPOStep (training/grpo.py) on the tiny model, sampling for real: an update moves
probability toward the completions that beat their group; `rl.skip_flat_groups` replaces
a group whose rewards are all equal (no signal) by a group of another training problem
(DAPO's dynamic sampling), drawn from (seed, step, attempt) only, so a resumed run trains
on the very same groups. The verdicts come from the problems' references: "never" is
never right, "live" is right for completions of even length, so a "never" group is
always flat and a "live" group has a signal."""

from __future__ import annotations

import numpy as np
import pytest

from mathlora_daemon.config import load_config
from mathlora_daemon.runtime.signals import Flags
from mathlora_daemon.training import rewards
from mathlora_daemon.training.group_batch import completion_logprobs, group_batches
from mathlora_daemon.training.grpo import GRPOStep, replacement_problems
from mathlora_daemon.training.model import apply_lora, load_base
from mathlora_daemon.training.step import _update, make_optimizer
from mathlora_daemon.training.template import PromptFormat

G = 4
NEVER = [0, 1]  # the step's first two problems: flat whatever is sampled
PROBLEMS = ([{"problem": f"What is {i} + {i}?", "answer": "never"} for i in range(2)]
            + [{"problem": f"Compute {i} * 3 - 1.", "answer": "live"} for i in range(2, 40)])


@pytest.fixture
def judged_by_reference(monkeypatch):
    def score(completion: str, reference: str) -> rewards.Score:
        right = reference == "live" and len(completion) % 2 == 0
        return rewards.Score(correct=right, formatted=False, checker="test")

    monkeypatch.setattr(rewards, "score", score)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    model, tokenizer, _ = load_base(tiny_model_dir)
    return model, tokenizer


def grpo_step(loaded, skip: int) -> GRPOStep:
    model, tokenizer = loaded
    cfg = settings(skip)
    return GRPOStep(model, make_optimizer(1e-4), tokenizer, PromptFormat.of("tutor", tokenizer), PROBLEMS, cfg.rl,
                    cfg.train, interruptible=Flags().interruptible, should_abort=lambda: False, update=_update)


def settings(skip: int = 0):
    return load_config(None, ['train.method="grpo"', f"rl.group_size={G}", "rl.max_new_tokens=12",
                              "rl.format_weight=0", f"rl.skip_flat_groups={skip}"])


def flat(rewards_: np.ndarray) -> list[bool]:
    return [bool(np.ptp(row) == 0) for row in rewards_]


def test_without_it_flat_groups_stay_and_count_as_no_signal(loaded, judged_by_reference):
    indices = NEVER + [2, 3]
    rollouts, _scores, rewards_, _tokens, _s, resampled, trained = grpo_step(loaded, 0).rollouts(5, indices)
    assert trained == indices and resampled == 0
    assert flat(rewards_)[:2] == [True, True]


def test_flat_groups_are_replaced_by_groups_of_other_problems_with_a_signal(loaded, judged_by_reference):
    indices = NEVER + [2, 3]
    step = grpo_step(loaded, 3)
    rollouts, scores, rewards_, _tokens, _s, resampled, trained = step.rollouts(5, indices)
    assert resampled >= 2
    assert trained[2:] == [2, 3]  # groups with a signal are kept as sampled
    assert not set(trained[:2]) & set(indices) and len(set(trained)) == 4  # other problems, none twice
    assert flat(rewards_) == [False] * 4
    for p, index in enumerate(trained):  # each group is its problem's: prompt, verdicts and rewards agree
        group = rollouts[p * G:(p + 1) * G]
        assert all(r.prompt_ids == step.prompt(index) and r.row == p for r in group)
        expected = [float(len(r.text) % 2 == 0) for r in group]
        assert list(rewards_[p]) == expected and [s.correct for s in scores[p * G:(p + 1) * G]] == \
            [bool(e) for e in expected]
    kept = grpo_step(loaded, 0).rollouts(5, indices)[0]
    assert [r.completion_ids for r in rollouts[2 * G:]] == [r.completion_ids for r in kept[2 * G:]]


def test_a_resumed_run_replaces_them_with_the_same_groups(loaded, judged_by_reference):
    first = grpo_step(loaded, 3).rollouts(7, NEVER + [2, 3])
    again = grpo_step(loaded, 3).rollouts(7, NEVER + [2, 3])
    assert first[-1] == again[-1]
    assert [r.completion_ids for r in first[0]] == [r.completion_ids for r in again[0]]
    assert np.array_equal(first[2], again[2])


def test_replacements_depend_on_seed_step_and_attempt_and_avoid_the_steps_problems():
    drawn = replacement_problems(0, 3, 1, 40, [0, 1, 2, 3], 5)
    assert drawn == replacement_problems(0, 3, 1, 40, [0, 1, 2, 3], 5)
    assert len(drawn) == 5 and not set(drawn) & {0, 1, 2, 3}
    assert drawn != replacement_problems(0, 3, 2, 40, [0, 1, 2, 3], 5)
    assert drawn != replacement_problems(0, 4, 1, 40, [0, 1, 2, 3], 5)
    assert replacement_problems(0, 3, 1, 5, [0, 1, 2, 3], 5) == [4]  # no more than there are


def test_an_update_moves_probability_toward_the_completions_that_beat_their_group(tiny_model_dir,
                                                                                  judged_by_reference):
    model, tokenizer, _ = load_base(tiny_model_dir)  # its own copy: this test trains it
    cfg = settings()
    apply_lora(model, cfg)
    step = GRPOStep(model, make_optimizer(1e-3), tokenizer, PromptFormat.of("tutor", tokenizer), PROBLEMS, cfg.rl,
                    cfg.train, interruptible=Flags().interruptible, should_abort=lambda: False, update=_update)
    indices = [2, 3, 4, 5]
    rollouts, _scores, rewards_, *_ = step.rollouts(1, indices)  # what the step samples: the same seeds
    assert not all(flat(rewards_))
    wins = (rewards_ - rewards_.mean(axis=1, keepdims=True)).reshape(-1)
    [batch] = group_batches([rollouts[p * G].prompt_ids for p in range(len(indices))],
                            [r.completion_ids for r in rollouts], wins, G, len(rollouts))

    def loglik() -> np.ndarray:
        model.eval()
        lp = completion_logprobs(model, batch)
        return np.array((lp * batch.mask).sum(axis=1))

    before = loglik()
    result = step(1, indices, 1e-3, 1.0)
    assert result is not None and result.reward_mean == pytest.approx(rewards_.mean())
    moved = loglik() - before
    assert moved[wins > 0].mean() > 0 > moved[wins < 0].mean()
    assert float((moved * wins).sum()) > 0
