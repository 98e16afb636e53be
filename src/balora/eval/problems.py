"""The generation benchmarks: where their data comes from, how rows are checked, and the prompt each model sees.

gsm8k (Cobbe et al., 2021) and math (Hendrycks et al., 2021; the full MATH test set or MATH-500) are scored on the
final answer; humaneval (Chen et al., 2021) and mbpp (Austin et al., 2021; test split, task_id 11-510) by running
the code against the tests in the sandbox. Bundled copies under `data/` are used when no file is given; otherwise
the hub (`datasets.load_dataset`) when online.

Prompts. "alpaca" (default; the template BA-LoRA/PiSSA fine-tune with): the problem is the instruction; for math
the response starts with "Let's think step by step." as in the BA-LoRA evaluation script. "chat": the tokenizer's
chat template. "plain": no template (base models): "Question: ... Answer:" for math, the bare HumanEval prompt
(continued by the model, as in the Codex paper), the MBPP paper's prompt for MBPP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from balora.data.templates import render_prompt
from balora.eval.answers import extract_math_answer
from balora.eval.code import mbpp_prompt
from balora.io import REPO_ROOT, DataError, read_rows, read_text, require_fields

TaskName = Literal["gsm8k", "math", "humaneval", "mbpp", "perplexity"]
EvalTemplate = Literal["alpaca", "chat", "plain"]  # the training templates, or none ("plain")
Kind = Literal["answer", "code", "perplexity"]

DATA_DIR = REPO_ROOT / "data"
MATH_TRIGGER = "Let's think step by step."
HUMANEVAL_INSTRUCTION = "Create a Python script for this problem:\n{prompt}"
MBPP_TEST_IDS = range(11, 511)


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark: kind of scoring, required fields, bundled file, hub location, default generation length."""

    name: TaskName
    kind: Kind
    fields: tuple[str, ...]
    bundled: str | None  # relative to DATA_DIR
    hub: tuple[str, str | None, str] | None  # (dataset, config, split)
    max_new_tokens: int


TASKS: dict[str, BenchmarkSpec] = {
    "gsm8k": BenchmarkSpec(
        "gsm8k", "answer", ("question", "answer"), "gsm8k/test.jsonl", ("openai/gsm8k", "main", "test"), 512
    ),
    "math": BenchmarkSpec(
        "math", "answer", ("problem",), "math500/test.jsonl", ("HuggingFaceH4/MATH-500", None, "test"), 1024
    ),
    "humaneval": BenchmarkSpec(
        "humaneval", "code", ("task_id", "prompt", "test", "entry_point"), "humaneval/HumanEval.jsonl",
        ("openai/openai_humaneval", None, "test"), 512,
    ),
    "mbpp": BenchmarkSpec(
        "mbpp", "code", ("task_id", "text", "code", "test_list"), "mbpp/mbpp.jsonl",
        ("google-research-datasets/mbpp", "full", "test"), 512,
    ),
    "perplexity": BenchmarkSpec("perplexity", "perplexity", (), None, None, 0),
}  # fmt: skip


@dataclass(frozen=True)
class Problem:
    """One benchmark item: its id (the row's `task_id`/`unique_id`, else its index), the row, and the reference."""

    task_id: str
    index: int
    row: dict[str, Any]
    reference: str | None  # the answer for answer tasks; None for code tasks (the tests are in the row)


def get_task(name: str) -> BenchmarkSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def _hub_rows(spec: BenchmarkSpec) -> list[tuple[int, dict[str, Any]]]:
    assert spec.hub is not None
    dataset, config, split = spec.hub
    try:
        import datasets

        data = datasets.load_dataset(dataset, config, split=split)
    except (OSError, ConnectionError, ValueError) as exc:
        raise DataError(
            f"no local data for task {spec.name!r} and loading {dataset!r} from the Hugging Face hub failed ({exc}); "
            f"pass data_file=PATH (JSONL with fields {list(spec.fields)}) or run where the hub is reachable"
        ) from exc
    return [(i, dict(row)) for i, row in enumerate(data, start=1)]


def _math_directory_rows(folder: Path) -> list[tuple[int, dict[str, Any]]]:
    """The original MATH release: one JSON object per problem under test/<subject>/<n>.json."""
    files = sorted(folder.rglob("*.json"), key=lambda p: (str(p.parent), int(p.stem) if p.stem.isdigit() else 0))
    if not files:
        raise DataError(f"{folder} holds no *.json problem files; expected the MATH test/ directory")
    rows = []
    for path in files:
        row = _single_object(path)
        row.setdefault("unique_id", str(path.relative_to(folder.parent)))
        rows.append((len(rows) + 1, row))
    return rows


def _single_object(path: Path) -> dict[str, Any]:
    import json

    try:
        row = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(row, dict):
        raise DataError(f"{path}: expected one JSON object (a MATH problem), got {type(row).__name__}")
    return row


def _source(spec: BenchmarkSpec, data_file: str | os.PathLike | None) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    if data_file is not None:
        path = Path(data_file)
        if spec.name == "math" and path.is_dir():
            return str(path), _math_directory_rows(path)
        return str(path), read_rows(path)
    if spec.bundled is not None:
        bundled = DATA_DIR / spec.bundled
        for candidate in (bundled, bundled.with_name(bundled.name + ".gz")):
            if candidate.is_file():
                return str(candidate), read_rows(candidate)
    if spec.hub is None:
        raise DataError(f"task {spec.name!r} needs data_file=PATH (a .txt, .json or .jsonl file)")
    return f"hub:{spec.hub[0]}", _hub_rows(spec)


def load_problems(task: str, data_file: str | os.PathLike | None = None, limit: int | None = None) -> list[Problem]:
    """The task's problems from `data_file`, else the bundled copy, else the hub; the first `limit` if given.

    Every row is checked for the task's fields; an error names the file and line. MBPP keeps the test split
    (task_id 11-510) of whatever file it reads.
    """
    spec = get_task(task)
    if spec.kind == "perplexity":
        raise ValueError("the perplexity task has no problems; use balora.eval.perplexity.evaluate_perplexity")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 (or None for all problems), got {limit!r}")
    where, rows = _source(spec, data_file)
    problems = []
    for line, row in rows:
        require_fields(row, spec.fields, where, line, spec.name)
        if spec.name == "mbpp" and int(row["task_id"]) not in MBPP_TEST_IDS:
            continue
        reference = None
        if spec.name == "gsm8k":
            reference = str(row["answer"])
        elif spec.name == "math":
            reference = row.get("answer") or extract_math_answer(str(row.get("solution", "")))
            if not reference:
                raise DataError(f"{where}:{line}: math row has no `answer` and no \\boxed{{}} answer in `solution`")
        task_id = row.get("task_id", row.get("unique_id", len(problems)))
        problems.append(Problem(str(task_id), len(problems), row, reference))
    if not problems:
        raise DataError(f"{where}: no {spec.name} problems found (for mbpp: no row with task_id in 11-510)")
    return problems[:limit]


def build_prompt(task: str, problem: Problem, *, template: EvalTemplate = "alpaca", tokenizer: Any = None) -> str:
    """The text the model continues for this problem (see the module docstring for each template)."""
    row = problem.row
    if task in ("gsm8k", "math"):
        question = str(row["question"] if task == "gsm8k" else row["problem"])
        if template == "plain":
            return f"Question: {question}\nAnswer: {MATH_TRIGGER}"
        prompt = render_prompt(question, template=template, tokenizer=tokenizer)
        return prompt + (" " if template == "alpaca" else "") + MATH_TRIGGER
    if task == "humaneval":
        if template == "plain":
            return str(row["prompt"])
        instruction = HUMANEVAL_INSTRUCTION.format(prompt=row["prompt"])
        return render_prompt(instruction, template=template, tokenizer=tokenizer)
    if task == "mbpp":
        if template == "plain":
            return mbpp_prompt(row) + "\n"
        return render_prompt(mbpp_prompt(row), template=template, tokenizer=tokenizer)
    raise ValueError(f"task {task!r} has no prompt; choose one of gsm8k, math, humaneval, mbpp")


def stop_sequences(task: str, template: EvalTemplate) -> list[str]:
    """Strings that end a completion (besides EOS): the next Alpaca section, or the Codex stops for plain code."""
    if template == "alpaca":
        return ["### Instruction", "### Response", "### Input"]
    if template == "plain":
        if task == "humaneval":
            return ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # Codex paper, Section 2.2
        if task == "mbpp":
            return ["\nassert", "[DONE]", "\n\n\n"]
        return ["\nQuestion:", "\n\n\n"]
    return []
