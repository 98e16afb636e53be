"""evalplus's sample format both ways (balora.eval.evalplus), checked against its documented schema.

evalplus is not installed here (its HumanEval+/MBPP+ data comes from the network at run time). Its reader
(`evalplus/evaluate.py`) takes `solution` as a self-contained program, else `prompt + completion`, with task ids
"HumanEval/N" and "Mbpp/N". So: every row balora writes has exactly `task_id` in that spelling and `solution`, and the
solution alone, with the benchmark's own test appended (what evalplus does with its base tests), passes or fails as
balora scored it; and evalplus's rows scored by `balora eval --samples` give the same verdicts.
"""

from __future__ import annotations

from pathlib import Path

from test_tasks import FIXTURE, read_jsonl, write_jsonl  # same folder: the humaneval fixture and JSONL helpers

from balora.eval.evalplus import EVALPLUS_SAMPLES_FILE, evalplus_task_id
from balora.eval.problems import load_problems
from balora.eval.tasks import score_samples


def _passes_alone(program: str, test: str, entry_point: str) -> bool:
    """Run a solution the way evalplus does with a base test (trusted fixture code only): the program by itself,
    then the test against its function."""
    namespace: dict = {}
    try:
        exec(compile(f"{program}\n\n{test}\n\ncheck({entry_point})\n", "<solution>", "exec"), namespace)  # noqa: S102
    except AssertionError:
        return False
    return True


def test_evalplus_task_ids():
    assert evalplus_task_id("humaneval", "HumanEval/7") == "HumanEval/7"
    assert evalplus_task_id("mbpp", "11") == "Mbpp/11"
    assert evalplus_task_id("mbpp", "Mbpp/11") == "Mbpp/11"
    assert evalplus_task_id("humaneval", "Fixture/0") == "Fixture/0"  # this file's fixture keeps its ids


def test_humaneval_completions_become_self_contained_solutions(tmp_path: Path):
    problems = load_problems("humaneval", FIXTURE)
    p0, p1, p2 = problems[:3]
    fenced = f"Sure:\n```python\n{p1.row['prompt']}{p1.row['canonical_solution']}```\nDone."
    samples = [
        {"task_id": p0.task_id, "completion": p0.row["canonical_solution"]},  # continues the prompt (base model)
        {"task_id": p1.task_id, "completion": fenced},  # the whole function in a fence (instruction model)
        {"task_id": p2.task_id, "completion": "    return None\n"},  # wrong
    ]
    out = tmp_path / "out"
    summary = score_samples("humaneval", write_jsonl(tmp_path / "s.jsonl", samples), data_file=FIXTURE, out_dir=out)
    verdicts = [r["correct"] for r in read_jsonl(out / "results.jsonl")]
    assert verdicts == [True, True, False] and summary["evalplus_samples_file"] == EVALPLUS_SAMPLES_FILE
    rows = read_jsonl(out / EVALPLUS_SAMPLES_FILE)
    assert [sorted(r) for r in rows] == [["solution", "task_id"]] * 3
    assert [r["task_id"] for r in rows] == [p.task_id for p in (p0, p1, p2)]  # "HumanEval/N" in the real file
    for row, problem, want in zip(rows, (p0, p1, p2), verdicts, strict=True):
        assert "```" not in row["solution"] and problem.row["test"] not in row["solution"]
        assert _passes_alone(row["solution"], problem.row["test"], problem.row["entry_point"]) == want

    # evalplus's rows, read back by `balora eval --samples`: the same verdicts
    again = score_samples("humaneval", out / EVALPLUS_SAMPLES_FILE, data_file=FIXTURE, out_dir=tmp_path / "again")
    assert [r["correct"] for r in read_jsonl(tmp_path / "again" / "results.jsonl")] == verdicts
    assert again["pass@1"] == summary["pass@1"]


def test_mbpp_evalplus_rows_both_ways(tmp_path: Path):
    problems = {p.task_id: p for p in load_problems("mbpp", limit=2)}
    code = problems["11"].row["code"].replace("\r\n", "\n")
    samples = [  # balora-style completions: a fenced answer with its own asserts, and a wrong one
        {"task_id": 11, "completion": f"```python\n{code}\nassert remove_Occ('hello','l') == 'heo'\n```"},
        {"task_id": 12, "completion": "def sort_matrix(m):\n    return m\n"},
    ]
    out = tmp_path / "out"
    score_samples("mbpp", write_jsonl(tmp_path / "s.jsonl", samples), out_dir=out)
    rows = read_jsonl(out / EVALPLUS_SAMPLES_FILE)
    assert [r["task_id"] for r in rows] == ["Mbpp/11", "Mbpp/12"]
    assert "assert" not in rows[0]["solution"] and code.strip() in rows[0]["solution"]

    evalplus_rows = [{"task_id": "Mbpp/11", "solution": code}, {"task_id": "Mbpp/12", "solution": rows[1]["solution"]}]
    score_samples("mbpp", write_jsonl(tmp_path / "e.jsonl", evalplus_rows), out_dir=tmp_path / "e")
    assert [r["correct"] for r in read_jsonl(tmp_path / "e" / "results.jsonl")] == [True, False]
