"""Validation loss: how well the model predicts solutions it never trained on.

The validation split (data.validation_fraction or data.validation_name, kept apart by
`prepare`) is measured on a fixed subset, its first `train.eval_sequences` sequences,
with the same masking as training (train.mask_prompt): a forward pass only, batched
like training. The Evaluator measures it before every scheduled checkpoint (the time
counts against the budget, like the checkpoint itself), once for the base model before
the first step, and keeps the lowest: retention keeps that checkpoint, and at the end
the adapters are the best (train.select = "best"); it asks for the early stop.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

from mathlora_daemon import testhooks
from mathlora_daemon.training.cache import TokenCache


class Evaluator:
    """When to validate and what follows from it. `measure()` runs the validation pass at
    the current step (once per step), keeps the result in the progress, tells the
    Reporter, and after `train.early_stop_evals` evaluations without a new best calls
    `on_early_stop(reason)` (the runtime's finish_early).

    The loop measures before every scheduled checkpoint (a segment's end, the run's last
    step) so its manifest carries the loss and retention keeps the best; a requested
    checkpoint (a stop, SIGTERM, a pause, the memory guard) is saved without one: the
    steps evaluated are the same whether or not a run was interrupted, so the selection
    is too. The pass runs inside `interruptible()` (runtime/signals.py): a stop during
    it leaves it pending (`eval_pending`, kept in the checkpoint) and the next start
    measures it. Without a validation pass (`validate` None: no validation rows, or a
    rank other than 0) nothing is measured."""

    def __init__(self, progress, validate, reporter, early_stop_evals: int, on_early_stop, interruptible=None):
        self.progress, self.validate, self.reporter = progress, validate, reporter
        self.early_stop_evals, self.on_early_stop = early_stop_evals, on_early_stop
        self.interruptible = interruptible or nullcontext

    def measure(self) -> None:
        from mathlora_daemon.runtime.signals import Interrupted

        p = self.progress
        if self.validate is None or p.eval_step == p.global_step:
            p.eval_pending = False
            return
        self.reporter.on_phase("evaluating")
        try:
            with self.interruptible():
                testhooks.hold_point("eval", p.global_step)
                result = self.validate()
        except Interrupted as exc:
            p.eval_pending = True
            self.reporter.on_eval_deferred(p.global_step, str(exc))
            return
        p.eval_pending = False
        best = p.record_eval(result["loss"])
        self.reporter.on_eval(result, best)
        limit = self.early_stop_evals
        if limit and p.evals_since_best >= limit and self.on_early_stop is not None:
            # Kept in the checkpoint written next, so a restart (launchd) stays finished.
            p.stopped_early = (f"no new best validation loss in {p.evals_since_best} evaluations "
                               f"(best {p.best_eval_loss:.4f} at step {p.best_eval_step}): early stop")
            self.on_early_stop(p.stopped_early)


@dataclass
class Validator:
    model: object
    validation: TokenCache
    sequences: int
    batch_size: int
    mask_prompt: bool

    @classmethod
    def of(cls, session, train_cfg):
        """The run's validator (GRPO: AccuracyValidator), or None without validation data
        or with eval_sequences 0."""
        val = session.cache.validation
        if val is None or not len(val) or train_cfg.eval_sequences <= 0:
            return None
        if session.grpo is not None:
            return AccuracyValidator.of(session, train_cfg)
        return cls(session.model, val, min(train_cfg.eval_sequences, len(val)), max(train_cfg.batch_size, 8),
                   train_cfg.mask_prompt)

    def __call__(self) -> dict:
        """Measure now: {loss, tokens, sequences, seconds}."""
        from mathlora_daemon.training.step import evaluate_loss

        started = time.monotonic()
        loss, tokens = evaluate_loss(self.model, self.validation, range(self.sequences), self.batch_size,
                                     mask_prompt=self.mask_prompt)
        return {"loss": loss, "tokens": tokens, "sequences": self.sequences,
                "seconds": round(time.monotonic() - started, 3)}


@dataclass
class AccuracyValidator:
    """GRPO's validation: greedy answers to the first `train.eval_sequences` validation
    problems, checked like the rewards (training/rewards.py). What selection ranks is
    the error rate (`loss` = 1 - accuracy: lower is better, like a loss), so retention,
    best adapters and early stopping work unchanged; `accuracy` is logged beside it."""

    model: object
    tokenizer: object
    prompt_format: object
    problems: list
    max_new_tokens: int

    @classmethod
    def of(cls, session, train_cfg) -> "AccuracyValidator | None":
        from mathlora_daemon.training.rewards import reference_of

        problems = []
        for p in session.cache.validation.problems():
            reference = reference_of(p.get("answer"), p.get("solution"))
            if reference is not None:
                problems.append({"problem": p["problem"], "answer": reference})
        problems = problems[:train_cfg.eval_sequences]
        if not problems:
            return None
        return cls(session.model, session.tokenizer, session.prompt_format, problems, session.cfg.rl.max_new_tokens)

    def __call__(self) -> dict:
        """Measure now: {loss (1 - accuracy), accuracy, format, tokens, sequences, seconds}."""
        from mathlora_daemon.training.rewards import score
        from mathlora_daemon.training.rollouts import sample_rollouts

        started = time.monotonic()
        prompts = [list(self.prompt_format.prompt_ids(p["problem"])) for p in self.problems]
        rollouts, stats = sample_rollouts(self.model, self.tokenizer, prompts, [[0]] * len(prompts),
                                          self.max_new_tokens, temperature=0.0)
        scores = [score(r.text, self.problems[r.row]["answer"]) for r in rollouts]
        accuracy = sum(s.correct for s in scores) / len(scores)
        return {"loss": 1.0 - accuracy, "accuracy": accuracy,
                "format": sum(s.formatted for s in scores) / len(scores), "tokens": stats["tokens"],
                "sequences": len(scores), "seconds": round(time.monotonic() - started, 3)}
