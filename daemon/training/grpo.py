"""GRPO: learning from answers (Group Relative Policy Optimization, DeepSeekMath).

One optimizer step of `train.method = "grpo"`:

1. rollouts: for each of the step's `rl.prompts_per_step` problems, `rl.group_size`
   completions sampled under the current adapters (training/rollouts.py), each seeded from
   (train.seed, step, problem index, sample), so a resumed run samples exactly the same
   completions; groups whose rewards are all equal carry no signal and may be replaced by
   groups of other problems (`rl.skip_flat_groups`, DAPO's dynamic sampling: the problems
   drawn from (seed, step, attempt), so a resumed run draws the same);
2. rewards (training/rewards.py): 1 for a final answer math-verify finds equal to the
   reference, plus `rl.format_weight` for one given boxed or on a "Final Answer" line;
3. advantages: each reward against its group's mean (divided by the group's std for
   `grpo` and `dapo`; not for `dr_grpo`);
4. the clipped policy-gradient loss with a KL penalty to the reference policy (`rl.beta`,
   the k3 estimator), normalised per `rl.loss`. The reference is the policy GRPO started
   from, as in the DeepSeekMath paper: the base model (the adapters switched off) for a
   fresh LoRA, the SFT adapters for `rl.init_adapters` (swapped in; adapters only, no
   second model in memory; kept in every checkpoint so a resume uses the same):
   `grpo` each completion's mean token loss, averaged over completions; `dapo` (default)
   every completion token of the batch weighs the same; `dr_grpo` tokens summed over
   (completions x max_new_tokens), a constant;
5. `rl.updates_per_batch` optimizer updates on these rollouts (the first is on-policy: the
   ratio is 1; later ones are clipped against the rollouts' own log-probabilities).

A stop between the rollouts and the first update abandons the step (the state is still at
the last boundary, and the resumed run samples the same completions again); once an
update is applied the step finishes. Randomness besides sampling (LoRA dropout) is seeded
per (step, update, micro-batch) as in SFT.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from mathlora_daemon import testhooks
from mathlora_daemon.training.batches import step_seed

SEED_SPACE = 2**63


@dataclass
class GRPOResult:
    """One GRPO step, for the loop and the `rl.step` event. `loss`, `tokens` (completion
    tokens trained), `positions` and `compile_s`/`traces` keep the SFT StepResult's
    meaning, so the loop, reporter and budget treat both alike."""

    loss: float
    tokens: int
    positions: int
    reward_mean: float
    reward_std: float
    sample_accuracy: float
    format_share: float
    zero_advantage_share: float
    completion_tokens_mean: float
    kl: float
    clip_fraction: float
    generation_tokens_per_s: float
    update_tokens_per_s: float
    resampled_groups: int = 0
    seconds: dict = field(default_factory=dict)  # where the step's time went: rollouts, rewards, reference, update
    grad_norm: float | None = None
    compile_s: float = 0.0
    traces: list = field(default_factory=list)

    @property
    def padding_share(self) -> float:
        return 1.0 - self.tokens / self.positions if self.positions else 0.0

    def rl_fields(self) -> dict:
        return {"reward_mean": round(self.reward_mean, 4), "reward_std": round(self.reward_std, 4),
                "sample_accuracy": round(self.sample_accuracy, 4), "format_share": round(self.format_share, 4),
                "zero_advantage_share": round(self.zero_advantage_share, 4),
                "completion_tokens_mean": round(self.completion_tokens_mean, 1), "kl": round(self.kl, 6),
                "clip_fraction": round(self.clip_fraction, 4), "resampled_groups": self.resampled_groups,
                "generation_tok_per_s": round(self.generation_tokens_per_s, 1),
                "update_tok_per_s": round(self.update_tokens_per_s, 1),
                **{f"{part}_s": round(v, 3) for part, v in self.seconds.items()}}


def rollout_seeds(seed: int, step: int, index: int, group_size: int, attempt: int = 0) -> list[int]:
    """The sampling seed of each completion of problem `index` at `step` (a function of
    these numbers only: the same after a resume, whatever else shares the batch)."""
    ss = np.random.SeedSequence([seed, step, index, attempt])
    return [int(v) % SEED_SPACE for v in ss.generate_state(group_size, dtype=np.uint64)]


def replacement_problems(seed: int, step: int, attempt: int, count: int, taken: list[int], wanted: int) -> list[int]:
    """Up to `wanted` problem indices (of `count`) not in `taken`, drawn for flat groups
    from (seed, step, attempt) only, so a resumed run draws the same ones."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, step, attempt, 0xF1A7]))
    busy = set(taken)
    out: list[int] = []
    for i in rng.permutation(count).tolist():
        if len(out) == wanted:
            break
        if i not in busy:
            out.append(i)
    return out


def group_advantages(rewards: np.ndarray, loss: str) -> np.ndarray:
    """Given rewards (prompts, G) and the loss kind, return each completion's advantage."""
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    if loss == "dr_grpo":
        return centred  # Dr. GRPO: no division by the std (it favours easy and hard groups)
    return centred / (rewards.std(axis=1, keepdims=True) + 1e-4)


def grpo_objective(lp: mx.array, mask: mx.array, advantages: mx.array, ref: mx.array | None,
                   old: mx.array | None, beta: float, epsilon: float, loss: str, norm: float):
    """Given the completion tokens' log-probabilities under the policy `lp` (rows, Lc),
    their mask, each row's advantage, the reference's and the rollouts' own
    log-probabilities (or None), return the batch's share of the GRPO objective (summed,
    then divided by `norm`, the whole step's normaliser), with (kl sum, clipped-token
    count) as metrics."""
    old_lp = mx.stop_gradient(lp) if old is None else old
    ratio = mx.exp(lp - old_lp)
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, mx.clip(ratio, 1 - epsilon, 1 + epsilon) * adv
    per_token = -mx.minimum(unclipped, clipped)
    kl = mx.zeros_like(lp)
    if ref is not None:
        delta = ref - lp
        kl = mx.exp(delta) - delta - 1  # k3: unbiased, always >= 0
        per_token = per_token + beta * kl
    per_token = per_token * mask
    if loss == "grpo":  # each completion's mean, then summed over completions
        total = (per_token.sum(axis=1) / mx.maximum(mask.sum(axis=1), 1)).sum()
    else:  # dapo, dr_grpo: every token summed; norm is the token count or a constant
        total = per_token.sum()
    clipped_count = ((unclipped != clipped) * mask).sum()
    return total / norm, (mx.stop_gradient((kl * mask).sum()), mx.stop_gradient(clipped_count))


def grpo_loss(model: nn.Module, batch, ref: mx.array | None, old: mx.array | None, beta: float, epsilon: float,
              loss: str, norm: float, shared: bool | None = None):
    """grpo_objective over one micro-batch of whole groups (training/group_batch.py)."""
    from mathlora_daemon.training.group_batch import completion_logprobs

    return batch_objective(batch, ref, old, beta, epsilon, loss, norm)(completion_logprobs(model, batch, shared))


def batch_objective(batch, ref: mx.array | None, old: mx.array | None, beta: float, epsilon: float, loss: str,
                    norm: float):
    """grpo_objective for one micro-batch, as a function of its log-probabilities."""
    return lambda lp: grpo_objective(lp, batch.mask, mx.array(batch.advantages), ref, old, beta, epsilon, loss, norm)


def grpo_value_and_grad(model: nn.Module):
    """nn.value_and_grad(model, grpo_loss), but with gradient checkpointing the head stays
    out of the autograd graph (training/group_batch.py's whole_value_and_grad: one slice of
    logits at a time instead of all of them); the same values and gradients."""
    plain = nn.value_and_grad(model, grpo_loss)

    def value_and_grad(model_, batch, ref, old, beta, epsilon, loss, norm, shared=None):
        from mathlora_daemon.training.group_batch import head_apart, whole_value_and_grad

        if shared or not head_apart(model_):
            return plain(model_, batch, ref, old, beta, epsilon, loss, norm, shared)
        return whole_value_and_grad(model_, batch, batch_objective(batch, ref, old, beta, epsilon, loss, norm))

    return value_and_grad


class GRPOStep:
    """The GRPO optimizer step, called by the loop like training/step.py's train_step.

    `problems` are the training rows ({problem, answer, kind}); `interruptible` is the
    runtime's Flags.interruptible (a stop raises out of the rollouts); `should_abort` is
    checked between the parts that may be abandoned."""

    def __init__(self, model, optimizer, tokenizer, prompt_format, problems: list[dict], rl_cfg, train_cfg,
                 interruptible, should_abort, update, reference: dict | None = None):
        self.model, self.optimizer, self.tokenizer, self.fmt = model, optimizer, tokenizer, prompt_format
        self.reference = reference  # the reference policy's LoRA weights; None: the base model
        self.problems, self.rl, self.train_cfg = problems, rl_cfg, train_cfg
        self.interruptible, self.should_abort, self.update = interruptible, should_abort, update
        self._prompts: dict[int, list[int]] = {}
        self.loss_and_grad = grpo_value_and_grad(model)

    def prompt(self, index: int) -> list[int]:
        if index not in self._prompts:
            self._prompts[index] = list(self.fmt.prompt_ids(self.problems[index]["problem"]))
        return self._prompts[index]

    # -- 1. rollouts and 2. rewards -------------------------------------------------------------
    def _sample(self, step: int, indices: list[int], attempt: int):
        from mathlora_daemon.training.rollouts import sample_rollouts

        seeds = [rollout_seeds(self.train_cfg.seed, step, i, self.rl.group_size, attempt) for i in indices]
        # The rollout batch: as many completions as memory_plan.ROLLOUT_CACHE_BYTES of KV cache holds.
        return sample_rollouts(self.model, self.tokenizer, [self.prompt(i) for i in indices], seeds,
                               self.rl.max_new_tokens, temperature=self.rl.temperature, top_p=self.rl.top_p)

    def _score(self, rollouts, indices: list[int]):
        from mathlora_daemon.training.rewards import reward, score

        # A group often repeats a completion word for word: check each distinct one once.
        memo: dict[tuple[str, str], object] = {}
        scores = []
        for r in rollouts:
            key = (r.text, self.problems[indices[r.row]]["answer"])
            if key not in memo:
                memo[key] = score(*key)
            scores.append(memo[key])
        rewards = np.array([reward(s, self.rl.format_weight) for s in scores], dtype=np.float64)
        return scores, rewards.reshape(len(indices), self.rl.group_size)

    def rollouts(self, step: int, indices: list[int]):
        """Sample, score, and replace flat groups: (rollouts, scores, rewards (P, G),
        generated tokens, generation seconds, groups resampled, the problems trained on)."""
        rollouts, stats = self._sample(step, indices, 0)
        scored = time.monotonic()
        scores, rewards = self._score(rollouts, indices)
        self.reward_s = time.monotonic() - scored
        tokens, seconds, resampled, indices = stats["tokens"], stats["seconds"], 0, list(indices)
        for attempt in range(1, self.rl.skip_flat_groups + 1):
            flat = [p for p in range(len(indices)) if np.ptp(rewards[p]) == 0]
            if not flat:
                break
            # Other problems, not the same ones again: a problem the policy answered the
            # same way G times (all right or all wrong) is likely to do so again.
            drawn = replacement_problems(self.train_cfg.seed, step, attempt, len(self.problems), indices, len(flat))
            if not drawn:
                break
            flat = flat[:len(drawn)]
            again, stats = self._sample(step, drawn, attempt)
            tokens, seconds, resampled = tokens + stats["tokens"], seconds + stats["seconds"], resampled + len(flat)
            scored = time.monotonic()
            again_scores, again_rewards = self._score(again, drawn)
            self.reward_s += time.monotonic() - scored
            g = self.rl.group_size
            for k, p in enumerate(flat):
                if np.ptp(again_rewards[k]) > 0:  # keep a group that has a signal
                    for j in range(g):
                        r = again[k * g + j]
                        r.row = p
                        rollouts[p * g + j], scores[p * g + j] = r, again_scores[k * g + j]
                    rewards[p], indices[p] = again_rewards[k], drawn[k]
        return rollouts, scores, rewards, tokens, seconds, resampled, indices

    # -- 3. to 5. the update ----------------------------------------------------------------
    def __call__(self, step: int, indices: list[int], lr: float, max_grad_norm: float,
                 rows: int | None = None) -> GRPOResult | None:
        from mathlora_daemon.runtime.signals import Interrupted
        from mathlora_daemon.training.group_batch import evaluated_logprobs, group_batches, shares_prefix
        from mathlora_daemon.training.model import adapters_as, adapters_off

        try:
            with self.interruptible():
                rollouts, scores, rewards, gen_tokens, gen_s, resampled, indices = self.rollouts(step, indices)
                testhooks.hold_point("rollout", step + 1)  # the crash tests' "mid-rollout"
        except Interrupted:
            return None  # nothing applied: the resumed run samples the very same completions
        if self.should_abort():
            return None
        advantages = group_advantages(rewards, self.rl.loss).reshape(-1)
        g = self.rl.group_size
        batch = group_batches([rollouts[p * g].prompt_ids for p in range(len(indices))],
                              [r.completion_ids for r in rollouts], advantages, g,
                              rows or self.train_cfg.batch_size)
        completion_tokens = sum(len(r.completion_ids) for r in rollouts)
        norm = {"dapo": max(completion_tokens, 1), "grpo": len(rollouts),
                "dr_grpo": len(rollouts) * self.rl.max_new_tokens}[self.rl.loss]
        shared = shares_prefix(self.model)
        positions = sum(b.positions(shared) for b in batch)

        was_training, reference_started = self.model.training, time.monotonic()
        self.model.eval()  # the reference and the rollouts' own log-probabilities: no dropout
        ref = old = None
        # One micro-batch at a time, evaluated: their logits never all exist at once.
        if self.rl.beta > 0:
            reference = adapters_off(self.model) if self.reference is None else adapters_as(self.model, self.reference)
            with reference:
                ref = [evaluated_logprobs(self.model, b, shared) for b in batch]
        if self.rl.updates_per_batch > 1:
            old = [evaluated_logprobs(self.model, b, shared) for b in batch]
        self.model.train(was_training)
        reference_s = time.monotonic() - reference_started
        if self.should_abort():
            return None

        started, total_loss, kl_sum, clipped, norm_value = time.monotonic(), 0.0, 0.0, 0.0, None
        for update in range(self.rl.updates_per_batch):
            grads = None
            for m, micro in enumerate(batch):
                mx.random.seed(step_seed(self.train_cfg.seed, step * self.rl.updates_per_batch + update, m))
                (loss, (kl, clip)), g_m = self.loss_and_grad(
                    self.model, micro, ref[m] if ref is not None else None, old[m] if old is not None else None,
                    self.rl.beta, self.rl.clip_epsilon, self.rl.loss, norm, shared)
                grads = g_m if grads is None else tree_map(lambda a, b: a + b, grads, g_m)
                mx.eval(grads, loss, kl, clip)
                testhooks.hold_point("micro", step + 1)  # the crash tests' "mid-update"
                if update == 0:
                    total_loss += loss.item()
                    kl_sum, clipped = kl_sum + kl.item(), clipped + clip.item()
                if update == 0 and self.should_abort():
                    return None  # the first update is not applied yet: the step is abandoned whole
            norm_value = self.update(self.optimizer, self.model, grads, lr, max_grad_norm)
            mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        update_s = time.monotonic() - started

        correct = np.array([s.correct for s in scores])
        return GRPOResult(
            loss=total_loss, tokens=completion_tokens, positions=positions,
            reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
            sample_accuracy=float(correct.mean()), format_share=float(np.mean([s.formatted for s in scores])),
            zero_advantage_share=float(np.mean([np.ptp(rewards[p]) == 0 for p in range(len(indices))])),
            completion_tokens_mean=float(np.mean([len(r.completion_ids) for r in rollouts])),
            kl=kl_sum / max(completion_tokens, 1), clip_fraction=clipped / max(completion_tokens, 1),
            generation_tokens_per_s=gen_tokens / max(gen_s, 1e-9),
            update_tokens_per_s=self.rl.updates_per_batch * positions / max(update_s, 1e-9),
            resampled_groups=resampled,
            seconds={"rollout": gen_s, "reward": self.reward_s, "reference": reference_s, "update": update_s},
            grad_norm=float(norm_value.item()) if norm_value is not None else None)
