"""Tests for final-answer extraction and comparison (training/answers.py): the last brace-
matched `\\boxed{}`, then a "Final Answer:" line, then the last number; normalisation;
numeric equality."""

from __future__ import annotations

from fractions import Fraction

import pytest

from mathlora_daemon.demo.mathgen import generate_problems
from mathlora_daemon.training.answers import answers_match, extract_answer, last_boxed, normalize, to_number

# --- extract_answer -----------------------------------------------------------------------

EXTRACT_CASES = [
    # The demo's closing line.
    ("Add 5 to both sides: 9x = 81.\nThe final answer is $\\boxed{9}$.", "9", "boxed"),
    ("Combine: f'(x) = 36x^3 + 12x - 1.\nThe final answer is $\\boxed{36x^3 + 12x - 1}$.", "36x^3 + 12x - 1", "boxed"),
    ("The final answer is $\\boxed{-26/15}$.", "-26/15", "boxed"),
    # OpenR1 style: reasoning, then a boxed answer in display math.
    ("Thus the sum is 75.\n\n**Final Answer**\n\\[\n\\boxed{75}\n\\]", "75", "boxed"),
    ("so $x=\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}", "boxed"),
    ("$\\boxed{\\dfrac{\\sqrt{3}}{2}}$", "\\dfrac{\\sqrt{3}}{2}", "boxed"),
    ("\\boxed{\\left(\\frac{1}{2}, \\frac{3}{4}\\right)}", "\\left(\\frac{1}{2}, \\frac{3}{4}\\right)", "boxed"),
    ("The set is $\\boxed{\\{1, 2\\}}$.", "\\{1, 2\\}", "boxed"),
    ("\\boxed {42}", "42", "boxed"),
    ("\\fbox{7}", "7", "boxed"),
    # Several boxes: the last one wins; an unfinished last box leaves the one before.
    ("First guess \\boxed{3}, corrected: \\boxed{5}.", "5", "boxed"),
    ("\\boxed{12} and then \\boxed{\\frac{1", "12", "boxed"),
    ("\\boxed{} and \\boxed{ }", None, "none"),
    # No box: a final-answer line.
    ("Work...\nFinal Answer: 42", "42", "final_answer_line"),
    ("Work...\n**Final Answer:** $x = 3$.", "x = 3", "final_answer_line"),
    ("Work...\n**Final Answer**: 17", "17", "final_answer_line"),
    ("Steps.\nThe final answer is 36x^3 + 12x - 1.", "36x^3 + 12x - 1", "final_answer_line"),
    ("The final answer is: \\(\\frac{3}{4}\\)", "\\frac{3}{4}", "final_answer_line"),
    ("**Final Answer**\n\n$7$\n", "7", "final_answer_line"),
    ("final answer is 8\nlater text 99", "8", "final_answer_line"),
    # No box, no line: the last number.
    ("We get 10-5 = 5 apples, and then x = -9.", "-9", "last_number"),
    ("The price is 1,250 dollars", "1,250", "last_number"),
    ("so it is 3/4 of the whole", "3/4", "last_number"),
    ("about 2.50 each", "2.50", "last_number"),
    ("roughly .5", ".5", "last_number"),
    ("x2 and y3 only", None, "none"),
    ("I do not know.", None, "none"),
    ("", None, "none"),
]


@pytest.mark.parametrize("text, answer, how", EXTRACT_CASES)
def test_extract_answer(text, answer, how):
    assert extract_answer(text) == (answer, how)


def test_last_boxed_matches_nested_braces():
    assert last_boxed("\\boxed{\\frac{a+{b}}{c}} tail") == "\\frac{a+{b}}{c}"
    assert last_boxed("no box") is None
    assert last_boxed("\\boxed{unclosed") is None


def test_every_demo_solution_yields_its_answer():
    for row in generate_problems(60, seed=5):
        answer, how = extract_answer(row["solution"])
        assert how == "boxed"
        assert answer == row["answer"]
        assert answers_match(answer, row["answer"])


# --- normalize ------------------------------------------------------------------------------

NORMALIZE_CASES = [
    ("  75 ", "75"),
    ("$75$", "75"),
    ("75.", "75"),
    ("36x^3 + 12x - 1", "36x^3+12x-1"),
    ("-\\frac{26}{15}", "-26/15"),
    ("\\frac{-26}{15}", "-26/15"),
    ("\\dfrac{1}{2}", "1/2"),
    ("\\tfrac{3}{4}", "3/4"),
    ("\\frac12", "1/2"),
    ("\\dfrac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("1,000", "1000"),
    ("-12,345.50", "-12345.5"),
    ("1{,}000", "1000"),
    ("(1,234)", "(1,234)"),  # a pair, not a thousands separator
    ("2.50", "2.5"),
    ("3.000", "3"),
    ("-0", "0"),
    ("-0.0", "0"),
    ("x = 3", "3"),
    ("f'(x) = 4x", "4x"),
    ("y_1 = 2", "2"),
    ("50\\%", "50"),
    ("50%", "50"),
    ("30^\\circ", "30"),
    ("30^{\\circ}", "30"),
    ("\\text{Monday}", "Monday"),
    ("\\text{(C)}", "C"),
    ("(c)", "C"),
    ("\\mathrm{B}", "B"),
    ("10\\text{ cm}", "10cm"),
    ("{5}", "5"),
    ("\\boxed{12}", "12"),
    ("\\$5", "5"),
    ("2\\,000", "2000"),
]


@pytest.mark.parametrize("raw, expected", NORMALIZE_CASES)
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_to_number():
    assert to_number("-26/15") == Fraction(-26, 15)
    assert to_number("0.5") == Fraction(1, 2)
    assert to_number(".5") == Fraction(1, 2)
    assert to_number("7") == 7
    assert to_number("1/0") is None
    assert to_number("4x") is None
    assert to_number("\\sqrt{2}") is None


# --- answers_match --------------------------------------------------------------------------

MATCH_CASES = [
    ("75", "75", True),
    ("75.0", "75", True),
    ("0.5", "1/2", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{2}{4}", "1/2", True),
    ("-\\frac{26}{15}", "-26/15", True),
    ("$-26/15$", "-26/15", True),
    ("36x^3+12x-1", "36x^3 + 12x - 1", True),
    ("1,000", "1000", True),
    ("x = -9", "-9", True),
    ("358.750", "358.75", True),
    ("\\text{(C)}", "C", True),
    ("12\\%", "12", True),
    ("-0", "0", True),
    ("\\frac{\\sqrt{3}}{2}", "\\dfrac{\\sqrt{3}}{2}", True),
    ("74", "75", False),
    ("-26/15", "26/15", False),
    ("36x^3+12x+1", "36x^3 + 12x - 1", False),
    ("0.33", "1/3", False),
    ("4x", "4", False),
    (None, "75", False),
    ("75", None, False),
    ("", "", False),
]


@pytest.mark.parametrize("predicted, reference, expected", MATCH_CASES)
def test_answers_match(predicted, reference, expected):
    assert answers_match(predicted, reference) is expected


def test_extract_then_match_on_generations():
    reference = "\\frac{1}{2}"
    good = "Half of it.\n\n**Final Answer**\n\\[\n\\boxed{\\dfrac{1}{2}}\n\\]"
    wrong_box_then_right = "\\boxed{0.4} no wait: \\boxed{0.5}"
    plain = "It is 0.5 of the total."
    for text in (good, wrong_box_then_right, plain):
        assert answers_match(extract_answer(text)[0], reference), text
    assert not answers_match(extract_answer("\\boxed{0.5} no: \\boxed{0.4}")[0], reference)


@pytest.mark.parametrize("predicted, reference, expected", [
    ("10\\text{ cm}", "10", True),
    ("10 cm", "10", True),
    ("12", "12 apples", True),
    ("3 m/s", "3", True),
    ("90^\\circ", "90", True),
    ("10 cm", "11", False),
    ("x^2", "2", False),  # a variable is not a unit
    ("2x", "2", False),
])
def test_a_trailing_unit_does_not_hide_an_equal_number(predicted, reference, expected):
    assert answers_match(predicted, reference) is expected
