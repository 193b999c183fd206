"""Tests for daemon.mathgen: determinism, answers checked independently of the
generator, solution format, and the demo train/test files."""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from collections import Counter
from fractions import Fraction

import pytest

from mathlora_daemon.demo.mathgen import (
    KINDS,
    generate_problems,
    plain_text,
    problem_key,
    problem_pool,
    write_demo_dataset,
)

N_PER_KIND = 200


@pytest.fixture(scope="module")
def by_kind() -> dict[str, list[dict]]:
    out = {}
    for i, kind in enumerate(KINDS):
        out[kind] = generate_problems(N_PER_KIND, seed=100 + i, kinds=(kind,))
    return out


# --- independent answer checks: each parses the problem text, never the solution ---


def _match(patterns: list[str], text: str) -> re.Match:
    hits = [m for p in patterns if (m := re.fullmatch(p, text))]
    assert len(hits) == 1, f"expected exactly one known phrasing to match {text!r}"
    return hits[0]


def _py(expr: str) -> str:
    # "3x" -> "3*x", "4(x" -> "4*(x", "^" -> "**" so Python can evaluate it.
    return re.sub(r"(\d)(x|\()", r"\1*\2", expr).replace("^", "**")


def _is_int_text(text: str) -> bool:
    return re.fullmatch(r"-?[1-9]\d*|0", text) is not None


def _check_linear(item: dict) -> None:
    m = _match(
        [r"Solve for x: (.+)", r"Find x if (.+)\.", r"What value of x satisfies (.+)\?"],
        item["problem"],
    )
    lhs, rhs = m.group(1).split(" = ")
    assert _is_int_text(item["answer"])
    x = int(item["answer"])
    assert eval(_py(lhs), {"x": x}) == eval(_py(rhs), {"x": x})
    # Not an identity: x + 1 must fail, so the solution is unique.
    assert eval(_py(lhs), {"x": x + 1}) != eval(_py(rhs), {"x": x + 1})


def _check_order(item: dict) -> None:
    m = _match(
        [r"Compute (.+)\.", r"Evaluate (.+)\.", r"What is the value of (.+)\?"],
        item["problem"],
    )
    expr = m.group(1)
    assert re.fullmatch(r"[\d +\-*/()^]+", expr)
    assert _is_int_text(item["answer"])
    assert eval(expr.replace("^", "**")) == int(item["answer"])


def _check_fraction(item: dict) -> None:
    m = re.search(r"(\d+)/(\d+) ([-+*]) (\d+)/(\d+)", item["problem"])
    assert m, item["problem"]
    x, y = Fraction(int(m[1]), int(m[2])), Fraction(int(m[4]), int(m[5]))
    want = {"+": x + y, "-": x - y, "*": x * y}[m[3]]
    answer = item["answer"]
    assert re.fullmatch(r"-?\d+(/\d+)?", answer)
    if "/" in answer:
        num, den = (int(v) for v in answer.split("/"))
        assert den > 1 and math.gcd(num, den) == 1, "answer must be reduced"
    assert Fraction(answer) == want


def _check_percentage(item: dict) -> None:
    problem, dec = item["problem"], r"(\d+(?:\.\d+)?)"
    m = _match(
        [
            rf"What is {dec}% of {dec}\?",
            rf"Find {dec}% of {dec}\.",
            rf"A price of {dec} rises by {dec}%\. What is the new price\?",
            rf"An account balance of {dec} grows by {dec}%\. What is the new balance\?",
            rf"A jacket costs {dec} and is discounted by {dec}%\. What is the sale price\?",
            rf"A price of {dec} falls by {dec}%\. What is the new price\?",
            rf"What percent of {dec} is {dec}\?",
            rf"{dec} is what percent of {dec}\?",
        ],
        problem,
    )
    a, b = Fraction(m[1]), Fraction(m[2])
    if "% of" in problem:
        want = a * b / 100
    elif "rises" in problem or "grows" in problem:
        want = a * (100 + b) / 100
    elif "discounted" in problem or "falls" in problem:
        want = a * (100 - b) / 100
    elif problem.startswith("What percent"):
        want = b / a * 100
    else:
        want = a / b * 100
    answer = item["answer"]
    # Exact decimal, no trailing zeros, no exponent notation.
    assert re.fullmatch(r"-?\d+(\.\d*[1-9])?", answer), answer
    assert Fraction(answer) == want


def _poly_coefs(text: str) -> dict[int, int]:
    coefs: dict[int, int] = {}
    for term in text.replace(" - ", " + -").split(" + "):
        m = re.fullmatch(r"(-?)(\d*)(x(?:\^(\d+))?)?", term)
        assert m and (m[2] or m[3]), f"bad term {term!r} in {text!r}"
        coef = int(m[2]) if m[2] else 1
        power = (int(m[4]) if m[4] else 1) if m[3] else 0
        assert power not in coefs, f"repeated power in {text!r}"
        coefs[power] = -coef if m[1] else coef
    return coefs


def _check_derivative(item: dict) -> None:
    m = _match(
        [
            r"Find the derivative of f\(x\) = (.+)\.",
            r"Differentiate f\(x\) = (.+) with respect to x\.",
            r"What is f'\(x\) if f\(x\) = (.+)\?",
        ],
        item["problem"],
    )
    poly = m.group(1)
    coefs = _poly_coefs(poly)
    for x in range(-3, 4):
        # Guard the little parser itself against Python's own reading of the text.
        assert eval(_py(poly), {"x": x}) == sum(c * x**p for p, c in coefs.items())
    answer = item["answer"]
    if answer == "0":
        got = {}
    else:
        got = _poly_coefs(answer)
        assert list(got) == sorted(got, reverse=True), "descending powers"
        assert all(c != 0 for c in got.values())
        assert not re.search(r"(?<!\d)1x|x\^1(?!\d)|x\^0|\+ -|- -", answer)
    want = {p - 1: c * p for p, c in coefs.items() if p > 0 and c != 0}
    assert got == want
    for x in range(-3, 4):
        assert eval(_py(answer), {"x": x}) == sum(c * p * x ** (p - 1) for p, c in coefs.items() if p > 0)


def _check_gcd_lcm(item: dict) -> None:
    a, b = (int(v) for v in re.search(r"(\d+) and (\d+)", item["problem"]).groups())
    problem = item["problem"]
    if re.search(r"greatest common divisor|GCD|largest whole number that divides", problem):
        want = math.gcd(a, b)
    else:
        assert re.search(r"least common multiple|LCM|smallest positive number divisible", problem)
        want = math.lcm(a, b)
    assert item["answer"] == str(want)


CHECKS = {
    "linear_equation": _check_linear,
    "order_of_operations": _check_order,
    "fractions": _check_fraction,
    "percentage": _check_percentage,
    "derivative": _check_derivative,
    "gcd_lcm": _check_gcd_lcm,
}


def test_every_kind_has_an_independent_check():
    assert set(CHECKS) == set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_answers_are_correct(by_kind, kind):
    items = by_kind[kind]
    assert len(items) == N_PER_KIND
    for item in items:
        assert item["kind"] == kind
        CHECKS[kind](item)


@pytest.mark.parametrize("kind", KINDS)
def test_solution_format(by_kind, kind):
    lengths = []
    for item in by_kind[kind]:
        assert set(item) == {"problem", "solution", "answer", "kind"}
        assert all(isinstance(v, str) and v for v in item.values())
        lines = item["solution"].split("\n")
        assert lines[-1] == f"The final answer is $\\boxed{{{item['answer']}}}$."
        assert 3 <= len(lines) <= 5, item["solution"]
        for line in lines[:-1]:
            assert line.strip() == line and re.search(r"\d", line), line
        # The answer is reached in the steps, not only announced in the last line.
        assert item["answer"] in "\n".join(lines[:-1])
        lengths.append(len(item["problem"]) + len(item["solution"]))
    assert max(lengths) <= 400
    assert min(lengths) >= 80
    assert 110 <= statistics.median(lengths) <= 300


@pytest.mark.parametrize("kind", KINDS)
def test_wording_varies(by_kind, kind):
    # Numbers masked out, what is left is the phrasing; each kind needs several.
    shapes = {re.sub(r"-?\d+(\.\d+)?", "#", it["problem"]) for it in by_kind[kind]}
    openers = {" ".join(s.split()[:2]) for s in shapes}
    assert len(openers) >= 2, openers


def test_same_seed_same_problems_and_global_rng_untouched():
    random.seed(1234)
    state = random.getstate()
    first = generate_problems(60, seed=7)
    assert random.getstate() == state
    random.seed(999)
    assert generate_problems(60, seed=7) == first
    assert generate_problems(60, seed=8) != first


def test_default_kinds_are_balanced_and_distinct():
    items = generate_problems(120, seed=3)
    assert Counter(it["kind"] for it in items) == {k: 20 for k in KINDS}
    assert len({it["problem"] for it in items}) == len(items)


def test_kinds_filter_and_zero_count():
    items = generate_problems(30, seed=5, kinds=("fractions", "derivative"))
    assert {it["kind"] for it in items} == {"fractions", "derivative"}
    assert generate_problems(0, seed=5) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": -1, "seed": 0},
        {"n": 5, "seed": 0, "kinds": ("calculus",)},
        {"n": 5, "seed": 0, "kinds": ()},
    ],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        generate_problems(**kwargs)


def _read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_write_demo_dataset(tmp_path):
    data_dir = tmp_path / "data"
    train_path, test_path = write_demo_dataset(data_dir)
    assert (train_path, test_path) == (data_dir / "train.jsonl", data_dir / "test.jsonl")
    train, test = _read_jsonl(train_path), _read_jsonl(test_path)
    assert (len(train), len(test)) == (600, 60)
    for row in train + test:
        assert set(row) == {"problem", "solution", "answer", "kind"}
        CHECKS[row["kind"]](row)
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    # Every kind is represented in the small test split too.
    assert {r["kind"] for r in test} == set(KINDS)
    assert data_dir.stat().st_mode & 0o777 == 0o700
    assert train_path.stat().st_mode & 0o777 == 0o600
    assert test_path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in data_dir.iterdir()) == ["test.jsonl", "train.jsonl"]


def test_write_demo_dataset_is_reproducible_and_fixes_modes(tmp_path):
    a = write_demo_dataset(tmp_path / "a", n_train=40, n_test=10, seed=3)
    b_dir = tmp_path / "b"
    b_dir.mkdir(mode=0o755)
    b_dir.chmod(0o755)
    (b_dir / "train.jsonl").write_text("stale\n")
    (b_dir / "train.jsonl").chmod(0o644)
    b = write_demo_dataset(b_dir, n_train=40, n_test=10, seed=3)
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes()
        assert pb.stat().st_mode & 0o777 == 0o600
    assert b_dir.stat().st_mode & 0o777 == 0o700
    c = write_demo_dataset(tmp_path / "c", n_train=40, n_test=10, seed=4)
    assert c[0].read_bytes() != a[0].read_bytes()


# --- the demo's easy problems, split keys, the pretraining format ----------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_easy_problems_are_right_and_small(kind):
    items = generate_problems(60, seed=5, kinds=(kind,), easy=True)
    for item in items:
        CHECKS[kind](item)
        numbers = [abs(int(n)) for n in re.findall(r"\d+", item["problem"])]
        assert max(numbers) <= 200, item["problem"]  # percentages of up to 200; the rest smaller


def test_problem_key_ignores_wording_and_exclude_keeps_splits_apart():
    a = {"kind": "percentage", "problem": "What is 20% of 40?", "answer": "8"}
    b = {"kind": "percentage", "problem": "Find 20% of 40.", "answer": "8"}
    c = {"kind": "percentage", "problem": "What is 25% of 40?", "answer": "10"}
    assert problem_key(a) == problem_key(b) != problem_key(c)
    test = generate_problems(30, seed=0, easy=True)
    keys = {problem_key(r) for r in test}
    train = generate_problems(200, seed=1, easy=True, exclude=keys)
    assert not keys & {problem_key(r) for r in train}
    assert generate_problems(200, seed=1, easy=True, exclude=keys) == train  # deterministic


def test_problem_pool_is_distinct_and_leaves_out_the_excluded():
    test = generate_problems(12, seed=0, easy=True)
    keys = {problem_key(r) for r in test}
    pool = problem_pool(3, keys, kinds=("percentage", "gcd_lcm"), per_kind=500)
    pool_keys = [problem_key(r) for r in pool]
    assert len(pool_keys) == len(set(pool_keys)) and not keys & set(pool_keys)
    assert {r["kind"] for r in pool} == {"percentage", "gcd_lcm"}


def test_plain_text_has_no_chat_format_and_boxes_only_when_asked():
    row = generate_problems(1, seed=2, kinds=("linear_equation",))[0]
    plain = plain_text(row)
    assert plain.startswith(f"Q: {row['problem']}\nA: ") and plain.endswith(f"\nAnswer: {row['answer']}")
    assert "boxed" not in plain
    assert plain_text(row, boxed=True) == f"Q: {row['problem']}\nA: {row['solution']}"
