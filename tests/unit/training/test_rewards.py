"""GRPO's reward (training/rewards.py): math-verify's verdict on equivalent and different
answers, the normaliser when math-verify cannot decide, the format bonus, bounded time on
pathological completions, and where the reference comes from."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import pytest

from mathlora_daemon.training.rewards import Score, reference_of, reward, score


def boxed(answer: str) -> str:
    return f"We work it out step by step.\n\nThe final answer is $\\boxed{{{answer}}}$."


# --- math-verify's verdicts -----------------------------------------------------------------

@pytest.mark.parametrize("predicted, reference", [
    ("0.5", "1/2"), ("\\frac{1}{2}", "0.5"), ("\\dfrac12", "1/2"), ("\\dfrac{1}{2}", "0.5"),
    ("\\dfrac12", "\\frac{1}{2}"), ("1/2", "\\dfrac{1}{2}"),
    ("x=3", "3"), ("3", "x=3"),
    ("10\\%", "10"), ("10", "10\\%"),
    # The project's decision, math-verify's: a percentage equals its fraction too (0.1 ==
    # 10%), as a problem asking "what fraction" or "what percent" is answered either way.
    # The normaliser alone says no (it drops the % sign); see the fallback test below.
    ("0.1", "10\\%"), ("10\\%", "0.1"),
    ("(0,1]", "(0, 1]"), ("\\{2, 1\\}", "\\{1, 2\\}"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"), ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
])
def test_equivalent_answers_are_correct(predicted, reference):
    got = score(boxed(predicted), reference)
    assert got == Score(correct=True, formatted=True, checker="math-verify", answer=predicted)


@pytest.mark.parametrize("predicted, reference", [
    ("0.33", "1/3"), ("1/3", "0.33"), ("-2", "2"), ("2", "-2"), ("(0,1)", "[0,1]"), ("[0,1]", "(0,1)"),
])
def test_different_answers_are_wrong(predicted, reference):
    got = score(boxed(predicted), reference)
    assert got.checker == "math-verify" and not got.correct and got.formatted


def test_an_empty_completion_and_one_without_an_answer_are_wrong_and_unformatted():
    assert score("", "3") == Score(correct=False, formatted=False, checker="fallback", answer=None)
    got = score("I am not sure how to solve this problem.", "3")
    assert not got.correct and not got.formatted and got.answer is None


def test_the_last_boxed_answer_is_the_one_judged():
    assert not score("First \\boxed{3}, no wait: \\boxed{4}.", "3").correct
    assert score("First \\boxed{4}, no wait: \\boxed{3}.", "3").correct


# --- the reward -----------------------------------------------------------------------------

@pytest.mark.parametrize("completion, correct, formatted", [
    (boxed("3"), True, True),
    ("So x is three.\n\n**Final Answer**: 3", True, True),
    ("Adding them gives 1 + 2 = 3", True, False),  # a bare number last: right, not formatted
    (boxed("4"), False, True),
    ("Adding them gives 4", False, False),
])
def test_reward_is_one_for_a_correct_answer_plus_the_format_weight(completion, correct, formatted):
    got = score(completion, "3")
    assert (got.correct, got.formatted) == (correct, formatted)
    assert reward(got, 0.2) == pytest.approx((1.0 if correct else 0.0) + (0.2 if formatted else 0.0))
    assert reward(got, 0.0) == (1.0 if correct else 0.0)


# --- when math-verify cannot decide ----------------------------------------------------------

def test_the_normaliser_decides_when_math_verify_parses_nothing(monkeypatch):
    import math_verify

    monkeypatch.setattr(math_verify, "parse", lambda *args, **kwargs: [])
    assert score(boxed("\\frac{1}{2}"), "0.5") == Score(True, True, "fallback", "\\frac{1}{2}")
    assert score(boxed("-2"), "2") == Score(False, True, "fallback", "-2")
    # The normaliser drops the percent sign: 10% == 10, but 0.1 != 10%.
    assert score(boxed("10\\%"), "10").correct and not score(boxed("0.1"), "10\\%").correct


def test_the_normaliser_decides_when_math_verify_raises(monkeypatch):
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("sympy fell over")

    monkeypatch.setattr(math_verify, "verify", broken)
    assert score(boxed("0.5"), "1/2") == Score(True, True, "fallback", "0.5")


def test_off_the_main_thread_or_with_sigalrm_taken_math_verify_is_not_called(monkeypatch):
    import math_verify

    monkeypatch.setattr(math_verify, "parse", lambda *args, **kwargs: pytest.fail("math-verify was called"))
    got = []
    worker = threading.Thread(target=lambda: got.append(score(boxed("1/2"), "0.5")))
    worker.start()
    worker.join()
    assert got == [Score(True, True, "fallback", "1/2")]

    previous = signal.signal(signal.SIGALRM, lambda *_: None)  # someone else's SIGALRM
    try:
        assert score(boxed("1/2"), "0.5").checker == "fallback"
    finally:
        signal.signal(signal.SIGALRM, previous)


# --- time -------------------------------------------------------------------------------------

def test_a_pathological_answer_is_cut_off_and_sigalrm_left_as_it_was():
    # SymPy never finishes comparing 9^(9^9); math-verify's alarm stops it after
    # VERIFY_TIMEOUT_S and the normaliser decides.
    got = score(boxed("9^{9^{9}}"), "1")
    assert got == Score(False, True, "fallback", "9^{9^{9}}")
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.mark.parametrize("completion", [
    "1 + " * 100_000 + "= \\boxed{3}",
    "\\boxed{" * 50_000,
    "$" + "(x+" * 100_000,
    "word " * 200_000,
])
def test_a_very_long_completion_returns(completion):
    got = score(completion, "3")
    assert isinstance(got, Score)
    assert got.correct == completion.endswith("\\boxed{3}")


def test_math_verify_is_imported_only_when_scoring():
    code = ("import sys, mathlora_daemon.training.rewards as r; assert 'math_verify' not in sys.modules; "
            "r.score('\\\\boxed{1}', '1'); assert 'math_verify' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the reference ----------------------------------------------------------------------------

def test_reference_of():
    solution = "Half of it: $\\boxed{\\frac{1}{2}}$."
    assert reference_of("0.5", solution) == "0.5"  # the answer field first
    assert reference_of("  ", solution) == "\\frac{1}{2}"  # empty: the solution's last box
    assert reference_of(None, solution) == "\\frac{1}{2}"
    assert reference_of("", "So it is 7.\n\nFinal Answer: 7") == "7"
    assert reference_of("", "It is 7, since 3 + 4 = 7") is None  # a last number is no reference
    assert reference_of(None, None) is None and reference_of("", "") is None
