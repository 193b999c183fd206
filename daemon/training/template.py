"""The prompt format: how a (problem, solution) row becomes the tokens a model trains on,
and how a problem becomes the prompt it answers at generation time.

Two formats (`data.template`):

- "chat" (the default): the model's own chat template, through its tokenizer: the user
  turn is the problem followed by DeepSeek-Math's instruction ("Please reason step by
  step, and put your final answer within \\boxed{}."), the assistant turn the solution,
  closed by the template's end-of-turn token. This is the format
  DeepSeek-Math-7B-Instruct (and SmolLM2-Instruct) were trained in, and the one
  `mlx_lm generate` and `mlx_lm server` apply by default.
- "tutor": the original text template ("You are a helpful math tutor. ... ### Problem:
  ... ### Solution:"), for base models without a chat template.

Training and generation use the very same prompt tokens: an example is the prompt's
tokens followed by the completion's, each tokenized on its own, so the model is trained
on exactly what it will see (and the prompt's length is known, for `train.mask_prompt`).
The format is recorded with the adapters (adapter_config.json, "prompt_format") so
`generate`, `eval`, `serve` and mlx-lm use the format they were trained in; its identity
is part of the token-cache key and the checkpoint fingerprint.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from mathlora_daemon.errors import InputError

TEMPLATES = ("chat", "tutor")
SYSTEM = "You are a helpful math tutor. Solve the problem step by step and give the final answer at the end."
PROMPT_TEMPLATE = SYSTEM + "\n\n### Problem:\n{problem}\n\n### Solution:\n"
TEMPLATE = PROMPT_TEMPLATE + "{solution}"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
# Bumped when the way examples are tokenized changes (part of the cache key).
TOKENIZATION = "prompt and completion tokenized apart; BOS as the tokenizer adds it; EOS closes the completion"


def format_example(problem: str, solution: str) -> str:
    """Given a problem and its solution, return the full tutor-format training text."""
    # str.format only parses the template, so braces in the data (\boxed{42}) are safe.
    return TEMPLATE.format(problem=problem.strip(), solution=solution.strip())


def format_prompt(problem: str) -> str:
    """Given a problem, return the tutor-format prompt: the training text up to and
    including the "### Solution:" header."""
    return PROMPT_TEMPLATE.format(problem=problem.strip())


def user_message(problem: str) -> str:
    """The chat format's user turn: the problem, then DeepSeek-Math's instruction."""
    return f"{problem.strip()}\n{INSTRUCTION}"


@dataclass(frozen=True)
class PromptFormat:
    """A prompt format bound to a tokenizer (mlx-lm's TokenizerWrapper)."""

    template: str
    tokenizer: object

    @classmethod
    def of(cls, template: str, tokenizer) -> "PromptFormat":
        """Given "chat" or "tutor" and the model's tokenizer, return the format; raise
        InputError for "chat" with a tokenizer that has no chat template."""
        if template not in TEMPLATES:
            raise InputError(f"data.template = {template!r} is not allowed: expected one of {', '.join(TEMPLATES)}")
        if template == "chat" and not _chat_template(tokenizer):
            raise InputError("data.template = \"chat\": the model's tokenizer has no chat template (no chat_template "
                             "in tokenizer_config.json); set data.template = \"tutor\" for a base model")
        return cls(template, tokenizer)

    @property
    def identity(self) -> str:
        """A short hash of everything that decides the tokens: the template, its text
        (the tutor text, or the tokenizer's chat template and the instruction)."""
        text = TEMPLATE if self.template == "tutor" else f"{_chat_template(self.tokenizer)}\0{INSTRUCTION}"
        return hashlib.sha256(f"{self.template}\0{text}\0{TOKENIZATION}".encode()).hexdigest()[:16]

    def describe(self) -> dict:
        """What adapter_config.json records, so every tool prompts the way training did."""
        if self.template == "chat":
            return {"template": "chat", "instruction": INSTRUCTION, "identity": self.identity}
        return {"template": "tutor", "prompt": PROMPT_TEMPLATE, "identity": self.identity}

    def prompt_text(self, problem: str) -> str:
        """The text the model is prompted with (for chat: the template applied)."""
        if self.template == "tutor":
            return format_prompt(problem)
        return self.tokenizer.apply_chat_template([{"role": "user", "content": user_message(problem)}],
                                                  add_generation_prompt=True, tokenize=False)

    def prompt_ids(self, problem: str) -> list[int]:
        """The prompt's tokens, exactly as generation feeds them (BOS included)."""
        if self.template == "tutor":
            return list(self.tokenizer.encode(format_prompt(problem)))
        return list(self.tokenizer.apply_chat_template([{"role": "user", "content": user_message(problem)}],
                                                       add_generation_prompt=True))

    def completion_ids(self, problem: str, solution: str) -> list[int]:
        """The completion's tokens: the solution and the end of the turn (EOS)."""
        tok = self.tokenizer
        if self.template == "tutor":
            ids = list(tok.encode(solution.strip(), add_special_tokens=False))
        else:
            messages = [{"role": "user", "content": user_message(problem)},
                        {"role": "assistant", "content": solution.strip()}]
            full = tok.apply_chat_template(messages, tokenize=False)
            prompt = self.prompt_text(problem)
            if not full.startswith(prompt):
                raise InputError("data.template = \"chat\": the model's chat template does not render the "
                                 "conversation as the prompt followed by the answer; use data.template = \"tutor\"")
            ids = list(tok.encode(full[len(prompt):], add_special_tokens=False))
        eos = tok.eos_token_id
        if eos is not None:
            if eos in ids:
                ids = ids[: len(ids) - ids[::-1].index(eos)]  # nothing after the end of the turn
            else:
                ids.append(eos)
        return ids

    def example(self, problem: str, solution: str) -> tuple[list[int], int]:
        """Given a row, return (its tokens, the prompt's length in tokens)."""
        prompt = self.prompt_ids(problem)
        return prompt + self.completion_ids(problem, solution), len(prompt)


def _chat_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template.strip() else None
