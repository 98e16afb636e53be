"""Code-generation tasks: extracting code from a completion, building HumanEval and MBPP programs, pass@k.

HumanEval (Chen et al., 2021, arXiv 2107.03374): the program is `prompt + completion + test + check(entry_point)`,
and pass@k is the unbiased estimator of Section 2.1. MBPP (Austin et al., 2021, arXiv 2108.07732): the program is
`test_setup_code + code + test_list`; the prompt shows the task and its three tests (Section 2.1 of the paper).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from balora.eval.sandbox import TestedProgram

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.DOTALL)
_PYTHON_TAGS = {"", "python", "py", "python3", "py3"}
_MAIN_GUARD = re.compile(r"^if\s+__name__\s*==\s*['\"]__main__['\"]\s*:", re.MULTILINE)

MBPP_PROMPT = (
    "You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:\n\n{tests}"
)


def extract_code(completion: str, *, entry_point: str | None = None) -> str:
    """The Python code in a completion.

    With Markdown fences, the first ```python (or untagged) block that defines `entry_point` (if given), else the
    first such block; a block cut off by the token limit runs to the end of the text. Without fences, the completion
    itself. A top-level `if __name__ == "__main__":` block (example usage) and what follows it are dropped.
    """
    text = completion.replace("\r\n", "\n")
    blocks = [m.group(2) for m in _FENCE.finditer(text) if m.group(1).lower() in _PYTHON_TAGS]
    if blocks:
        defining = [b for b in blocks if entry_point and defines_function(b, entry_point)]
        code = (defining or blocks)[0]
    else:
        code = text
    main_guard = _MAIN_GUARD.search(code)
    if main_guard:
        code = code[: main_guard.start()]
    return code.rstrip() + "\n"


def defines_function(code: str, name: str) -> bool:
    """Whether `code` has a top-level `def name(`."""
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def humaneval_program(problem: Mapping[str, Any], completion: str) -> str:
    """The HumanEval test program for one completion.

    A completion that continues the prompt (the function body, as base models write it) is appended to the prompt,
    as in the official harness. A completion that writes the whole function (as instruction-tuned models do, usually
    in a fenced block) is appended after the prompt, so the prompt's imports stay and its definition is replaced.
    """
    entry_point = problem["entry_point"]
    code = extract_code(completion, entry_point=entry_point)
    if defines_function(code, entry_point):
        body = problem["prompt"] + "\n    pass\n\n" + code
    else:
        body = problem["prompt"] + code
    return f"{body}\n\n{problem['test']}\n\ncheck({entry_point})\n"


def humaneval_tested(problem: Mapping[str, Any], completion: str) -> TestedProgram:
    """HumanEval's program split for the sandbox's checker: the solution (prompt and completion, joined as in
    `humaneval_program`) runs sandboxed; the prompt (trusted helpers), `test` and `check(entry_point)` run in the
    checker, with the entry point bound to the solution's function."""
    entry_point = problem["entry_point"]
    program = humaneval_program(problem, completion)
    solution = program[: program.rindex(f"\n\n{problem['test']}")]
    tests = f"{problem['test']}\n\ncheck({entry_point})\n"
    return TestedProgram(solution + "\n", tests, setup=problem["prompt"], replace=(entry_point,))


def mbpp_code(completion: str) -> str:
    """The candidate's code without its own top-level asserts (the benchmark's tests are appended instead)."""
    return re.sub(r"^assert\b.*$", "", extract_code(completion), flags=re.MULTILINE)


def mbpp_tested(problem: Mapping[str, Any], code: str, *, challenge: bool = False) -> TestedProgram:
    """MBPP's program split for the sandbox's checker: the candidate code runs sandboxed; `test_setup_code` and the
    `test_list` asserts run in the checker."""
    tests = list(problem["test_list"]) + (list(problem.get("challenge_test_list") or []) if challenge else [])
    return TestedProgram(code, "\n".join(tests) + "\n", setup=problem.get("test_setup_code") or "")


def mbpp_program(problem: Mapping[str, Any], code: str, *, challenge: bool = False) -> str:
    """`test_setup_code`, the candidate code and the `test_list` asserts (plus `challenge_test_list` if asked)."""
    tests = list(problem["test_list"]) + (list(problem.get("challenge_test_list") or []) if challenge else [])
    setup = problem.get("test_setup_code") or ""
    return f"{setup}\n{code}\n\n" + "\n".join(tests) + "\n"


def mbpp_prompt(problem: Mapping[str, Any]) -> str:
    """The MBPP paper's prompt: the task text followed by its three test asserts."""
    return MBPP_PROMPT.format(text=problem["text"].strip(), tests="\n".join(problem["test_list"]))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), the numerically stable form of the HumanEval paper (Fig. 3).
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n!r}, c={c!r}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n (k samples drawn from n), got n={n!r}, k={k!r}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int], k: int) -> float:
    """Mean pass@k over problems (each with its own number of samples and of correct ones)."""
    if len(num_samples) != len(num_correct):
        raise ValueError(f"got {len(num_samples)} sample counts but {len(num_correct)} correct counts")
    if not num_samples:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return float(np.mean([pass_at_k(n, c, k) for n, c in zip(num_samples, num_correct, strict=True)]))
