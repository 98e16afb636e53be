"""Symbolic equality of two normalised MATH answers with sympy, guarded against hangs and code injection.

sympy's `parse_expr` evaluates Python code, so model output is first translated from a small LaTeX subset into a
string that may only contain numbers, one-letter symbols, a few function names, operators and parentheses; anything
else is "undecided". Nested numeric powers and huge exponents (which big-integer arithmetic in C would compute
without ever returning to Python) are refused, and the comparison runs under a timeout.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_FUNCTIONS = {"sqrt", "pi", "oo", "log", "sin", "cos", "tan", "exp"}
_COMMANDS = [
    (r"\cdot", "*"),
    (r"\times", "*"),
    (r"\div", "/"),
    (r"\pi", " pi "),
    (r"\infty", " oo "),
    (r"\ln", " log"),
    (r"\log", " log"),
    (r"\sin", " sin"),
    (r"\cos", " cos"),
    (r"\tan", " tan"),
    (r"\exp", " exp"),
]
_ALLOWED = re.compile(r"[0-9a-zA-Z+\-*/(). ]*")
_MAX_EXPONENT = 1000


class _Timeout(Exception):
    pass


def _braced(s: str, start: int) -> tuple[str, int] | None:
    depth = 0
    for i in range(start, len(s)):
        depth += {"{": 1, "}": -1}.get(s[i], 0)
        if depth == 0:
            return s[start + 1 : i], i + 1
    return None


def _replace_frac_sqrt(s: str) -> str | None:
    r"""\frac{a}{b} -> ((a)/(b)), \sqrt[n]{a} -> ((a)**(1/(n))), \sqrt{a} -> sqrt(a); None if braces are unbalanced."""
    while True:
        match = re.search(r"\\frac(?=\{)|\\sqrt(?=[\[{])", s)
        if match is None:
            return s
        i = match.end()
        if match.group(0) == "\\frac":
            num = _braced(s, i)
            den = _braced(s, num[1]) if num and num[1] < len(s) and s[num[1]] == "{" else None
            if num is None or den is None:
                return None
            s = f"{s[: match.start()]}(({num[0]})/({den[0]})){s[den[1] :]}"
            continue
        index = None
        if s[i] == "[":
            close = s.find("]", i)
            if close < 0:
                return None
            index, i = s[i + 1 : close], close + 1
        arg = _braced(s, i) if i < len(s) and s[i] == "{" else None
        if arg is None:
            return None
        inner = f"(({arg[0]})**(1/({index})))" if index else f"sqrt({arg[0]})"
        s = f"{s[: match.start()]}{inner}{s[arg[1] :]}"


def latex_to_sympy_text(s: str) -> str | None:
    """A string safe for `parse_expr`, or None when the answer uses anything outside the supported subset."""
    s = _replace_frac_sqrt(s)
    if s is None:
        return None
    for command, text in _COMMANDS:
        s = s.replace(command, text)
    s = s.replace("{", "(").replace("}", ")").replace("^", "**")
    if "\\" in s or not _ALLOWED.fullmatch(s) or re.search(r"(?<!\d)\.|\.(?!\d)", s):
        return None
    if any(len(word) > 1 and word not in _FUNCTIONS for word in re.findall(r"[A-Za-z]+", s)):
        return None  # "Evelyn", "abc": words, not products of symbols
    return s


def _call_with_timeout(fn: Callable[[], T], seconds: float) -> T | None:
    """fn() or None after `seconds`. SIGALRM in the main thread; elsewhere a daemon thread that is left running."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):

        def on_alarm(signum, frame):  # noqa: ANN001, ARG001
            raise _Timeout

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn()
        except _Timeout:
            return None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    box: list[tuple[bool, object]] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:  # handed to the caller below, as the main-thread path would raise it
            box.append((False, exc))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if not box:
        return None
    ok, value = box[0]
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def _powers_are_small(expr) -> bool:  # noqa: ANN001 - a sympy expression
    import sympy

    for power in expr.atoms(sympy.Pow):
        exponent = power.exp
        if exponent.is_Number and abs(exponent) > _MAX_EXPONENT:
            return False
        if power.base.is_Number and exponent.has(sympy.Pow):
            return False  # 9**9**9 and the like
    return True


def sympy_equal(a: str, b: str, *, timeout: float = 5.0) -> bool:
    """Whether two normalised LaTeX answers are equal as expressions (simplify(a - b) == 0); False if undecided."""
    ta, tb = latex_to_sympy_text(a), latex_to_sympy_text(b)
    if ta is None or tb is None:
        return False
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    transformations = (*standard_transformations, implicit_multiplication_application, convert_xor)

    def decide() -> bool:
        import sympy

        ea = parse_expr(ta, transformations=transformations, evaluate=False)
        eb = parse_expr(tb, transformations=transformations, evaluate=False)
        if not (_powers_are_small(ea) and _powers_are_small(eb)):
            return False
        return bool(sympy.simplify(ea - eb) == 0)

    try:
        return bool(_call_with_timeout(decide, timeout))
    # sympy on arbitrary model text fails in many ways (SympifyError, TokenError, TypeError, PolynomialError, ...);
    # each means "sympy cannot decide", which the MATH checker scores as "not equal".
    except Exception:  # noqa: BLE001
        return False
