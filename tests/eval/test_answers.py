"""GSM8K and MATH answer checking on tables of realistic model outputs with their expected verdicts."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from balora.eval.answers import (
    extract_gsm8k_answer,
    extract_math_answer,
    gsm8k_correct,
    last_boxed,
    math_equal,
    normalize_math_answer,
)
from balora.eval.math_sympy import _call_with_timeout, latex_to_sympy_text

DATA = Path(__file__).resolve().parents[2] / "data"

GSM8K_CASES = [
    # (model output, reference, expected verdict)
    ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day.\n#### 18", "#### 18", True),
    ("She makes 9 * 2 = 18 dollars.\nThe answer is: 18", "#### 18", True),
    ("So the total is $1,234.\nThe answer is $1,234.", "#### 1234", True),
    ("The final answer is 1,234,567", "#### 1234567", True),
    ("It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total is 2+1=<<2+1=3>>3 bolts", "#### 3", True),
    ("He spent $18.00 in total.", "#### 18", True),
    ("The answer is 18.", "#### 18", True),
    ("The answer is: -3", "#### -3", True),
    ("The temperature dropped to \u22125 degrees.", "#### -5", True),
    ("That is 0.5 of the cake. The answer is 0.5", "#### 0.5", True),
    ("The answer is 3/4", "#### 0.75", True),
    ("She saved 25% of her money, that is $40.\nThe answer is 40 dollars", "#### 40", True),
    ("Therefore the answer is \\boxed{42}.", "#### 42", True),
    ("So 5 + 7 = 12 apples, then 12 * 3 = 36 apples.", "#### 36", True),  # last-number fallback
    ("The answer is 12. Then I double check: 12 * 2 = 24", "#### 12", True),  # "The answer is" beats last number
    ("#### 18\nThe next question: 7 + 7 = 14", "#### 18", True),  # "####" beats everything
    ("She makes 9 * 2 = 18 dollars.\nThe answer is: 17", "#### 18", False),
    ("I cannot solve this problem.", "#### 18", False),
    ("The answer is 180", "#### 18", False),
    ("The answer is 1.8", "#### 18", False),
    ("The answer is 18", "#### 1,800", False),
    ("1,2,3 are the first numbers; the answer is 123", "#### 123", True),
]


@pytest.mark.parametrize(("output", "reference", "expected"), GSM8K_CASES)
def test_gsm8k_verdicts(output: str, reference: str, expected: bool):
    assert gsm8k_correct(output, reference) is expected


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("#### 1,000", "1000"),
        ("The answer is $2.50.", "2.5"),
        ("The answer is: 7/2", "3.5"),
        ("The answer is 1/3", "1/3"),
        ("no digits here", None),
        ("costs $ 5", "5"),
        ("So the answer is 4 + 1 = 5", "5"),  # an equation after the marker counts by its result
        ("#### 3 * 4 = 12", "12"),
        ("The answer is 5 apples, which is 2 more than 3.", "5"),
        ("The answer is 6.\nCheck: 2 + 4 = 6 = 7 - 1", "6"),  # an equation on a later line is not the answer
    ],
)
def test_extract_gsm8k_answer(text: str, answer: str | None):
    assert extract_gsm8k_answer(text) == answer


def test_gsm8k_references_score_100_percent_against_themselves():
    rows = [json.loads(line) for line in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 1319
    assert all(gsm8k_correct(row["answer"], row["answer"]) for row in rows)


def test_gsm8k_reference_without_number_is_an_error():
    with pytest.raises(ValueError, match="no number"):
        gsm8k_correct("The answer is 3", "#### none")


MATH_CASES = [
    # (model output, reference answer, expected verdict)
    (
        "So the polar coordinates are $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
        "\\left( 3, \\frac{\\pi}{2} \\right)",
        True,
    ),
    ("Thus $\\boxed{(3,\\frac{\\pi}{2})}$", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("The probability is $\\boxed{\\dfrac{1}{2}}$.", "\\frac{1}{2}", True),
    ("The probability is $\\boxed{\\tfrac12}$.", "\\frac{1}{2}", True),
    ("The probability is $\\boxed{0.5}$.", "\\frac{1}{2}", True),
    ("The probability is $\\boxed{1/2}$.", "\\frac{1}{2}", True),
    ("The answer is: \\frac{3}{4}", "0.75", True),
    ("The answer is 10.", "10", True),
    ("The answer is $10$. I hope it is correct.", "10", True),
    ("The side is $\\boxed{5\\text{ cm}}$.", "5", True),
    ("The angle is $\\boxed{90^\\circ}$.", "90", True),
    ("She pays $\\boxed{\\$18.90}$.", "18.90", True),
    ("The percentage is $\\boxed{25\\%}$.", "25", True),
    ("We get $\\boxed{x = 5}$.", "5", True),
    ("$\\boxed{2\\sqrt3}$", "2\\sqrt{3}", True),
    ("$\\boxed{\\frac{\\sqrt{2}}{2}}$", "\\frac{1}{\\sqrt{2}}", True),  # sympy decides
    ("$\\boxed{2\\sqrt{3}}$", "\\sqrt{12}", True),  # sympy decides
    ("$\\boxed{x^2+2x+1}$", "(x+1)^2", True),  # sympy decides
    ("$\\boxed{\\frac{a}{b}\\cdot b}$", "a", True),  # sympy decides
    ("$\\boxed{\\frac{\\frac{1}{2}}{3}}$", "\\frac{1}{6}", True),  # nested braces
    ("$\\boxed{1,000}$", "1000", True),
    ("$\\boxed{[2, 5)}$", "[2,5)", True),
    ("$\\boxed{\\text{(C)}}$", "\\text{(C)}", True),
    ("$\\boxed{\\text{Evelyn}}$", "\\text{Evelyn}", True),
    ("$\\boxed{  10  }$.", "10", True),
    ("$\\boxed{3}$", "4", False),
    ("$\\boxed{(2,5)}$", "[2,5)", False),  # open vs half-open interval
    ("$\\boxed{(3, 2)}$", "(2, 3)", False),  # order matters
    ("$\\boxed{\\pi}$", "3.14", False),
    ("$\\boxed{\\frac{1}{3}}$", "0.33", False),
    ("$\\boxed{x^2}$", "x^3", False),
    ("$\\boxed{\\text{Evelyn}}$", "\\text{Bob}", False),
    ("I am not sure.", "5", False),
    ("$\\boxed{9^{9^{9}}}$", "1", False),  # refused before sympy tries to compute it
]


@pytest.mark.parametrize(("output", "reference", "expected"), MATH_CASES)
def test_math_verdicts(output: str, reference: str, expected: bool):
    assert math_equal(extract_math_answer(output), reference) is expected


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        ("a \\boxed{1} then \\boxed{\\frac{2}{3}}", "\\frac{2}{3}"),
        ("\\boxed{\\left\\{ 1, \\{2\\} \\right\\}}", "\\left\\{ 1, \\{2\\} \\right\\}"),
        ("\\fbox{7}", "7"),
        ("so it is \\boxed 5$.", "5"),
        ("truncated \\boxed{\\frac{1}{2", None),
        ("nothing", None),
    ],
)
def test_last_boxed(text: str, boxed: str | None):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\frac12", "\\frac{1}{2}"),
        ("\\frac1{72}", "\\frac{1}{72}"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("5\\text{ inches}", "5"),
        ("10\\%", "10"),
        ("0.5", "\\frac{1}{2}"),
        ("3/4", "\\frac{3}{4}"),
        (".5x", "0.5x"),
        ("k = 7.", "7"),
        ("$\\$ 4$", "4"),
        ("1,234", "1234"),
    ],
)
def test_normalize_math_answer(raw: str, normal: str):
    assert normalize_math_answer(raw) == normal


def test_math500_solutions_match_their_answers():
    rows = [json.loads(line) for line in (DATA / "math500" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 500
    assert all(math_equal(extract_math_answer(r["solution"]), r["answer"]) for r in rows)


@pytest.mark.parametrize(
    "hostile",
    ["__import__('os').system('true')", "x.__class__", "open('f')", "eval('1')", "a.b", "'1'", "x[0]", "lambda: 1"],
)
def test_sympy_text_refuses_code(hostile: str):
    assert latex_to_sympy_text(hostile) is None


def test_timeout_interrupts_a_slow_check_in_the_main_thread_and_in_workers():
    def spin() -> bool:
        while True:
            pass

    start = time.monotonic()
    assert _call_with_timeout(spin, 0.3) is None
    assert time.monotonic() - start < 3
    answers: list[object] = []
    worker = threading.Thread(target=lambda: answers.append(_call_with_timeout(lambda: time.sleep(30), 0.3)))
    worker.start()
    worker.join(5)
    assert answers == [None]
    assert _call_with_timeout(lambda: 7, 1.0) == 7


def test_math_equal_is_fast_on_a_hard_pair():
    start = time.monotonic()
    assert math_equal("(x+1)^{20}", "(x+1)^{20}+0") is True
    assert math_equal("(x+1)^{20}", "(x+2)^{20}", timeout=1.0) is False
    assert time.monotonic() - start < 10
