"""Task loading, scoring completions made elsewhere, end-to-end generation runs on a tiny model, perplexity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_lm import tiny_causal_lm, tiny_tokenizer

from balora.eval import problems as problems_module
from balora.eval.perplexity import evaluate_perplexity
from balora.eval.problems import build_prompt, load_problems
from balora.eval.tasks import evaluate_generation, score_samples
from balora.io import DataError, write_json_atomic

FIXTURE = Path(__file__).with_name("humaneval_fixture.jsonl")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def lm():
    tokenizer = tiny_tokenizer()
    return tiny_causal_lm(len(tokenizer)), tokenizer


def test_bundled_data_loads():
    assert len(load_problems("gsm8k")) == 1319
    assert len(load_problems("math")) == 500
    mbpp = load_problems("mbpp")
    assert [p.task_id for p in mbpp[:2]] == ["11", "12"] and len(mbpp) == 500  # the test split only
    assert len(load_problems("gsm8k", limit=7)) == 7
    assert [p.task_id for p in load_problems("humaneval", FIXTURE)] == [f"Fixture/{i}" for i in range(4)]


def test_malformed_rows_name_file_and_line(tmp_path: Path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "q", "answer": "#### 1"}\n{"question": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        load_problems("gsm8k", bad_json)
    missing = write_jsonl(tmp_path / "missing.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q"}])
    with pytest.raises(ValueError, match=r"missing\.jsonl:2: gsm8k row has no field\(s\) \['answer'\]"):
        load_problems("gsm8k", missing)
    train_only = write_jsonl(tmp_path / "mbpp.jsonl", [{"task_id": 600, "text": "t", "code": "c", "test_list": []}])
    with pytest.raises(ValueError, match="task_id in 11-510"):
        load_problems("mbpp", train_only)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_problems("gsm8k", tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unknown task"):
        load_problems("gsm9k")


def test_humaneval_without_data_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(problems_module, "DATA_DIR", tmp_path)  # no HumanEval file in data/humaneval
    with pytest.raises(DataError, match="pass data_file=PATH"):
        load_problems("humaneval")


def test_math_directory_of_problem_files(tmp_path: Path):
    folder = tmp_path / "test" / "algebra"
    folder.mkdir(parents=True)
    (folder / "1.json").write_text(json.dumps({"problem": "1+1?", "solution": "It is $\\boxed{2}$.", "level": "1"}))
    (folder / "2.json").write_text(json.dumps({"problem": "2+2?", "solution": "$\\boxed{\\frac{8}{2}}$"}))
    problems = load_problems("math", tmp_path / "test")
    assert [p.reference for p in problems] == ["2", "\\frac{8}{2}"]
    assert problems[0].task_id == "test/algebra/1.json"


def test_score_samples_gsm8k(tmp_path: Path):
    problems = load_problems("gsm8k", limit=4)
    samples = [
        {"task_id": 0, "completion": problems[0].row["answer"]},  # the reference solution itself
        {"index": 1, "completion": "The answer is: " + problems[1].reference.split("####")[1].strip()},
        {"task_id": "2", "completion": "I think the answer is 123456789."},
        {"index": 3, "completion": "no idea"},
    ]
    out = tmp_path / "out"
    summary = score_samples("gsm8k", write_jsonl(tmp_path / "s.jsonl", samples), out_dir=out)
    assert summary["n_problems"] == 4 and summary["n_correct"] == 2
    assert summary["accuracy"] == 0.5 and summary["n_no_answer"] == 1
    assert summary["n_problems_without_samples"] == 1319 - 4
    assert json.loads((out / "summary.json").read_text()) == summary
    rows = read_jsonl(out / "results.jsonl")
    assert [r["correct"] for r in rows] == [True, True, False, False]
    assert rows[2]["extracted"] == "123456789" and rows[3]["extracted"] is None
    assert rows[0]["reference"] == problems[0].reference.split("####")[1].strip()


def test_score_samples_mbpp(tmp_path: Path):
    problems = {p.task_id: p for p in load_problems("mbpp", limit=3)}
    samples = [
        {"task_id": 11, "completion": "Here you go:\n```python\n" + problems["11"].row["code"] + "\n```"},
        {"task_id": "Mbpp/12", "completion": "def sort_matrix(m):\n    return m\n"},  # wrong
        {"task_id": 13, "completion": "while True:\n    pass\n"},  # never ends
    ]
    out = tmp_path / "out"
    summary = score_samples("mbpp", write_jsonl(tmp_path / "s.jsonl", samples), out_dir=out, timeout=2.0)
    assert summary["pass@1"] == pytest.approx(1 / 3)
    assert summary["status_counts"] == {"passed": 1, "failed": 1, "timeout": 1}
    rows = read_jsonl(out / "results.jsonl")
    assert [r["status"] for r in rows] == ["passed", "failed", "timeout"]
    assert "AssertionError" in rows[1]["reason"] and "timeout" in rows[2]["reason"]


def test_score_samples_humaneval_pass_at_k(tmp_path: Path):
    problems = load_problems("humaneval", FIXTURE)
    samples = []
    for i, problem in enumerate(problems):  # problem i gets i correct samples out of 3
        for j in range(3):
            body = problem.row["canonical_solution"] if j < i else "    return None\n"
            samples.append({"task_id": problem.task_id, "completion": body})
    summary = score_samples(
        "humaneval", write_jsonl(tmp_path / "s.jsonl", samples), data_file=FIXTURE, out_dir=tmp_path / "out",
        ks=(1, 2, 10),
    )  # fmt: skip
    expected_pass1 = sum(min(i, 3) / 3 for i in range(4)) / 4
    assert summary["pass@1"] == pytest.approx(expected_pass1)
    assert summary["pass@2"] == pytest.approx((0 + (1 - 1 / 3) + 1 + 1) / 4)
    assert "pass@10" not in summary and summary["samples_per_problem"] == 3


def test_score_samples_rejects_unknown_ids(tmp_path: Path):
    samples = write_jsonl(
        tmp_path / "s.jsonl", [{"task_id": 11, "completion": "x"}, {"task_id": 5, "completion": "x"}]
    )
    with pytest.raises(ValueError, match=r"s\.jsonl:2: task_id 5 is not a problem"):
        score_samples("mbpp", samples, out_dir=tmp_path / "out")
    no_completion = write_jsonl(tmp_path / "t.jsonl", [{"task_id": 11, "output": "x"}])
    with pytest.raises(ValueError, match=r"t\.jsonl:1: a sample row needs `completion`"):
        score_samples("mbpp", no_completion, out_dir=tmp_path / "out")


def test_evaluate_generation_end_to_end(lm, tmp_path: Path):
    model, tokenizer = lm
    summary = evaluate_generation(
        model, tokenizer, "gsm8k", limit=3, batch_size=2, max_new_tokens=6, out_dir=tmp_path / "gsm8k", progress=False
    )
    assert summary["n_problems"] == 3 and 0.0 <= summary["accuracy"] <= 1.0
    assert summary["settings"]["template"] == "alpaca" and summary["generation_s"] > 0
    rows = read_jsonl(tmp_path / "gsm8k" / "results.jsonl")
    assert rows[0]["prompt"].endswith("### Response: Let's think step by step.")
    assert all(set(r) >= {"prompt", "output", "extracted", "correct", "reference"} for r in rows)
    code = evaluate_generation(
        model, tokenizer, "humaneval", data_file=FIXTURE, template="plain", max_new_tokens=5,
        out_dir=tmp_path / "humaneval", progress=False,
    )  # fmt: skip
    assert code["pass@1"] == 0.0 and sum(code["status_counts"].values()) == 4


def test_prompts_per_template(lm):
    _, tokenizer = lm
    problem = load_problems("mbpp", limit=1)[0]
    alpaca = build_prompt("mbpp", problem, template="alpaca")
    assert alpaca.startswith("Below is an instruction") and "Your code should pass these tests" in alpaca
    assert build_prompt("mbpp", problem, template="plain").startswith("You are an expert Python programmer")
    humaneval = load_problems("humaneval", FIXTURE)[0]
    assert build_prompt("humaneval", humaneval, template="plain") == humaneval.row["prompt"]
    with pytest.raises(ValueError, match="chat template"):
        build_prompt("gsm8k", load_problems("gsm8k", limit=1)[0], template="chat", tokenizer=tokenizer)


def test_perplexity_matches_the_model_loss(lm, tmp_path: Path):
    model, tokenizer = lm
    text = "the cat sat on the mat and the dog ran far"
    data = write_jsonl(tmp_path / "ppl.jsonl", [{"text": text}])
    summary = evaluate_perplexity(model, tokenizer, data, out_dir=tmp_path / "out", progress=False)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert summary["perplexity"] == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert summary["n_tokens"] == ids.shape[1] - 1


def test_perplexity_scores_only_the_response(lm, tmp_path: Path):
    model, tokenizer = lm
    rows = [{"instruction": "the cat", "input": "", "output": "sat on the mat"}, {"text": "dog ran far"}]
    summary = evaluate_generation(
        model, tokenizer, "perplexity", data_file=write_jsonl(tmp_path / "d.jsonl", rows), out_dir=tmp_path / "o"
    )
    per_row = read_jsonl(tmp_path / "o" / "results.jsonl")
    assert per_row[0]["n_tokens"] == 4 + 1  # "sat on the mat" and EOS
    assert per_row[1]["n_tokens"] == 3  # BOS is context
    assert summary["n_tokens"] == 8 and summary["perplexity"] > 1
    with pytest.raises(ValueError, match=r"d2\.jsonl:1: perplexity rows need"):
        evaluate_perplexity(model, tokenizer, write_jsonl(tmp_path / "d2.jsonl", [{"q": 1}]), out_dir=tmp_path)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind
