"""Final answers out of free-form solutions, and a forgiving comparison of two answers.

`eval` scores a generation by the answer it ends with, the way math benchmarks do: the
last `\\boxed{...}` (OpenR1's and the demo's format), else a "Final Answer: ..." line,
else the last number in the text. Answers are compared after normalisation (spacing,
`$`, `\\left`/`\\right`, `\\dfrac`, thousands separators, trailing zeros, ...) and, when
both read as numbers, by value (0.5 == 1/2). No sympy: what is not a number is compared
as normalised text.
"""

from __future__ import annotations

import re
from fractions import Fraction

HOWS = ("boxed", "final_answer_line", "last_number", "none")
FORMATTED = ("boxed", "final_answer_line")  # the answer was given in a recognisable form

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "Final Answer: 42", "**Final Answer**: 42", "The final answer is 42." (the line's rest).
_FINAL_LINE = re.compile(r"final\s+answer[\s*]*(?:is\b)?[\s*]*[:：]?[\s*]*(.*)$", re.IGNORECASE)
# A number that is not the tail of a word or of another number: -3, 1,000, 2.5, .5, 3/4.
# A minus counts only where it cannot be subtraction (not right after a word or bracket).
_NUMBER = re.compile(r"(?:(?<![\w)\]}])-)?(?<![\w.])(?:\d{1,3}(?:,\d{3})+|\d+|(?=\.\d))(?:\.\d+)?(?:/\d+)?")
_TEXT_WRAPPERS = ("text", "textbf", "textit", "mathrm", "mathbf", "mbox", "operatorname")


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Given text and the index just after an opening brace, return (the contents up to
    the matching closing brace, the index after it), or None when it never closes.
    Escaped braces (`\\{`, `\\}`) are content, not structure."""
    depth, i = 1, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i], i + 1
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Given a text, return the contents of its last complete, non-empty `\\boxed{...}`
    (brace-matched, so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`), or None."""
    found = None
    for match in _BOXED.finditer(text):
        got = _braced(text, match.end())
        # A cut-off last box (generation hit max tokens) leaves an earlier complete one.
        if got is not None and got[0].strip():
            found = got[0].strip()
    return found


def _final_answer_line(text: str) -> str | None:
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        match = _FINAL_LINE.search(lines[i])
        if not match:
            continue
        rest = _strip_decoration(match.group(1))
        if not rest:
            # "**Final Answer**" alone on its line: the answer is on the next non-empty line.
            rest = next((_strip_decoration(line) for line in lines[i + 1:] if _strip_decoration(line)), "")
        if rest:
            return rest
    return None


def _strip_decoration(text: str) -> str:
    text = text.strip().strip("*").strip()
    text = text.strip("$").strip()
    for opener, closer in (("\\[", "\\]"), ("\\(", "\\)")):
        if text.startswith(opener) and text.endswith(closer):
            text = text[len(opener):-len(closer)].strip()
    return text.rstrip(".").strip().strip("$").strip()


def extract_answer(text: str) -> tuple[str | None, str]:
    """Given a generated (or reference) solution, return (answer, how): the last
    `\\boxed{...}` ("boxed"), else the answer on the last "Final Answer: ..." / "The final
    answer is ..." line ("final_answer_line"), else the last number ("last_number"), else
    (None, "none")."""
    if not text:
        return None, "none"
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    line = _final_answer_line(text)
    if line:
        return line, "final_answer_line"
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1], "last_number"
    return None, "none"


def _unwrap_command(text: str, name: str) -> str:
    """Given a text, return it with every `\\name{X}` replaced by X (brace-matched)."""
    pattern = re.compile(r"\\" + name + r"\s*\{")
    while (match := pattern.search(text)) is not None:
        got = _braced(text, match.end())
        if got is None:
            break
        inner, end = got
        text = text[:match.start()] + inner + text[end:]
    return text


def _simple_fractions(text: str) -> str:
    """Given a text, return it with `\\frac{a}{b}` (and `\\frac12`) over integers written
    `a/b`; other fractions are left alone."""
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)
    return re.sub(r"\\frac\{\s*(-?\d+)\s*\}\{\s*(-?\d+)\s*\}", r"\1/\2", text)


def _trim_decimal(match: re.Match) -> str:
    whole, frac = match.group(1), match.group(2).rstrip("0")
    return f"{whole}.{frac}" if frac else whole


def normalize(ans: str) -> str:
    """Given an answer, return a canonical text for comparison: no spaces, `$`,
    `\\left`/`\\right`, spacing commands, `\\text{}` wrappers, degree or percent signs, a
    leading `x =`, or trailing period; `\\dfrac`/`\\tfrac` as `\\frac`, integer fractions as
    `a/b`, "1,000" as "1000", "2.50" as "2.5", "-0" as "0"."""
    text = ans.strip()
    boxed = last_boxed(text)
    if boxed is not None and text.startswith(("\\boxed", "\\fbox")):
        text = boxed
    text = text.replace("\\$", "").replace("$", "").replace("{,}", ",")
    text = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", text)
    text = re.sub(r"\\(?:displaystyle|limits)(?![a-zA-Z])", "", text)
    text = re.sub(r"\\[,;:! ]", "", text)  # LaTeX spacing: \, \; \: \! and "\ "
    text = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", text)
    for name in _TEXT_WRAPPERS:
        text = _unwrap_command(text, name)
    text = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°", "", text)  # degrees: 30^\circ == 30
    text = text.replace("\\%", "").replace("%", "")
    text = re.sub(r"\s+", "", text)
    # "x = 3", "f'(x) = 4x", "y_1 = 2": the value, not the name.
    text = re.sub(r"^[A-Za-z](?:_\{?\w+\}?)?(?:'*\([A-Za-z]\))?=(?!=)", "", text)
    text = text.rstrip(".")
    while len(text) > 2 and text[0] == "{" and _braced(text, 1) == (text[1:-1], len(text)):
        text = text[1:-1]  # {5} -> 5, only when the outer braces match each other
    text = _simple_fractions(text)
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
        text = text.replace(",", "")
    text = re.sub(r"(?<![\d.])(\d+)\.(\d+)(?![\d.])", _trim_decimal, text)
    if m := re.fullmatch(r"\(([A-Ea-e])\)", text):
        text = m.group(1).upper()  # multiple choice: (C) == C
    if text in ("-0", "+0"):
        text = "0"
    return text


def to_number(text: str) -> Fraction | None:
    """Given a normalised answer, return its exact value when it is an integer, a
    decimal or a fraction of those (`-26/15`, `0.5`, `1/2.5`), else None."""
    m = re.fullmatch(r"([+-]?(?:\d+\.?\d*|\.\d+))(?:/([+-]?(?:\d+\.?\d*|\.\d+)))?", text)
    if not m:
        return None
    num = Fraction(m.group(1))
    if m.group(2) is None:
        return num
    den = Fraction(m.group(2))
    return None if den == 0 else num / den


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Given a predicted and a reference answer, return whether they agree: equal after
    `normalize`, or equal in value when both read as numbers (0.5 == 1/2 == 2/4)."""
    if predicted is None or reference is None:
        return False
    a, b = normalize(predicted), normalize(reference)
    if not a or not b:
        return False
    if a == b:
        return True
    x, y = to_number(a), to_number(b)
    if x is not None and y is not None:
        return x == y
    # "10 cm" against "10", "12 apples" against "12": compare the numbers when a trailing
    # unit is all that stands between them (only when what remains is a plain number).
    x, y = to_number(_strip_unit(a)), to_number(_strip_unit(b))
    return x is not None and y is not None and x == y


# A unit is a word of two or more letters ("cm", "apples"), optionally squared, or a
# compound like "m/s"; a single letter after a number ("2x") is a variable, not a unit.
_UNIT_RE = re.compile(r"^(.*?\d)\s*(?:[a-z]{2,}(?:\^?\d)?|°|[a-z]+(?:\^?\d)?/[a-z]+(?:\^?\d)?)$",
                      re.IGNORECASE)


def _strip_unit(text: str) -> str:
    """Given a normalized answer, return it without one trailing unit word ("10cm" -> "10")."""
    m = _UNIT_RE.match(text)
    return m.group(1) if m else text
