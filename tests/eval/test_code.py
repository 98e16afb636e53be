"""Code extraction, HumanEval/MBPP program building (run in the sandbox) and the pass@k estimator."""

from __future__ import annotations

import itertools
import json
from math import comb
from pathlib import Path

import numpy as np
import pytest

from balora.eval.code import (
    extract_code,
    humaneval_program,
    humaneval_tested,
    mbpp_prompt,
    mean_pass_at_k,
    pass_at_k,
)
from balora.eval.sandbox import run_many

FIXTURE = Path(__file__).with_name("humaneval_fixture.jsonl")


def fixture_problems() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines()]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("def f():\n    return 1\n", "def f():\n    return 1\n"),
        ("Here is the code:\n```python\ndef f():\n    return 1\n```\nIt returns 1.", "def f():\n    return 1\n"),
        ("```\nx = 1\n```", "x = 1\n"),
        ("```py\nx = 1\n```", "x = 1\n"),
        ("```python\ndef f():\n    return 1\n", "def f():\n    return 1\n"),  # cut off by max_new_tokens
        (
            "```python\ndef f():\n    return 1\n\nif __name__ == '__main__':\n    print(f())\n```",
            "def f():\n    return 1\n",
        ),
        ("```bash\npip install x\n```\n```python\ny = 2\n```", "y = 2\n"),
        ("```python\r\nx = 1\r\n```", "x = 1\n"),
    ],
)
def test_extract_code(completion: str, expected: str):
    assert extract_code(completion) == expected


def test_extract_code_prefers_the_block_defining_the_entry_point():
    completion = "```python\nimport math\n```\nThen:\n```python\ndef area(r):\n    return math.pi * r * r\n```"
    assert extract_code(completion, entry_point="area").startswith("def area(r):")
    assert extract_code(completion).startswith("import math")


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    problems = fixture_problems()
    wrong_body = "    return None\n"
    for build in (humaneval_program, humaneval_tested):  # one process, and the checker layout that is scored
        programs = [build(p, p["canonical_solution"]) for p in problems] + [build(p, wrong_body) for p in problems]
        results = run_many(programs, workers=2, progress=False)
        assert [r.passed for r in results] == [True] * len(problems) + [False] * len(problems)
        assert all(r.status == "failed" for r in results[len(problems) :])


def test_humaneval_tested_splits_the_program():
    problem = fixture_problems()[0]
    tested = humaneval_tested(problem, problem["canonical_solution"])
    whole = humaneval_program(problem, problem["canonical_solution"])
    assert whole == tested.solution[:-1] + "\n\n" + tested.tests  # the same code, cut before the tests
    assert (tested.setup, tested.replace) == (problem["prompt"], (problem["entry_point"],))


def test_humaneval_whole_function_in_a_fenced_block():
    problem = fixture_problems()[1]  # running_max: the prompt imports List
    completion = (
        "Sure! Here is the function:\n\n```python\ndef running_max(values: List[int]) -> List[int]:\n"
        "    best = None\n    out = []\n    for v in values:\n        best = v if best is None else max(best, v)\n"
        "        out.append(best)\n    return out\n```\nThis keeps the maximum so far."
    )
    program = humaneval_program(problem, completion)
    assert program.startswith(problem["prompt"])  # the prompt's imports are kept
    assert [r.passed for r in run_many([program, humaneval_tested(problem, completion)], progress=False)] == [True] * 2


def test_humaneval_early_exit_in_completion_is_not_a_pass():
    problem = fixture_problems()[0]
    results = run_many(
        [build(problem, body) for build in (humaneval_program, humaneval_tested)
         for body in ("    import sys\n    sys.exit(0)\n", "    exit()\n")],
        progress=False,
    )  # fmt: skip
    assert [r.status for r in results] == ["failed"] * 4


def test_mbpp_prompt_shows_the_tests():
    row = {"text": "Write a function to add.", "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]}
    assert mbpp_prompt(row) == (
        "You are an expert Python programmer, and here is your task: Write a function to add. "
        "Your code should pass these tests:\n\nassert add(1, 2) == 3\nassert add(0, 0) == 0"
    )


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that a random k-subset of n samples (c correct) holds a correct one, by enumeration."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(samples[i] for i in subset) for subset in subsets)
    return np.float64(hits) / np.float64(len(subsets))


@pytest.mark.parametrize(
    ("n", "c", "k"), [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (6, 1, 5), (8, 3, 4), (10, 0, 10)]
)
def test_pass_at_k_matches_brute_force(n: int, c: int, k: int):
    assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), rel=1e-12, abs=1e-15)


def test_pass_at_k_large_n_is_stable():
    # 1 - C(n-c, k) / C(n, k) with exact integers, against the product form, where the binomials overflow floats.
    n, c, k = 200, 3, 100
    exact = 1 - comb(n - c, k) / comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert mean_pass_at_k([4, 4], [1, 4], 1) == pytest.approx((0.25 + 1.0) / 2)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_rejects_impossible_counts(n: int, c: int, k: int):
    with pytest.raises(ValueError, match="pass_at_k needs"):
        pass_at_k(n, c, k)
