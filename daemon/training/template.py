"""The prompt template that turns a (problem, solution) row into training text.

Training and generation must use the very same text around the problem, so both come
from here. The template's hash is part of the token-cache key and the config fingerprint.
"""

from __future__ import annotations

import hashlib

SYSTEM = "You are a helpful math tutor. Solve the problem step by step and give the final answer at the end."
PROMPT_TEMPLATE = SYSTEM + "\n\n### Problem:\n{problem}\n\n### Solution:\n"
TEMPLATE = PROMPT_TEMPLATE + "{solution}"
TEMPLATE_ID = hashlib.sha256(TEMPLATE.encode("utf-8")).hexdigest()[:16]


def format_example(problem: str, solution: str) -> str:
    """Given a problem and its solution, return the full training text."""
    # str.format only parses the template, so braces in the data (\boxed{42}) are safe.
    return TEMPLATE.format(problem=problem.strip(), solution=solution.strip())


def format_prompt(problem: str) -> str:
    """Given a problem, return the text a model sees at generation time: the training
    text up to and including the "### Solution:" header."""
    return PROMPT_TEMPLATE.format(problem=problem.strip())
