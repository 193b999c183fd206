"""GRPO's reward: whether a sampled completion reaches a problem's reference answer.

GRPO learns from answers, not from reference solutions, so its reward must be the same
judgement that marked OpenR1-Math's rows correct: Hugging Face's `math-verify` (parse both
sides to SymPy, then compare as mathematics: 1/2 == 0.5 == \\dfrac12, x=3 == 3, (0,1] as
an interval, {1,2} == {2,1}). Where math-verify cannot decide (a side does not parse, it
raises, it runs out of time, or it may not arm its timer here) the project's own normaliser
(`answers.answers_match`, what `eval` uses) decides instead; `Score.checker` says which.
The format half of the reward uses `answers.py`'s notion of FORMATTED: the answer given
boxed or on a "Final Answer" line, as the evaluation counts it.

Time: math-verify can run for ever on short input (`\\boxed{9^{9^{9}}}` is 17 characters
and SymPy never finishes comparing it), so bounding the input length alone cannot keep one
completion from stalling training. Its only timeout is SIGALRM (`signal.alarm` around each
parse and comparison, the previous handler restored after). We let it use that, but only
where it is harmless: in the main thread (the only one that may set handlers), with no
SIGALRM handler of anyone else's and no real-time timer running (its `alarm(0)` would
cancel one). The daemon uses neither, and SIGALRM does not touch our SIGTERM/SIGINT
handlers (runtime/signals.py): those only set events outside an interruptible section.
Elsewhere (a worker thread, SIGALRM taken) math-verify is not called and the normaliser
decides. We also bound the input: regular expressions run in C, where no signal handler
can interrupt them, so math-verify never sees a string over MAX_VERIFY_CHARS.

One caution for callers: math-verify catches every `Exception` inside itself, which
includes `signals.Interrupted`; score outside `Flags.interruptible()`, or check the stop
flag after scoring. A timeout depends on the machine's speed, so a completion that needs
seconds of SymPy may be judged by math-verify on one run and by the normaliser on another.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass

from mathlora_daemon.training import answers

CHECKERS = ("math-verify", "fallback")
# Seconds math-verify may spend on one parse or one comparison (signal.alarm counts whole
# seconds); real answers take milliseconds, so only pathological input ever reaches them.
PARSE_TIMEOUT_S = 2
VERIFY_TIMEOUT_S = 2
# The longest string handed to math-verify: its extraction regexes run in C, beyond the
# reach of SIGALRM. Real final answers are a few dozen characters; the whole-completion
# second try sees this many characters of the completion's end, where the answer is.
MAX_VERIFY_CHARS = 4_000
# Answers are extracted from this many characters of the completion's end: a completion
# is bounded by the generation length (4k tokens is about 16k characters), and the
# brace-matching of `answers.last_boxed` is quadratic on a text of unclosed `\boxed{`.
MAX_COMPLETION_CHARS = 20_000


@dataclass(frozen=True)
class Score:
    """A completion judged against a reference answer."""

    correct: bool
    formatted: bool  # the answer was given boxed or on a "Final Answer" line
    checker: str  # one of CHECKERS: which one decided `correct`
    answer: str | None = None  # the completion's final answer as extracted, for logs


def reference_of(row_answer: str | None, solution: str | None) -> str | None:
    """Given a row's answer field and its reference solution, return the answer to reward
    against: the answer field when non-empty, else the solution's final answer given boxed
    (or on a "Final Answer" line), else None. The last number of a solution is not taken:
    a wrong reference would reward wrong answers all night."""
    if row_answer is not None and row_answer.strip():
        return row_answer.strip()
    answer, how = answers.extract_answer(solution or "")
    return answer if how in answers.FORMATTED else None


def score(completion: str, reference: str) -> Score:
    """Given a sampled completion and the reference answer, return its Score: correct by
    math-verify when it can decide (else by `answers.answers_match`), formatted when its
    final answer is boxed or on a "Final Answer" line."""
    text = (completion or "")[-MAX_COMPLETION_CHARS:]
    answer, how = answers.extract_answer(text)
    formatted = how in answers.FORMATTED
    verdict = _math_verify(answer, text, reference)
    if verdict is not None:
        return Score(correct=verdict, formatted=formatted, checker="math-verify", answer=answer)
    return Score(correct=_answers_match(answer, reference), formatted=formatted, checker="fallback", answer=answer)


def reward(score: Score, format_weight: float) -> float:
    """Given a Score and the weight of the format, return the reward: 1.0 for a correct
    answer plus `format_weight` for an answer given in a recognisable form."""
    return (1.0 if score.correct else 0.0) + (format_weight if score.formatted else 0.0)


def _answers_match(answer: str | None, reference: str | None) -> bool:
    """The normaliser's verdict, on bounded input (an over-long "answer" is not one)."""
    if answer is None or reference is None or len(answer) > MAX_VERIFY_CHARS:
        return False
    return answers.answers_match(answer, reference)


def _alarm_is_free() -> bool:
    """Whether math-verify may arm SIGALRM here without harm (see the module docstring)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None):
        return False
    return signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def _math_verify(answer: str | None, text: str, reference: str) -> bool | None:
    """Given the extracted answer, the completion's text and the reference, return
    math-verify's verdict, or None when it cannot decide: the reference or both tries at
    the prediction (the extracted answer, then the completion's end) do not parse, it
    raised or timed out, or its timer cannot be armed here."""
    if not reference or len(reference) > MAX_VERIFY_CHARS or not _alarm_is_free():
        return None
    # Imported here: math-verify brings SymPy and an ANTLR parser, a second of start-up
    # that nothing but GRPO needs.
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    def parsed(text: str) -> list:
        # LaTeX first (boxed, $...$), then plain expressions (1/2, 0.5); raise_on_error so
        # that an error or a timeout reaches us as one instead of an empty parse.
        return parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                     parsing_timeout=PARSE_TIMEOUT_S, raise_on_error=True)

    try:
        # Bare answers are wrapped in \boxed{}: math-verify's LaTeX extraction only reads
        # LaTeX inside a box or math delimiters, and bare "\{1, 2\}" or "(0, 1]" would
        # otherwise be read as a lone number by its expression extraction.
        gold = parsed(f"\\boxed{{{reference}}}")
        if not gold:
            return None
        tries = [f"\\boxed{{{answer}}}"] if answer is not None and len(answer) <= MAX_VERIFY_CHARS else []
        tries.append(text[-MAX_VERIFY_CHARS:])
        for candidate in tries:
            predicted = parsed(candidate)
            if predicted:
                # Only the first try that parses is compared: a completion is judged by
                # the answer it ends with, never by another expression found in its text.
                return bool(verify(gold, predicted, timeout_seconds=VERIFY_TIMEOUT_S, raise_on_error=True))
        return None
    except (Exception, TimeoutException):
        return None
