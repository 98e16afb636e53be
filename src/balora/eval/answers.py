"""Answer extraction and checking for GSM8K (Cobbe et al., 2021) and MATH (Hendrycks et al., 2021).

GSM8K: the number after "####" or "The answer is" (as MetaMath-trained models write it, and as the BA-LoRA and PiSSA
evaluation scripts read it), else the content of a `\\boxed{}`, else the last number of the output; commas, `$`,
`%` and units are dropped and the values are compared exactly as fractions.

MATH: the content of the last `\\boxed{...}` (nested braces), else the text after "The answer is"; both sides are
normalised as the MATH paper's checker does (`is_equiv`/`strip_string` in hendrycks/math: `\\dfrac`, `\\left`,
units, spaces, `\\sqrt3`, `\\frac12`, `0.5`, `a/b`, ...) and compared as strings, then as numbers, then, where sympy
can decide it within a time limit, as expressions (`math_sympy.sympy_equal`).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, localcontext
from fractions import Fraction

from balora.eval.math_sympy import sympy_equal

_NUMBER = re.compile(r"(?<![\w.])-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\w.])-?\.\d+")
_ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?", re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------------- GSM8K
def _clean_number_text(text: str) -> str:
    return text.replace("\u2212", "-").replace("$ ", "$").replace("- ", "-")


def _number_value(token: str) -> Fraction:
    return Fraction(token.replace("$", "").replace(",", ""))


def _format_fraction(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    with localcontext() as ctx:
        ctx.prec = 40
        decimal = Decimal(value.numerator) / Decimal(value.denominator)
    if Fraction(decimal) == value:  # terminating decimal: 18.5, 0.25
        return format(decimal.normalize(), "f")
    return f"{value.numerator}/{value.denominator}"


_MAX_NUMBER_CHARS = 1000  # longer digit runs are not answers (and int() refuses over 4,300 digits)


def _numbers(text: str) -> list[str]:
    """Number tokens of `text`, without those that are no number: `a/0`, or over 1,000 characters."""
    found = [m.group(0) for m in _NUMBER.finditer(_clean_number_text(text))]
    return [t for t in found if len(t) <= _MAX_NUMBER_CHARS and not re.search(r"/0+$", t)]


def _after_marker(segment: str) -> list[str]:
    """Numbers after an answer marker; an equation in the marker's sentence counts by its result ("4 + 1 = 5" -> 5).
    The sentence ends at a newline or a period followed by a space (so "2.5" stays whole)."""
    line = re.split(r"\n|\.\s", segment, maxsplit=1)[0]
    if "=" in line:
        result = _numbers(line.rsplit("=", 1)[1])
        if result:
            return result
    return _numbers(segment)


def extract_gsm8k_answer(text: str) -> str | None:
    """The final numeric answer of a GSM8K solution as a canonical string ("18", "-3", "2.5"), or None.

    Order: first number after the last "####"; first number after the last "The (final) answer is"; first number in
    the last `\\boxed{}`; the last number anywhere. After a marker, an equation in the marker's sentence gives the
    number after its last "=" ("The answer is 4 + 1 = 5" -> "5"). "$1,234.50" -> "1234.5"; "50%" -> "50";
    "3/4" -> "0.75".
    """
    candidates: list[str] = []
    if "####" in text:
        candidates = _after_marker(text.rsplit("####", 1)[1])
    if not candidates:
        matches = list(_ANSWER_IS.finditer(text))
        if matches:
            candidates = _after_marker(text[matches[-1].end() :])
    if not candidates:
        boxed = last_boxed(text)
        if boxed is not None:
            candidates = _numbers(boxed)
    if candidates:
        return _format_fraction(_number_value(candidates[0]))
    everything = _numbers(text)
    return _format_fraction(_number_value(everything[-1])) if everything else None


def gsm8k_correct(output: str, reference: str) -> bool:
    """Whether the model output's answer equals the reference (a full GSM8K answer with "#### n", or just n)."""
    expected = extract_gsm8k_answer(reference)
    if expected is None:
        raise ValueError(f"GSM8K reference {reference[-80:]!r} has no number; expected '#### <number>' or a number")
    predicted = extract_gsm8k_answer(output)
    return predicted is not None and Fraction(predicted) == Fraction(expected)


# ----------------------------------------------------------------------------------------------------- extraction
def _braced(text: str, start: int) -> tuple[str, int] | None:
    """Content of the brace group opening at text[start] == "{" and the index after it; None if unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (nested braces kept), `\\boxed 5` too; None if absent."""
    positions = [m for m in re.finditer(r"\\(?:boxed|fbox)\s*", text)]
    for match in reversed(positions):
        rest = text[match.end() :]
        if rest.startswith("{"):
            group = _braced(text, match.end())
            if group is not None:
                return group[0]
        elif match.group(0).endswith(" ") and rest:
            return re.split(r"[\s$]", rest, maxsplit=1)[0]
    return None


def extract_math_answer(text: str) -> str | None:
    """The final answer of a MATH solution: the last `\\boxed{}` content, else what follows "The answer is"."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    answer = text[matches[-1].end() :].strip().split("\n")[0]
    answer = re.split(r"\.\s+I hope it is correct", answer)[0]  # Minerva's "Final Answer: ... I hope it is correct."
    answer = re.sub(r"\.\s.*$", "", answer).strip()  # a second sentence after the answer
    return answer.strip("$ ").rstrip(".").strip("$ ") or None


# --------------------------------------------------------------------------------------------------- normalisation
def _fix_sqrt(s: str) -> str:  # \sqrt3 -> \sqrt{3}
    return re.sub(r"\\sqrt\s*([^{\[\s\\])", r"\\sqrt{\1}", s)


def _fix_fracs(s: str) -> str:  # \frac12 -> \frac{1}{2}, \frac1{72} -> \frac{1}{72}, \frac{3}4 -> \frac{3}{4}
    out, i = [], 0
    while True:
        j = s.find("\\frac", i)
        if j < 0:
            return "".join(out) + s[i:]
        out.append(s[i : j + 5])
        i = j + 5
        for _ in range(2):
            if i < len(s) and s[i] == "{":
                group = _braced(s, i)
                if group is None:
                    return "".join(out) + s[i:]
                out.append("{" + group[0] + "}")
                i = group[1]
            elif i < len(s):
                out.append("{" + s[i] + "}")
                i += 1


def _strip_text_units(s: str) -> str:
    r"""Drop a trailing unit in \text{} or \mbox{} ("5\text{ cm}" -> "5"); unwrap an answer that is only text."""
    whole = re.fullmatch(r"\\(?:text|textbf|mbox|mathrm)\{(.*)\}", s)
    if whole:
        return whole.group(1)
    stripped = re.sub(r"\\(?:text|mbox|mathrm)\{[^{}]*\}(\^\d)?$", "", s).strip()
    return stripped or s


def normalize_math_answer(answer: str) -> str:
    """A canonical form of a MATH answer, following the MATH paper's `strip_string` with a few additions.

    Removes newlines, `\\!`, `\\left`/`\\right`, degrees, `\\$`, `%`, spacing commands, spaces, trailing periods,
    surrounding `$`, a trailing unit in `\\text{}`, a short "x =" prefix and thousands separators; `\\dfrac` and
    `\\tfrac` become `\\frac`; `\\frac12` becomes `\\frac{1}{2}`, `\\sqrt3` becomes `\\sqrt{3}`, "0.5" and "1/2"
    become `\\frac{1}{2}`.
    """
    s = answer.strip().replace("\n", "").replace("\\!", "")
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s).strip()
    s = s.replace("\\\\", "\\").replace("tfrac", "frac").replace("dfrac", "frac").replace("\\displaystyle", "")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    for space in ("\\,", "\\;", "\\:", "\\ ", "~", "\\quad"):
        s = s.replace(space, " ")
    s = _strip_text_units(s.strip())
    s = s.rstrip(". ").strip()
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0].strip()) <= 2:  # "x = 5", "k=3"
        s = parts[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if s == "0.5":
        s = "\\frac{1}{2}"
    slash = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if slash:
        s = f"\\frac{{{slash.group(1)}}}{{{slash.group(2)}}}"
    return s


def _as_number(s: str) -> float | None:
    """Value of a normalised plain number, `\\frac{p}{q}` or `-\\frac{p}{q}`; None for anything else."""
    if re.fullmatch(r"-?\d+(\.\d+)?", s):
        return float(s)
    frac = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)
    if frac and float(frac.group(3)) != 0:
        value = float(frac.group(2)) / float(frac.group(3))
        return -value if frac.group(1) else value
    return None


def _split_top_level(s: str) -> tuple[str, list[str], str] | None:
    """'(a,b)' -> ('(', ['a', 'b'], ')') for tuples and intervals; None unless bracketed with a top-level comma."""
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return None
    parts, depth, current = [], 0, []
    for ch in s[1:-1]:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return (s[0], parts, s[-1]) if len(parts) > 1 else None


def math_equal(predicted: str | None, reference: str | None, *, timeout: float = 5.0) -> bool:
    """Whether two MATH answers are equal: normalised strings, then numbers, then element-wise for tuples and
    intervals, then sympy (`simplify(a - b) == 0`) within `timeout` seconds. Undecided counts as not equal."""
    if predicted is None or reference is None:
        return False
    a, b = normalize_math_answer(predicted), normalize_math_answer(reference)
    if a == b:
        return True
    if not a or not b:
        return False
    x, y = _as_number(a), _as_number(b)
    if x is not None and y is not None:
        return math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)
    ta, tb = _split_top_level(a), _split_top_level(b)
    if ta is not None and tb is not None:
        return (
            ta[0] == tb[0]
            and ta[2] == tb[2]
            and len(ta[1]) == len(tb[1])
            and all(math_equal(p, q, timeout=timeout) for p, q in zip(ta[1], tb[1], strict=True))
        )
    return sympy_equal(a, b, timeout=timeout)
