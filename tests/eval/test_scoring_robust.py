"""Scoring never aborts an evaluation: odd answers, exceptions, crashed sandboxes, hostile samples, no namespaces."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest
from tiny_lm import tiny_causal_lm, tiny_tokenizer

from balora.cli import main
from balora.eval import isolation as isolation_module
from balora.eval import sandbox as sandbox_module
from balora.eval import tasks as tasks_module
from balora.eval.answers import extract_gsm8k_answer
from balora.eval.isolation import IsolationUnavailable, Probe
from balora.eval.problems import load_problems
from balora.eval.sandbox import run_many
from balora.eval.tasks import COMPLETIONS_FILE, evaluate_generation, score_samples


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_division_by_zero_and_huge_numbers_are_no_answer():
    assert extract_gsm8k_answer("so it is 16/0") is None
    assert extract_gsm8k_answer("The answer is 16/0, or rather 4.") == "4"
    assert extract_gsm8k_answer("9" * 4301) is None
    assert extract_gsm8k_answer("#### " + "9" * 1000) == "9" * 1000  # long, but still a number


def test_gsm8k_odd_outputs_are_wrong_not_fatal(tmp_path: Path):
    problem = load_problems("gsm8k", limit=1)[0]
    answer = problem.reference.split("####")[1].strip()
    completions = ["16/0", "The answer is 16/0", "9" * 4301, "The answer is " + "9" * 4301, f"#### {answer}"]
    samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": 0, "completion": c} for c in completions])
    summary = score_samples("gsm8k", samples, out_dir=tmp_path / "out")
    rows = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert [r["correct"] for r in rows] == [False, False, False, False, True]
    assert summary["n_correct"] == 1 and summary["n_scoring_errors"] == 0


def test_an_exception_while_scoring_marks_only_that_sample_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real = tasks_module.math_equal

    def fragile(predicted: str | None, reference: str | None) -> bool:
        if predicted == "boom":
            raise RecursionError("maximum recursion depth exceeded")
        return real(predicted, reference)

    monkeypatch.setattr(tasks_module, "math_equal", fragile)
    problem = load_problems("math", limit=1)[0]
    completions = ["\\boxed{boom}", f"\\boxed{{{problem.reference}}}"]
    samples = write_jsonl(tmp_path / "s.jsonl", [{"index": 0, "completion": c} for c in completions])
    summary = score_samples("math", samples, out_dir=tmp_path / "out")
    rows = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert [r["correct"] for r in rows] == [False, True]
    assert rows[0]["scoring_error"] == "RecursionError: maximum recursion depth exceeded"
    assert rows[1]["scoring_error"] is None and summary["n_scoring_errors"] == 1


def test_completions_are_on_disk_before_scoring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(len(tokenizer))

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("scoring crashed")

    monkeypatch.setattr(tasks_module, "_score_and_write", crash)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="scoring crashed"):
        evaluate_generation(model, tokenizer, "gsm8k", limit=2, max_new_tokens=4, out_dir=out, progress=False)
    saved = read_jsonl(out / COMPLETIONS_FILE)
    assert [(r["task_id"], r["sample"]) for r in saved] == [("0", 0), ("1", 0)]
    assert all(r["prompt"] and isinstance(r["completion"], str) for r in saved)
    monkeypatch.undo()
    summary = score_samples("gsm8k", out / COMPLETIONS_FILE, out_dir=out)  # the saved completions score as they are
    assert summary["n_samples"] == 2
    assert [r["output"] for r in read_jsonl(out / "results.jsonl")] == [r["completion"] for r in saved]


def test_a_crashing_sandbox_is_a_failed_sample(monkeypatch: pytest.MonkeyPatch):
    real = sandbox_module.run_program

    def flaky(program: str, **limits: object) -> object:
        if "crash" in program:
            raise OSError(24, "Too many open files")
        return real(program, **limits)

    monkeypatch.setattr(sandbox_module, "run_program", flaky)
    results = run_many(["assert True\n", "# crash\n", "assert True\n"], workers=2, progress=False)
    assert [r.status for r in results] == ["passed", "error", "passed"]
    assert results[1].reason == "sandbox failure: OSError: [Errno 24] Too many open files"


@pytest.fixture()
def no_namespaces(monkeypatch: pytest.MonkeyPatch) -> str:
    detail = "no bwrap in this test " + secrets.token_hex(4)  # unique: the fallback warning is shown once per reason
    monkeypatch.setattr(isolation_module, "probe", lambda: Probe(False, detail))
    return detail


def test_without_namespaces_strict_refuses_and_auto_warns(tmp_path: Path, no_namespaces: str):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": 11, "completion": "def remove_Occ(s, c):\n    return s"}])
    with pytest.raises(IsolationUnavailable, match=r"--isolation strict: .*no bwrap in this test.*bubblewrap"):
        score_samples("mbpp", samples, out_dir=tmp_path / "strict", isolation="strict")
    assert not (tmp_path / "strict").exists()
    with pytest.warns(RuntimeWarning, match="Linux namespaces are unavailable"):
        summary = score_samples("mbpp", samples, out_dir=tmp_path / "auto", isolation="auto")
    assert summary["sandbox"]["isolation"] == "guards only"
    assert no_namespaces in summary["sandbox"]["warning"] and "--isolation strict" in summary["sandbox"]["warning"]
    assert summary["status_counts"] == {"failed": 1}
    assert json.loads((tmp_path / "auto" / "summary.json").read_text())["sandbox"] == summary["sandbox"]


def test_strict_refuses_before_generating(tmp_path: Path, no_namespaces: str, monkeypatch: pytest.MonkeyPatch):
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("generation started although the sandbox is unavailable")

    monkeypatch.setattr(tasks_module, "generate", never)
    with pytest.raises(IsolationUnavailable):
        evaluate_generation(None, None, "mbpp", limit=1, out_dir=tmp_path / "out", isolation="strict")


def test_cli_strict_without_namespaces_is_a_user_error(
    tmp_path: Path, no_namespaces: str, capsys: pytest.CaptureFixture
):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"task_id": 11, "completion": "x = 1"}])
    out = tmp_path / "out"
    assert main(["eval", "--task", "mbpp", "--samples", str(samples), "--output-dir", str(out), "--isolation",
                 "strict"]) == 2  # fmt: skip
    assert "balora: error: --isolation strict: Linux namespaces are unavailable" in capsys.readouterr().err
    assert not (out / "results.jsonl").exists()


HOSTILE = {
    "kill the evaluator": (
        "import os, signal\n"
        "for pid in [EVALUATOR] + [int(n) for n in os.listdir('/proc') if n.isdigit()]:\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL) if pid != os.getpid() else None\n"
        "    except Exception:\n"
        "        pass\n"
        "    try:\n"
        "        signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGKILL) if pid != os.getpid() else None\n"
        "    except Exception:\n"
        "        pass\n"
    ),
    "exit early": "import os\nos._exit(0)\n",
    "always equal": "class A:\n    __eq__ = lambda self, other: True\n\ndef remove_Occ(s, c):\n    return A()\n",
    "nest deeply": "def remove_Occ(s, c):\n    x = []\n    for _ in range(10**5):\n        x = [x]\n    return x\n",
}


def test_cli_scores_hostile_samples_and_writes_every_result(tmp_path: Path):
    """`balora eval --samples` in this very process: the samples target it, it survives and writes every row."""
    rows = [{"task_id": 11, "completion": code.replace("EVALUATOR", str(os.getpid()))} for code in HOSTILE.values()]
    out = tmp_path / "out"
    assert main(["eval", "--task", "mbpp", "--samples", str(write_jsonl(tmp_path / "s.jsonl", rows)),
                 "--output-dir", str(out)]) == 0  # fmt: skip
    results = read_jsonl(out / "results.jsonl")
    assert len(results) == len(HOSTILE) and not any(r["correct"] for r in results)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_samples"] == len(HOSTILE) and summary["pass@1"] == 0.0
