"""Entry points of `balora eval` for generation benchmarks: generate and score, or score completions made elsewhere.

Both write to `out_dir`, atomically (a temporary file renamed into place, so never half-written):
`results.jsonl`, one row per sample (task_id, index, sample, prompt, output, extracted answer or code, reference,
correct, and for code the sandbox status, reason and output tail), and `summary.json` (accuracy and/or pass@k,
counts, timings, settings). Task definitions, data loading and prompts live in `balora.eval.problems`.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from balora.eval.answers import extract_gsm8k_answer, extract_math_answer, gsm8k_correct, math_equal
from balora.eval.code import extract_code, humaneval_tested, mbpp_code, mbpp_tested, mean_pass_at_k
from balora.eval.evalplus import EVALPLUS_SAMPLES_FILE, evalplus_rows
from balora.eval.generate import Backend, generate
from balora.eval.problems import (
    TASKS,
    BenchmarkSpec,
    EvalTemplate,
    Problem,
    build_prompt,
    get_task,
    load_problems,
    stop_sequences,
)
from balora.eval.sandbox import FALLBACK_WARNING, Isolation, TestedProgram, isolation_in_use, run_many
from balora.io import DataError, read_rows, write_json_atomic, write_jsonl_atomic

__all__ = ["COMPLETIONS_FILE", "TASKS", "evaluate_generation", "load_problems", "score_samples", "write_completions"]


def evaluate_generation(
    model: Any,
    tokenizer: Any,
    task: str,
    *,
    out_dir: str | os.PathLike,
    data_file: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    template: EvalTemplate = "alpaca",
    n_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int = 0,
    backend: Backend = "hf",
    ks: Sequence[int] = (1, 10, 100),
    workers: int | None = None,
    timeout: float = 10.0,
    isolation: Isolation = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Generate completions for `task` (gsm8k, math, humaneval, mbpp; or perplexity) and score them.

    max_new_tokens defaults to the task's (512; 1024 for math). n_samples > 1 needs temperature > 0 and gives
    pass@k for every k in `ks` with k <= n_samples. workers, timeout and isolation configure the code sandbox
    (`balora.eval.sandbox`; "strict" refuses before generating when Linux namespaces are unavailable).
    The completions are written to out_dir/completions.jsonl before they are scored (re-score them with
    `score_samples`). Returns the summary written to out_dir/summary.json.
    """
    spec = get_task(task)
    if spec.kind == "perplexity":
        from balora.eval.perplexity import evaluate_perplexity

        return evaluate_perplexity(
            model, tokenizer, data_file, out_dir=out_dir, template=template, batch_size=batch_size, limit=limit,
            progress=progress,
        )  # fmt: skip
    sandbox = _sandbox_info(spec, isolation)  # before generating: "strict" must refuse before hours of generation
    start = time.monotonic()
    problems = load_problems(task, data_file, limit)
    prompts = [build_prompt(task, p, template=template, tokenizer=tokenizer) for p in problems]
    completions = generate(
        model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens or spec.max_new_tokens,
        stop=stop_sequences(task, template), n_samples=n_samples, temperature=temperature, top_p=top_p, seed=seed,
        add_special_tokens=template != "chat", backend=backend, progress=progress,
    )  # fmt: skip
    generation_s = time.monotonic() - start
    write_completions(Path(out_dir) / COMPLETIONS_FILE, problems, prompts, completions)
    settings = {
        "template": template,
        "max_new_tokens": max_new_tokens or spec.max_new_tokens,
        "n_samples": n_samples,
        "temperature": temperature,
        "top_p": top_p if temperature > 0 else None,
        "seed": seed,
        "backend": backend,
        "batch_size": batch_size,
        "limit": limit,
        "stop": stop_sequences(task, template),
    }
    return _score_and_write(
        spec, problems, prompts, completions, Path(out_dir), settings, generation_s, str(data_file or "default"),
        ks=ks, workers=workers, timeout=timeout, progress=progress, sandbox=sandbox, isolation=isolation,
    )  # fmt: skip


COMPLETIONS_FILE = "completions.jsonl"


def write_completions(
    path: Path, problems: list[Problem], prompts: list[str], completions: list[list[str]]
) -> None:
    """The generated completions, one row per sample (task_id, index, sample, prompt, completion), atomically:
    the input of `score_samples`, so that a failure while scoring never loses the generation."""
    rows = [
        {"task_id": p.task_id, "index": p.index, "sample": k, "prompt": prompt, "completion": completion}
        for p, prompt, outputs in zip(problems, prompts, completions, strict=True)
        for k, completion in enumerate(outputs)
    ]
    write_jsonl_atomic(path, rows)


def _sandbox_info(spec: BenchmarkSpec, isolation: Isolation) -> dict[str, Any] | None:
    """What the code sandbox will use, for the summary (None for answer tasks); raises IsolationUnavailable early."""
    if spec.kind != "code":
        return None
    found = isolation_in_use(isolation)
    info: dict[str, Any] = {"isolation": "namespaces" if found.available else "guards only", "detail": found.detail}
    if not found.available:
        info["warning"] = FALLBACK_WARNING.format(reason=found.detail)
    return info


def _problem_for(row: dict[str, Any], by_id: dict[str, Problem], problems: list[Problem], where: str) -> Problem:
    if "task_id" in row:
        key = str(row["task_id"])
        if key not in by_id and "/" in key:  # "Mbpp/11", "MBPP/11" as evalplus writes them
            key = key.rsplit("/", 1)[1]
        if key not in by_id:
            examples = ", ".join(repr(p.task_id) for p in problems[:3])
            raise DataError(f"{where}: task_id {row['task_id']!r} is not a problem of this task (ids: {examples})")
        return by_id[key]
    if "index" in row:
        index = row["index"]
        if not isinstance(index, int) or not 0 <= index < len(problems):
            raise DataError(f"{where}: index {index!r} is not a problem index (0..{len(problems) - 1})")
        return problems[index]
    raise DataError(f"{where}: a sample row needs `task_id` or `index` (the problem's 0-based position)")


def score_samples(
    task: str,
    samples_file: str | os.PathLike,
    *,
    out_dir: str | os.PathLike,
    data_file: str | os.PathLike | None = None,
    ks: Sequence[int] = (1, 10, 100),
    workers: int | None = None,
    timeout: float = 10.0,
    isolation: Isolation = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Score completions made elsewhere (no model is loaded), as human-eval's and evalplus's scripts do.

    `samples_file` is JSONL with `completion` (or evalplus's `solution`) and `task_id` (or `index`) per row;
    evalplus's ids ("Mbpp/11") are read too. Several rows for one problem are its n samples (pass@k). Only
    problems that have samples are scored; the summary counts the others.
    """
    spec = get_task(task)
    if spec.kind == "perplexity":
        raise ValueError("the perplexity task scores a model, not samples; use evaluate_generation")
    sandbox = _sandbox_info(spec, isolation)
    start = time.monotonic()
    problems = load_problems(task, data_file)
    by_id = {p.task_id: p for p in problems}
    grouped: dict[int, list[str]] = {}
    prompts: dict[int, str] = {}
    for line, row in read_rows(samples_file):
        where = f"{samples_file}:{line}"
        text = row.get("completion", row.get("solution"))  # evalplus writes `solution` (a whole program)
        if text is None:
            raise DataError(f"{where}: a sample row needs `completion` (the model's output) or evalplus's "
                            f"`solution`; it has {sorted(row)}")
        problem = _problem_for(row, by_id, problems, where)
        grouped.setdefault(problem.index, []).append(str(text))
        prompts.setdefault(problem.index, str(row.get("prompt", "")))
    chosen = [p for p in problems if p.index in grouped]
    summary = _score_and_write(
        spec, chosen, [prompts[p.index] for p in chosen], [grouped[p.index] for p in chosen], Path(out_dir),
        {"samples_file": str(samples_file)}, 0.0, str(data_file or "default"), ks=ks, workers=workers,
        timeout=timeout, progress=progress, sandbox=sandbox, isolation=isolation,
    )  # fmt: skip
    summary["n_problems_without_samples"] = len(problems) - len(chosen)
    summary["total_s"] = time.monotonic() - start
    write_json_atomic(Path(out_dir) / "summary.json", summary)
    return summary


def _score_answer(spec: BenchmarkSpec, problem: Problem, output: str) -> dict[str, Any]:
    if spec.name == "gsm8k":
        extracted = extract_gsm8k_answer(output)
        correct = extracted is not None and gsm8k_correct(output, problem.reference or "")
        return {"extracted": extracted, "reference": extract_gsm8k_answer(problem.reference or ""), "correct": correct}
    extracted = extract_math_answer(output)
    correct = math_equal(extracted, problem.reference)
    return {"extracted": extracted, "reference": problem.reference, "correct": correct}


def _score_answers(spec: BenchmarkSpec, problems: list[Problem], samples: list[list[str]]) -> list[dict[str, Any]]:
    """One row per sample; any exception while extracting or comparing marks that sample wrong, with the reason."""
    rows = []
    for problem, outputs in zip(problems, samples, strict=True):
        for output in outputs:
            try:
                rows.append(_score_answer(spec, problem, output) | {"scoring_error": None})
            except Exception as exc:  # noqa: BLE001 - recorded per sample; one odd output must not abort the run
                reason = f"{type(exc).__name__}: {exc}"[:500]
                rows.append({"extracted": None, "reference": problem.reference, "correct": False,
                             "scoring_error": reason})  # fmt: skip
    return rows


def _score_code(
    spec: BenchmarkSpec,
    problems: list[Problem],
    samples: list[list[str]],
    workers: int | None,
    timeout: float,
    isolation: Isolation,
    progress: bool,
) -> list[dict[str, Any]]:
    programs: list[TestedProgram | None] = []
    extracted: list[str] = []
    errors: list[str | None] = []
    for problem, outputs in zip(problems, samples, strict=True):
        for output in outputs:
            code, program, error = "", None, None
            try:
                if spec.name == "humaneval":
                    code = extract_code(output, entry_point=problem.row["entry_point"])
                    program = humaneval_tested(problem.row, output)
                else:
                    code = mbpp_code(output)
                    program = mbpp_tested(problem.row, code)
            except Exception as exc:  # noqa: BLE001 - recorded per sample
                error = f"could not build the test program: {type(exc).__name__}: {exc}"[:500]
            extracted.append(code)
            programs.append(program)
            errors.append(error)
    desc = f"running {spec.name} tests"
    runnable = [p for p in programs if p is not None]
    results = iter(run_many(runnable, workers=workers, progress=progress, desc=desc, timeout=timeout,
                            isolation=isolation))  # fmt: skip
    rows = []
    for code, program, error in zip(extracted, programs, errors, strict=True):
        if program is None:
            rows.append({"extracted": code, "correct": False, "status": "error", "reason": error, "output_tail": ""})
            continue
        r = next(results)
        rows.append({"extracted": code, "correct": r.passed, "status": r.status, "reason": r.reason,
                     "output_tail": r.output_tail})  # fmt: skip
    return rows


def _score_and_write(
    spec: BenchmarkSpec,
    problems: list[Problem],
    prompts: list[str],
    samples: list[list[str]],
    out_dir: Path,
    settings: dict[str, Any],
    generation_s: float,
    data: str,
    *,
    ks: Sequence[int],
    workers: int | None,
    timeout: float,
    progress: bool,
    sandbox: dict[str, Any] | None,
    isolation: Isolation,
) -> dict[str, Any]:
    start = time.monotonic()
    if spec.kind == "answer":
        scored = _score_answers(spec, problems, samples)
    else:
        scored = _score_code(spec, problems, samples, workers, timeout, isolation, progress)
    rows, c, position = [], [], 0
    for problem, prompt, outputs in zip(problems, prompts, samples, strict=True):
        c.append(0)
        for k, output in enumerate(outputs):
            rows.append(
                {"task_id": problem.task_id, "index": problem.index, "sample": k, "prompt": prompt, "output": output}
                | scored[position]
            )
            c[-1] += bool(scored[position]["correct"])
            position += 1
    n = [len(s) for s in samples]
    summary: dict[str, Any] = {"task": spec.name, "n_problems": len(problems), "n_samples": len(rows)}
    summary["samples_per_problem"] = min(n) if n and min(n) == max(n) else n
    summary["n_correct"] = sum(c)
    if spec.kind == "answer":
        summary["accuracy"] = sum(c) / max(len(rows), 1)
        summary["n_no_answer"] = sum(r["extracted"] is None for r in rows)
        summary["n_scoring_errors"] = sum(r["scoring_error"] is not None for r in rows)
    else:
        summary["status_counts"] = dict(Counter(r["status"] for r in rows))
        summary["sandbox"] = sandbox
    if problems and (spec.kind == "code" or max(n) > 1):
        summary |= {f"pass@{k}": mean_pass_at_k(n, c, k) for k in sorted(set(ks) | {1}) if k <= min(n)}
    summary |= {"generation_s": generation_s, "scoring_s": time.monotonic() - start, "data": data}
    summary |= {"settings": settings, "results_file": "results.jsonl"}
    summary["total_s"] = generation_s + summary["scoring_s"]
    if spec.kind == "code":  # the same programs as evalplus reads them (balora.eval.evalplus)
        write_jsonl_atomic(out_dir / EVALPLUS_SAMPLES_FILE, evalplus_rows(spec.name, problems, samples))
        summary["evalplus_samples_file"] = EVALPLUS_SAMPLES_FILE
    write_jsonl_atomic(out_dir / "results.jsonl", rows)
    write_json_atomic(out_dir / "summary.json", summary)
    return summary
