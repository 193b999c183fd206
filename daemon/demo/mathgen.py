"""Synthetic step-by-step math problems for the demo run and its train/test files.

Each generator draws its parameters first and derives the wording, the worked steps
and the answer from those parameters, so the answer is exact by construction. Every
solution ends with the line `The final answer is $\\boxed{ANSWER}$.`, the format the
evaluation extracts answers from.
"""

from __future__ import annotations

import json
import math
import random
import re
from fractions import Fraction
from pathlib import Path
from typing import Callable

from mathlora_checkpoints.fsio import atomic_write_text, ensure_private_dir

KINDS: tuple[str, ...] = (
    "linear_equation",
    "order_of_operations",
    "fractions",
    "percentage",
    "derivative",
    "gcd_lcm",
)

# Consecutive draws that may all repeat an earlier problem before we conclude the
# requested kinds cannot supply n distinct problems (only tiny spaces run dry).
_MAX_REPEATS = 2000


def final_line(answer: str) -> str:
    """Given an answer string, return the solution's closing line that boxes it."""
    return f"The final answer is $\\boxed{{{answer}}}$."


def _fmt_int(value: int) -> str:
    return str(int(value))


def _fmt_fraction(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return f"{value.numerator}/{value.denominator}"


def _fmt_decimal(value: Fraction) -> str:
    """Given a Fraction whose denominator has only factors 2 and 5, return its exact
    decimal without trailing zeros; raise ValueError when it would not terminate."""
    den = value.denominator
    digits = 0
    while den % 10 == 0:
        den //= 10
        digits += 1
    while den % 2 == 0 or den % 5 == 0:
        # Each extra factor 2 or 5 costs at most one more decimal place.
        den //= 2 if den % 2 == 0 else 5
        digits += 1
    if den != 1:
        raise ValueError(f"{value} has no terminating decimal expansion")
    scaled = value * 10**digits
    assert scaled.denominator == 1
    sign = "-" if scaled < 0 else ""
    text = str(abs(scaled.numerator)).rjust(digits + 1, "0")
    whole, frac = (text[:-digits], text[-digits:]) if digits else (text, "")
    frac = frac.rstrip("0")
    return f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}"


def _paren(value: int) -> str:
    # Negative intermediate values are parenthesised so "3 - -2" never appears.
    return f"({value})" if value < 0 else str(value)


def _nonzero(limit: int) -> list[int]:
    """-limit .. limit without 0."""
    return [n for n in range(-limit, limit + 1) if n != 0]


def _coef_x(a: int) -> str:
    if a == 1:
        return "x"
    if a == -1:
        return "-x"
    return f"{a}x"


def _make(kind: str, problem: str, steps: list[str], answer: str, params: dict) -> dict:
    return {
        "problem": problem,
        "solution": "\n".join([*steps, final_line(answer)]),
        "answer": answer,
        "kind": kind,
        # Kept for generators' own bookkeeping; stripped before items leave the module.
        "_params": params,
    }


# --- linear equations -------------------------------------------------------------


def _linear_equation(rng: random.Random, easy: bool = False) -> dict:
    x = rng.randint(-5, 9) if easy else rng.randint(-9, 12)
    form = rng.randrange(3)
    if form == 0:
        a = rng.choice([2, 3, 4, 5] if easy else [2, 3, 4, 5, 6, 7, 8, 9, -2, -3])
        b = rng.choice(_nonzero(9 if easy else 20))
        c = a * x + b
        op = f"+ {b}" if b > 0 else f"- {-b}"
        equation = f"{_coef_x(a)} {op} = {c}"
        move = f"Subtract {b} from both sides" if b > 0 else f"Add {-b} to both sides"
        steps = [
            f"{move}: {_coef_x(a)} = {c - b}.",
            f"Divide both sides by {a}: x = {x}.",
        ]
    elif form == 1:
        a = rng.randint(2, 5 if easy else 9)
        b = rng.choice(_nonzero(5 if easy else 9))
        c = a * (x + b)
        inner = f"x + {b}" if b > 0 else f"x - {-b}"
        equation = f"{a}({inner}) = {c}"
        move = f"Subtract {b} from both sides" if b > 0 else f"Add {-b} to both sides"
        steps = [
            f"Divide both sides by {a}: {inner} = {x + b}.",
            f"{move}: x = {x}.",
        ]
    else:
        c = rng.randint(1, 3 if easy else 6)
        a = c + rng.randint(1, 3 if easy else 6)
        b = rng.choice(_nonzero(9 if easy else 15))
        d = a * x + b - c * x
        op = f"+ {b}" if b > 0 else f"- {-b}"
        equation = f"{a}x {op} = {_coef_x(c)} + {d}" if d >= 0 else f"{a}x {op} = {_coef_x(c)} - {-d}"
        move = f"Subtract {b} from both sides" if b > 0 else f"Add {-b} to both sides"
        steps = [
            f"Subtract {_coef_x(c)} from both sides: {_coef_x(a - c)} {op} = {d}.",
            f"{move}: {_coef_x(a - c)} = {d - b}.",
        ]
        if a - c != 1:
            steps.append(f"Divide both sides by {a - c}: x = {x}.")
    problem = rng.choice(
        [
            f"Solve for x: {equation}",
            f"Find x if {equation}.",
            f"What value of x satisfies {equation}?",
        ]
    )
    return _make("linear_equation", problem, steps, _fmt_int(x), {"x": x})


# --- order of operations ----------------------------------------------------------


def _order_of_operations(rng: random.Random, easy: bool = False) -> dict:
    form = rng.randrange(4)
    if form == 0:
        a, b = rng.randint(1, 9 if easy else 20), rng.randint(2, 3 if easy else 6)
        c, d = rng.randint(1, 6 if easy else 12), rng.randint(1, 6 if easy else 12)
        e = c - d
        f = e * e
        g = b * f
        value = a + g
        expr = f"{a} + {b} * ({c} - {d})^2"
        steps = [
            f"Parentheses first: {c} - {d} = {e}.",
            f"Exponent: {_paren(e)}^2 = {f}.",
            f"Multiply: {b} * {f} = {g}.",
            f"Add: {a} + {g} = {value}.",
        ]
    elif form == 1:
        a, b = rng.randint(1, 9 if easy else 15), rng.randint(1, 9 if easy else 15)
        c, d = rng.randint(2, 5 if easy else 9), rng.randint(1, 20 if easy else 40)
        e = a + b
        f = e * c
        value = f - d
        expr = f"({a} + {b}) * {c} - {d}"
        steps = [
            f"Parentheses first: {a} + {b} = {e}.",
            f"Multiply: {e} * {c} = {f}.",
            f"Subtract: {f} - {d} = {value}.",
        ]
    elif form == 2:
        a, b = rng.randint(2, 9 if easy else 12), rng.randint(2, 9 if easy else 12)
        d, k = rng.randint(2, 5 if easy else 9), rng.randint(1, 9 if easy else 12)
        c = d * k
        e = a * b
        value = e - k
        expr = f"{a} * {b} - {c} / {d}"
        steps = [
            f"Multiply and divide before subtracting: {a} * {b} = {e} and {c} / {d} = {k}.",
            f"Subtract: {e} - {k} = {value}.",
        ]
    else:
        top = 6 if easy else 9
        a, b, c, d = rng.randint(2, top), rng.randint(2, top), rng.randint(2, top), rng.randint(1, 9 if easy else 30)
        e = a * a
        f = b * c
        g = e - f
        value = g + d
        expr = f"{a}^2 - {b} * {c} + {d}"
        steps = [
            f"Exponent first: {a}^2 = {e}.",
            f"Multiply: {b} * {c} = {f}.",
            f"Left to right: {e} - {f} = {g}, then {g} + {d} = {value}.",
        ]
    problem = rng.choice([f"Compute {expr}.", f"Evaluate {expr}.", f"What is the value of {expr}?"])
    return _make("order_of_operations", problem, steps, _fmt_int(value), {"expr": expr})


# --- fractions --------------------------------------------------------------------


def _fractions(rng: random.Random, easy: bool = False) -> dict:
    b, d = rng.randint(2, 6 if easy else 12), rng.randint(2, 6 if easy else 12)
    a, c = rng.randint(1, 5 if easy else 11), rng.randint(1, 5 if easy else 11)
    op = rng.choice("+-*")
    x, y = Fraction(a, b), Fraction(c, d)
    expr = f"{a}/{b} {op} {c}/{d}"
    steps: list[str] = []
    if op == "*":
        num, den = a * c, b * d
        steps.append(f"Multiply numerators and denominators: ({a} * {c})/({b} * {d}) = {num}/{den}.")
        value = x * y
    else:
        value = x + y if op == "+" else x - y
        if b == d:
            num, den = (a + c if op == "+" else a - c), b
            steps.append(f"The denominators match, so combine numerators: {a} {op} {c} = {num}.")
            steps.append(f"Keep the denominator: {expr} = {num}/{den}.")
        else:
            den = math.lcm(b, d)
            a2, c2 = a * (den // b), c * (den // d)
            num = a2 + c2 if op == "+" else a2 - c2
            steps.append(f"Common denominator: lcm({b}, {d}) = {den}.")
            steps.append(f"Rewrite: {a}/{b} = {a2}/{den} and {c}/{d} = {c2}/{den}.")
            steps.append(f"Combine: {a2}/{den} {op} {c2}/{den} = {num}/{den}.")
    g = math.gcd(num, den)
    if g > 1 and num != 0:
        steps.append(f"Divide top and bottom by {g}: {num}/{den} = {_fmt_fraction(value)}.")
    elif value.denominator == 1 and den != 1:
        steps.append(f"Simplify: {num}/{den} = {_fmt_fraction(value)}.")
    else:
        steps.append(f"gcd({abs(num)}, {den}) = 1, so {num}/{den} is already in lowest terms.")
    problem = rng.choice(
        [
            f"Compute {expr}.",
            f"What is {expr} in lowest terms?",
            f"Simplify {expr} and reduce the result.",
        ]
    )
    return _make("fractions", problem, steps, _fmt_fraction(value), {"x": x, "y": y, "op": op})


# --- percentages ------------------------------------------------------------------


def _percentage(rng: random.Random, easy: bool = False) -> dict:
    form = rng.randrange(4)
    if easy:
        p, base = rng.choice([10, 20, 25, 50]), rng.randrange(20, 201, 20)
    else:
        p = rng.choice([5, 10, 12, 15, 20, 25, 30, 35, 40, 45, 50, 60, 75, 80])
        base = rng.randrange(20, 401, rng.choice([1, 2, 4, 5, 10]))
    part = Fraction(p * base, 100)
    fp, fb, fpart = _fmt_decimal(Fraction(p, 100)), str(base), _fmt_decimal(part)
    if form == 0:
        problem = rng.choice([f"What is {p}% of {base}?", f"Find {p}% of {base}."])
        steps = [
            f"Write {p}% as a decimal: {p}/100 = {fp}.",
            f"Multiply: {fp} * {fb} = {fpart}.",
        ]
        value = part
    elif form == 1:
        value = base + part
        problem = rng.choice(
            [
                f"A price of {base} rises by {p}%. What is the new price?",
                f"An account balance of {base} grows by {p}%. What is the new balance?",
            ]
        )
        steps = [
            f"The increase is {p}% of {base}: {fp} * {fb} = {fpart}.",
            f"Add it on: {fb} + {fpart} = {_fmt_decimal(value)}.",
        ]
    elif form == 2:
        value = base - part
        problem = rng.choice(
            [
                f"A jacket costs {base} and is discounted by {p}%. What is the sale price?",
                f"A price of {base} falls by {p}%. What is the new price?",
            ]
        )
        steps = [
            f"The discount is {p}% of {base}: {fp} * {fb} = {fpart}.",
            f"Subtract it: {fb} - {fpart} = {_fmt_decimal(value)}.",
        ]
    else:
        value = Fraction(p)
        problem = rng.choice(
            [
                f"What percent of {base} is {fpart}?",
                f"{fpart} is what percent of {base}?",
            ]
        )
        steps = [
            f"Divide the part by the whole: {fpart} / {fb} = {fp}.",
            f"Multiply by 100: {fp} * 100 = {p}, so it is {p}%.",
        ]
    answer = _fmt_decimal(value)
    return _make("percentage", problem, steps, answer, {"p": p, "base": base, "form": form})


# --- derivatives ------------------------------------------------------------------


def format_polynomial(coefs: dict[int, int]) -> str:
    """Given a mapping power -> integer coefficient, return the canonical string
    such as "9x^2 - 4x + 5" (descending powers, no zero terms, "0" when empty)."""
    out = ""
    for power in sorted((k for k, v in coefs.items() if v != 0), reverse=True):
        c = coefs[power]
        mag = abs(c)
        if power == 0:
            body = str(mag)
        else:
            body = ("" if mag == 1 else str(mag)) + ("x" if power == 1 else f"x^{power}")
        if not out:
            out = ("-" if c < 0 else "") + body
        else:
            out += (" - " if c < 0 else " + ") + body
    return out or "0"


def _derivative(rng: random.Random, easy: bool = False) -> dict:
    degree = rng.randint(2, 3 if easy else 4)
    coefs = {degree: rng.choice(_nonzero(5) if easy else [n for n in range(-6, 10) if n != 0])}
    for power in range(degree - 1, -1, -1):
        # Some lower terms are dropped so the polynomials are not all the same shape.
        coefs[power] = 0 if rng.random() < 0.25 else rng.choice(_nonzero(5 if easy else 9))
    deriv = {p - 1: c * p for p, c in coefs.items() if p >= 1 and c != 0}
    poly, answer = format_polynomial(coefs), format_polynomial(deriv)
    terms = [
        f"{format_polynomial({p: c})} -> {format_polynomial({p - 1: c * p})}"
        for p, c in sorted(coefs.items(), reverse=True)
        if c != 0
    ]
    steps = [
        "Use the power rule d/dx(a*x^n) = n*a*x^(n-1); constants vanish.",
        "Term by term: " + ", ".join(terms) + ".",
        f"Combine: f'(x) = {answer}.",
    ]
    problem = rng.choice(
        [
            f"Find the derivative of f(x) = {poly}.",
            f"Differentiate f(x) = {poly} with respect to x.",
            f"What is f'(x) if f(x) = {poly}?",
        ]
    )
    return _make("derivative", problem, steps, answer, {"coefs": coefs})


# --- gcd / lcm --------------------------------------------------------------------


def _factorize(n: int) -> dict[int, int]:
    out: dict[int, int] = {}
    p = 2
    while p * p <= n:
        while n % p == 0:
            out[p] = out.get(p, 0) + 1
            n //= p
        p += 1
    if n > 1:
        out[n] = out.get(n, 0) + 1
    return out


def _fmt_factors(factors: dict[int, int]) -> str:
    if not factors:
        return "1"
    return " * ".join(str(p) if e == 1 else f"{p}^{e}" for p, e in sorted(factors.items()))


def _gcd_lcm(rng: random.Random, easy: bool = False) -> dict:
    g = rng.randint(2, 6 if easy else 15)
    m, n = rng.sample(range(1, 7 if easy else 13), 2)
    a, b = g * m, g * n
    fa, fb = _factorize(a), _factorize(b)
    want = rng.choice(["gcd", "lcm"])
    if want == "gcd":
        value = math.gcd(a, b)
        picked = {p: min(fa[p], fb[p]) for p in fa if p in fb}
        rule = "Take each shared prime to its lowest power"
        problem = rng.choice(
            [
                f"Find the greatest common divisor of {a} and {b}.",
                f"What is the GCD of {a} and {b}?",
                f"What is the largest whole number that divides both {a} and {b}?",
            ]
        )
    else:
        value = math.lcm(a, b)
        picked = {p: max(fa.get(p, 0), fb.get(p, 0)) for p in {*fa, *fb}}
        rule = "Take every prime to its highest power"
        problem = rng.choice(
            [
                f"Find the least common multiple of {a} and {b}.",
                f"What is the LCM of {a} and {b}?",
                f"What is the smallest positive number divisible by both {a} and {b}?",
            ]
        )
    steps = [
        f"Factor: {a} = {_fmt_factors(fa)} and {b} = {_fmt_factors(fb)}.",
        # A lone prime ("11 = 11") would be a step that says nothing.
        f"{rule}: {_fmt_factors(picked)} = {value}."
        if _fmt_factors(picked) != str(value)
        else f"{rule}: {value}.",
    ]
    return _make("gcd_lcm", problem, steps, _fmt_int(value), {"a": a, "b": b, "want": want})


_GENERATORS: dict[str, Callable[[random.Random, bool], dict]] = {
    "linear_equation": _linear_equation,
    "order_of_operations": _order_of_operations,
    "fractions": _fractions,
    "percentage": _percentage,
    "derivative": _derivative,
    "gcd_lcm": _gcd_lcm,
}


def problem_key(row: dict) -> tuple:
    """What makes two problems the same exercise, whatever their wording: the kind, the
    numbers in the problem and the answer ("Find 20% of 40." and "What is 20% of 40?"
    are one). Splits are kept apart by this key, not by the text."""
    return row.get("kind"), tuple(sorted(re.findall(r"\d+", row["problem"]))), str(row.get("answer"))


def generate_problems(n: int, seed: int, kinds: tuple[str, ...] | None = None, easy: bool = False,
                      exclude: set | None = None) -> list[dict]:
    """Given a count, a seed and optionally the kinds to draw from, return n distinct
    problems as dicts with keys problem, solution, answer and kind.

    The same arguments always give the same list. Kinds are dealt in shuffled rounds
    so each kind appears n/len(kinds) times, give or take one. `easy` draws small
    numbers (the demo's tiny model); `exclude` holds problem_key()s that must not be
    drawn (another split's). Raise ValueError when n is negative, a kind is unknown or
    empty, or the kinds cannot supply n distinct problems.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    kinds = KINDS if kinds is None else tuple(kinds)
    if not kinds:
        raise ValueError("kinds must name at least one kind")
    unknown = [k for k in kinds if k not in _GENERATORS]
    if unknown:
        raise ValueError(f"unknown kind(s) {unknown}; allowed: {list(KINDS)}")

    rng = random.Random(seed)
    items: list[dict] = []
    seen: set = set(exclude or ())
    round_kinds: list[str] = []
    repeats = 0
    while len(items) < n:
        if not round_kinds:
            round_kinds = list(kinds)
            rng.shuffle(round_kinds)
        kind = round_kinds[-1]
        item = _GENERATORS[kind](rng, easy)
        key = problem_key(item) if exclude is not None else item["problem"]
        if key in seen or item["problem"] in seen:
            repeats += 1
            if repeats > _MAX_REPEATS:
                raise ValueError(f"kinds {list(kinds)} cannot supply {n} distinct problems")
            continue
        repeats = 0
        round_kinds.pop()
        seen.update((key, item["problem"]))
        del item["_params"]
        items.append(item)
    return items


def problem_pool(seed: int, exclude: set, kinds: tuple[str, ...] = KINDS, easy: bool = True,
                 per_kind: int = 20_000) -> list[dict]:
    """Every distinct problem of each kind the generator gives before it runs dry (at
    most `per_kind`), leaving out the keys in `exclude`: the demo's pretraining corpus,
    drawn from with repetition."""
    pool: list[dict] = []
    for i, kind in enumerate(kinds):
        rng, seen, repeats, found = random.Random(seed * 1000 + i), set(exclude), 0, 0
        while found < per_kind and repeats <= _MAX_REPEATS:
            item = _GENERATORS[kind](rng, easy)
            key = problem_key(item)
            if key in seen:
                repeats += 1
                continue
            repeats, found = 0, found + 1
            seen.add(key)
            del item["_params"]
            pool.append(item)
    return pool


def plain_text(row: dict, boxed: bool = False) -> str:
    """A problem worked in the pretraining corpus's own plain format ("Q: ... A: ..."),
    ending with "Answer: N", or with `boxed` the solution's own boxed final line; never
    the chat format."""
    if boxed:
        return f"Q: {row['problem']}\nA: {row['solution']}"
    steps = row["solution"].rsplit("\n", 1)[0] if row["solution"].endswith(final_line(row["answer"])) \
        else row["solution"]
    return f"Q: {row['problem']}\nA: {steps}\nAnswer: {row['answer']}"


def write_demo_dataset(
    data_dir: Path, n_train: int = 600, n_test: int = 60, seed: int = 0
) -> tuple[Path, Path]:
    """Given a directory, split sizes and a seed, write train.jsonl and test.jsonl
    (fields problem, solution, answer, kind) and return their two paths.

    No test problem text appears in train. Files are user-only (0o600), the directory
    0o700; each file is replaced atomically. Raise ValueError when a size is negative.
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"split sizes must be >= 0, got n_train={n_train}, n_test={n_test}")
    # One draw of distinct problems, cut in two, keeps the splits disjoint.
    items = generate_problems(n_train + n_test, seed)
    test, train = items[:n_test], items[n_test:]
    paths = write_rows(data_dir, {"train.jsonl": train, "test.jsonl": test})
    return paths[0], paths[1]


def write_rows(data_dir: Path, files: dict[str, list[dict]]) -> list[Path]:
    """Given a directory and {file name: rows}, write each as JSON lines (user-only, the
    directory 0o700, each file replaced atomically) and return the paths."""
    data_dir = Path(data_dir)
    ensure_private_dir(data_dir)
    # ensure_private_dir leaves an existing directory's mode alone; the data is ours.
    data_dir.chmod(0o700)
    paths = []
    for name, rows in files.items():
        paths.append(data_dir / name)
        atomic_write_text(paths[-1], "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return paths
