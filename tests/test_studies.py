"""The evidence-study tooling (docs/results.md): the dev split, the class-imbalance sampler, paired seeds, the paired
intervals, learning-rate selection and sweeps in `balora compare`, and the NLG retention figures of `diagnose`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset

from balora import compare as compare_module
from balora.data.imbalance import apply_class_imbalance, carve_dev
from balora.diagnose import diagnose_run
from balora.experiment import ConfigError, DataSection, load_experiment
from balora.prepare import prepare
from balora.train import train_experiment

sys.path.insert(0, str(Path(__file__).parent))
from test_compare import tiny_setup  # noqa: E402, F401  (module-scoped fixture: a saved tiny BERT and data)

STEPS = {"train": train_experiment, "diagnose": diagnose_run}


# ------------------------------------------------------------------------------------------------ data


def test_imbalance_sampler_keeps_the_asked_share_and_every_other_row() -> None:
    labels = [1] * 60 + [0] * 40
    ds = Dataset.from_dict({"label": labels, "row": list(range(100))})
    out, info = apply_class_imbalance(ds, 0.1, 2, seed=3)
    # class 0 is the least frequent; it keeps round(0.1 * 60 / 0.9) = round(6.67) = 7 rows
    assert info == {"minority_class": 0, "minority_rows_before": 40, "minority_rows": 7, "rows": 67,
                    "minority_share": 7 / 67}
    assert list(out["label"]).count(0) == 7 and list(out["label"]).count(1) == 60
    rows, kept_labels = list(out["row"]), list(out["label"])
    assert [r for r, y in zip(rows, kept_labels, strict=True) if y == 1] == list(range(60))  # untouched
    assert rows == sorted(rows)  # file order kept
    again, _ = apply_class_imbalance(ds, 0.1, 2, seed=3)
    other, _ = apply_class_imbalance(ds, 0.1, 2, seed=4)
    assert list(again["row"]) == list(out["row"]) and list(other["row"]) != list(out["row"])  # seeded
    three = Dataset.from_dict({"label": [0] * 50 + [1] * 30 + [2] * 20})
    out3, info3 = apply_class_imbalance(three, 0.05, 3, seed=0)
    assert info3["minority_class"] == 2 and info3["minority_rows"] == round(0.05 * 80 / 0.95) == 4
    assert list(out3["label"]).count(2) / len(out3) == pytest.approx(4 / 84)
    with pytest.raises(ValueError, match="natural share 0.400"):
        apply_class_imbalance(ds, 0.45, 2, seed=0)
    with pytest.raises(ValueError, match="keeps no row of class 0"):
        apply_class_imbalance(Dataset.from_dict({"label": [1] * 8 + [0] * 2}), 0.01, 2, seed=0)
    with pytest.raises(ConfigError, match=r"data.class_imbalance must be in \(0, 0.5\)"):
        DataSection(class_imbalance=0.6)


def test_dev_rows_are_drawn_from_the_training_rows_only() -> None:
    ds = Dataset.from_dict({"row": list(range(50))})
    train, dev = carve_dev(ds, 12, seed=5)
    assert len(dev) == 12 and len(train) == 38
    train_rows, dev_rows = list(train["row"]), list(dev["row"])
    assert sorted(train_rows + dev_rows) == list(range(50)) and not set(train_rows) & set(dev_rows)
    assert list(carve_dev(ds, 12, seed=5)[1]["row"]) == dev_rows
    assert list(carve_dev(ds, 12, seed=6)[1]["row"]) != dev_rows
    with pytest.raises(ValueError, match="must leave training rows"):
        carve_dev(ds, 50, seed=0)


def _texts(dataset: Dataset, tokenizer: object) -> list[str]:
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in dataset["input_ids"]]  # type: ignore[attr-defined]


def test_paired_seeds_give_every_method_the_same_rows_flips_and_imbalance(tiny_setup: Path) -> None:  # noqa: F811
    runs = compare_module.plan(tiny_setup / "experiment.yaml", ["lora", "pissa", "balora"], [0, 1], [0.25],
                               tiny_setup / "paired", [], imbalances=[0.3])
    seen: dict[int, list[tuple]] = {}
    for spec, experiment, _ in runs:
        assert experiment.data.class_imbalance == 0.3 and experiment.training["seed"] == spec.seed
        prepared = prepare(experiment)
        key = (prepared.train["input_ids"], prepared.train["labels"], prepared.flipped,
               prepared.stats["train"]["imbalance"])
        seen.setdefault(spec.seed, []).append(key)
    for seed, keys in seen.items():
        assert len(keys) == 3 and all(k == keys[0] for k in keys), f"seed {seed}: methods saw different data"
        labels = keys[0][1]
        assert keys[0][3]["minority_share"] == pytest.approx(0.3, abs=0.02)
        assert len(keys[0][2]) == round(0.25 * len(labels))
    assert seen[0][0][2] != seen[1][0][2]  # another seed, other flips


# ------------------------------------------------------------------------------------------------ statistics


def test_paired_t_interval_against_a_hand_computed_case() -> None:
    # differences 0.01, 0.03, 0.02: mean 0.02, sample sd 0.01, t(0.975, 2) = 4.302652729749464 (tables: 4.303)
    out = compare_module.paired_t_interval([0.01, 0.03, 0.02])
    half = 4.302652729749464 * 0.01 / math.sqrt(3)
    assert out["n"] == 3 and out["mean"] == pytest.approx(0.02)
    assert out["low"] == pytest.approx(0.02 - half, abs=1e-12) and out["high"] == pytest.approx(0.02 + half, abs=1e-12)
    assert out["low"] == pytest.approx(-0.004841, abs=1e-6)
    one = compare_module.paired_t_interval([0.5])
    assert one["mean"] == 0.5 and one["low"] is None and one["high"] is None
    # 90 %: t(0.95, 4) = 2.131846786; differences 1..5: mean 3, sd sqrt(2.5)
    ninety = compare_module.paired_t_interval([1, 2, 3, 4, 5], level=0.90)
    assert ninety["high"] - 3 == pytest.approx(2.131846786 * math.sqrt(2.5) / math.sqrt(5), abs=1e-8)


def _run(method: str, seed: int, accuracy: float, condition: str = "noise 0") -> dict:
    return {"method": method, "seed": seed, "condition": condition, "metrics": {"eval_accuracy": accuracy},
            "diagnostics": {}, "extras": {}}


def test_paired_differences_pair_by_seed_and_skip_unpaired_seeds() -> None:
    runs = [_run("pissa", 0, 0.80), _run("pissa", 1, 0.70), _run("pissa", 2, 0.90),
            _run("balora", 0, 0.81), _run("balora", 1, 0.73), _run("balora", 3, 0.99),  # seed 3: no pissa pair
            _run("balora", 0, 0.50, "noise 0.2"), _run("pissa", 0, 0.40, "noise 0.2")]
    out = compare_module.paired_differences(runs, "pissa", ["eval_accuracy"], None)
    clean = next(d for d in out if d["condition"] == "noise 0")
    assert clean["seeds"] == [0, 1] and clean["differences"] == pytest.approx([0.01, 0.03])
    assert clean["mean"] == pytest.approx(0.02)
    noisy = next(d for d in out if d["condition"] == "noise 0.2")
    assert noisy["n"] == 1 and noisy["mean"] == pytest.approx(0.10) and noisy["low"] is None
    assert compare_module.paired_differences(runs, "lora", ["eval_accuracy"], None) == []
    # memorisation exists for noisy runs only: compared where present, skipped where not
    runs[6]["diagnostics"]["memorisation"], runs[7]["diagnostics"]["memorisation"] = 0.3, 0.5
    assert compare_module.compared_keys(runs, None) == ["eval_accuracy", "memorisation"]
    memorised = compare_module.paired_differences(runs, "pissa", ["memorisation"], None)
    assert [(d["condition"], d["mean"]) for d in memorised] == [("noise 0.2", pytest.approx(-0.2))]


def test_nlg_main_figure_is_the_task_nll_without_a_validation_set() -> None:
    run = {"method": "pissa", "seed": 0, "condition": "noise 0", "metrics": {"train_seconds": 1.0},
           "diagnostics": {"task_nll": 0.9, "alpaca_kl": 0.1}, "extras": {}}
    assert compare_module.main_metric(run, None) == ("task_nll", 0.9)
    assert compare_module.main_metric({**run, "generation": {"accuracy": 0.2}}, "gsm8k") == ("gsm8k_accuracy", 0.2)
    assert compare_module.value({**run, "extras": {"best_accuracy": 0.9, "curve": [[5, 0.9]]}}, "best_accuracy",
                                None) is None  # one evaluation is no curve


def test_rate_choice_prefers_the_best_finite_score() -> None:
    grid = [{"method": "lora", "learning_rate": r, "score": s, "higher_is_better": True}
            for r, s in ((1e-4, 0.7), (1e-3, 0.8), (1e-2, float("nan")))]
    grid += [{"method": "pissa", "learning_rate": r, "score": s, "higher_is_better": False}  # a loss: lower wins
             for r, s in ((1e-4, 1.2), (1e-3, 0.9))]
    assert compare_module.choose_rates(grid) == {"lora": 1e-3, "pissa": 1e-3}
    with pytest.raises(ConfigError, match="no learning rate gave a finite dev score for lora"):
        compare_module.choose_rates([{**grid[2]}])


def test_sweep_and_flag_parsing() -> None:
    assert compare_module.parse_sweep("balora.consistency_weight=0,0.1") == [
        "balora@consistency_weight=0", "balora@consistency_weight=0.1"]
    assert compare_module.method_overrides("balora@diversity_weight=0.2")[-2:] == ["--balora.diversity_weight", "0.2"]
    with pytest.raises(ConfigError, match="--sweep takes balora.KEY"):
        compare_module.parse_sweep("training.learning_rate=1,2")
    with pytest.raises(ConfigError, match="unknown method 'nope@x=1'"):
        compare_module.method_overrides("nope@x=1")
    assert compare_module.parse_imbalance("0.1,0.05") == [0.1, 0.05] and compare_module.parse_imbalance(None) == [None]
    with pytest.raises(ConfigError, match=r"\(0, 0.5\)"):
        compare_module.parse_imbalance("0.5")
    assert compare_module.parse_rates("1e-4,3e-4", "--learning-rates") == [1e-4, 3e-4]
    with pytest.raises(ConfigError, match="distinct positive"):
        compare_module.parse_rates("0,1e-3", "--learning-rates")


# ------------------------------------------------------------------------------------------------ compare


def test_learning_rate_selection_never_reads_the_validation_set(tiny_setup: Path) -> None:  # noqa: F811
    """Selection runs read only the training file: with the validation file missing they still run, and their dev
    rows are training rows; the seeds then run at each method's chosen rate, sweep variants at their base's."""
    config = yaml.safe_load((tiny_setup / "experiment.yaml").read_text())
    config["data"]["validation_file"] = str(tiny_setup / "no-such-validation.jsonl")
    blind = tiny_setup / "blind.yaml"
    blind.write_text(yaml.safe_dump(config))
    out = tiny_setup / "select"
    selection = compare_module.select_learning_rates(
        blind, train=train_experiment, methods=["lora", "balora", "balora@consistency_weight=0.5"],
        rates=[1e-3, 5e-2], seed=0, dev_rows=12, output_dir=out, overrides=[])
    assert {(g["method"], g["learning_rate"]) for g in selection["grid"]} == {
        (m, r) for m in ("lora", "balora") for r in (1e-3, 5e-2)}  # the sweep variant is not selected on its own
    for g in selection["grid"]:
        saved = yaml.safe_load((Path(g["run_dir"]) / "config.yaml").read_text())
        assert saved["data"]["dev_rows"] == 12 and saved["training"]["learning_rate"] == g["learning_rate"]
        metrics = json.loads((Path(g["run_dir"]) / "metrics.json").read_text())
        assert metrics["data"]["dev"] == {"rows": 12, "replaces": "validation"}
        assert "validation" not in metrics["data"] and metrics["data"]["train"]["used"] == 48
        assert g["dev_metric"] == "eval_accuracy" and g["score"] == metrics["metrics"]["eval_accuracy"]
    experiment, _ = load_experiment(blind, ["--data.dev_rows", "12"])
    prepared = prepare(experiment)
    train_rows = [json.loads(line)["sentence"] for line in (tiny_setup / "train.jsonl").read_text().splitlines()]
    assert set(_texts(prepared.eval["validation"], prepared.tokenizer)) <= set(train_rows)
    assert len(prepared.train) == 36 and len(prepared.eval["validation"]) == 12
    for method, rate in selection["chosen"].items():
        scores = {g["learning_rate"]: g["score"] for g in selection["grid"] if g["method"] == method}
        assert scores[rate] == max(scores.values())

    out = tiny_setup / "select_and_run"
    result = compare_module.compare(
        tiny_setup / "experiment.yaml", **STEPS, methods=["lora", "balora"], seeds=[0, 1], noises=[0.0],
        output_dir=out, learning_rates=[1e-3, 5e-2], dev_rows=12, sweep=["balora@consistency_weight=0.5"])
    chosen = result["lr_selection"]["chosen"]
    for run in result["runs"]:
        saved = yaml.safe_load((Path(run["run_dir"]) / "config.yaml").read_text())
        base = compare_module.base_method(run["method"])
        assert saved["training"]["learning_rate"] == chosen[base] == run["learning_rate"]
        assert saved["data"]["dev_rows"] is None  # the reported runs train on every row, scored on validation
    variant = next(r for r in result["runs"] if r["method"] == "balora@consistency_weight=0.5")
    assert yaml.safe_load((Path(variant["run_dir"]) / "config.yaml").read_text())["balora"][
        "consistency_weight"] == 0.5
    diffs = [d for d in result["differences"] if d["reference"] == "lora" and d["metric"] == "eval_accuracy"]
    assert {d["method"] for d in diffs} == {"balora", "balora@consistency_weight=0.5"}
    for d in diffs:
        runs = {(r["method"], r["seed"]): r["metrics"]["eval_accuracy"] for r in result["runs"]}
        assert d["differences"] == pytest.approx([runs[(d["method"], s)] - runs[("lora", s)] for s in (0, 1)])
    table = (out / "comparison.md").read_text()
    assert "## Learning rates, chosen on a dev split" in table and "## Paired differences" in table
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    reused = compare_module.compare(tiny_setup / "experiment.yaml", **STEPS, methods=["balora"], seeds=[0],
                                    noises=[0.25], output_dir=tiny_setup / "reuse_rates",
                                    rates_from=out / "comparison.json")
    assert reused["runs"][0]["learning_rate"] == chosen["balora"] and reused["lr_selection"]["from"]
    assert not (tiny_setup / "reuse_rates" / "lr-select").exists()  # nothing selected again
    with pytest.raises(ConfigError, match="chose no learning rate for pissa"):
        compare_module.compare(tiny_setup / "experiment.yaml", **STEPS, methods=["pissa"], seeds=[0], noises=[0.0],
                               output_dir=tiny_setup / "reuse_rates", rates_from=out / "comparison.json")
    with pytest.raises(ConfigError, match="--learning-rates needs --dev-rows"):
        compare_module.compare(tiny_setup / "experiment.yaml", **STEPS, methods=["lora"], seeds=[0], noises=[0.0],
                               output_dir=out, learning_rates=[1e-3])


def test_imbalanced_comparison_reports_macro_f1_minority_recall_and_curves(tiny_setup: Path) -> None:  # noqa: F811
    out = tiny_setup / "imbalanced"
    result = compare_module.compare(
        tiny_setup / "experiment.yaml", **STEPS, methods=["lora", "balora"], seeds=[0], noises=[0.0],
        output_dir=out, imbalances=[0.2],
        overrides=["--training.eval_strategy", "steps", "--training.eval_steps", "1"])
    validation = [json.loads(line) for line in (tiny_setup / "validation.jsonl").read_text().splitlines()]
    for run in result["runs"]:
        extras = run["extras"]
        minority = extras["minority_class"]
        run_dir = Path(run["run_dir"])
        _, model, tokenizer = __import__("balora.rundir", fromlist=["load_run"]).load_run(run_dir)
        enc = tokenizer([r["sentence"] for r in validation], padding=True, return_tensors="pt")
        with torch.no_grad():
            predicted = model(**enc).logits.argmax(-1).numpy()
        labels = np.array([r["label"] for r in validation])
        assert extras["minority_recall"] == pytest.approx(np.mean(predicted[labels == minority] == minority))
        f1s = []
        for c in (0, 1):
            tp = np.sum((predicted == c) & (labels == c))
            denominator = np.sum(predicted == c) + np.sum(labels == c)
            f1s.append(2 * tp / denominator if denominator else 0.0)
        assert extras["macro_f1"] == pytest.approx(np.mean(f1s))
        assert [step for step, _ in extras["curve"]] == [1, 2]
        assert extras["best_accuracy"] == max([v for _, v in extras["curve"]] + [run["metrics"]["eval_accuracy"]])
        assert run["condition"] == "imbalance 0.2, noise 0" and "imbalance-0.2/noise-0" in run["run_dir"]
    assert (out / "curves.png").is_file() and "minority recall" in (out / "comparison.md").read_text()


# ------------------------------------------------------------------------------------------------ NLG retention


def test_retention_figures_match_a_hand_written_reference(tmp_path: Path) -> None:
    """task_nll / mbpp_nll / their KL against a loop over rows in float64 on a tiny Llama whose adapter moved."""
    sys.path.insert(0, str(Path(__file__).parent / "eval"))
    from tiny_lm import tiny_instruct_setup

    from balora import rundir
    from balora.data.templates import render_prompt, response_prefix

    config = tiny_instruct_setup(tmp_path)
    task_rows = [{"question": f"the cat sat {i} and {i + 2}", "answer": f"it ran far to {i}\n#### {i}"}
                 for i in range(3)]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_rows))
    mbpp_rows = [{"text": "Write a def to return x", "code": "def f ( x ) :\r\n return x + 1", "task_id": 1},
                 {"text": "Write a def for y", "code": "def g ( y ) :\r\n return y", "task_id": 2}]
    (tmp_path / "mbpp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mbpp_rows))
    out = tmp_path / "run"
    experiment, _ = load_experiment(config, ["--output_dir", str(out), "--training.learning_rate", "0.05",
                                             "--training.max_steps", "3"])
    train_experiment(experiment)
    result = diagnose_run(out, drift_file=tmp_path / "train.json", drift_samples=3, generations=1, max_new_tokens=2,
                          task_file=tmp_path / "task.jsonl", mbpp_file=tmp_path / "mbpp.jsonl")
    _, model, tokenizer = rundir.load_run(out, reference=True)

    def reference(rows: list[tuple[str, str]]) -> tuple[float, float, float]:
        nll_ft = nll_pre = kl = 0.0
        tokens = 0
        for instruction, response in rows:
            p_ids = tokenizer(render_prompt(instruction, None, template="alpaca", tokenizer=tokenizer))["input_ids"]
            r_ids = tokenizer(response_prefix("alpaca") + response, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[*p_ids, *r_ids, tokenizer.eos_token_id][:32]])
            with torch.no_grad():
                fine = model(input_ids=ids).logits[0].double().log_softmax(-1)
                with model.disable_adapter():
                    pre = model(input_ids=ids).logits[0].double().log_softmax(-1)
            for t in range(len(p_ids), ids.shape[1]):  # token t predicted from position t - 1
                target = int(ids[0, t])
                nll_ft -= float(fine[t - 1, target])
                nll_pre -= float(pre[t - 1, target])
                kl += float((pre[t - 1].exp() * (pre[t - 1] - fine[t - 1])).sum())
                tokens += 1
        return nll_ft / tokens, nll_pre / tokens, kl / tokens

    task = reference([(r["question"], r["answer"]) for r in task_rows])
    mbpp = reference([(r["text"], r["code"].replace("\r\n", "\n")) for r in mbpp_rows])
    for name, (ft, pre, kl) in (("task", task), ("mbpp", mbpp)):
        assert result[f"{name}_nll"] == pytest.approx(ft, rel=1e-4)
        assert result[f"{name}_nll_pretrained"] == pytest.approx(pre, rel=1e-4)
        assert result[f"{name}_kl"] == pytest.approx(kl, rel=1e-3, abs=1e-7)
        assert result[f"{name}_nll_change"] == pytest.approx(ft / pre - 1, rel=1e-3)
    assert result["task_kl"] > 1e-5  # the adapter moved: a real difference to check
    assert result["retention"]["task"]["file"] == str(tmp_path / "task.jsonl")
    assert result["alpaca_nll"] == pytest.approx(math.log(result["perplexity_finetuned"]), rel=1e-6)


# ------------------------------------------------------------------------------------------------ greedy check


def _fake_eval(folder: Path, correct: list[bool], no_answer: int, limit: int) -> None:
    folder.mkdir(parents=True)
    rows = [{"task_id": str(i), "correct": c} for i, c in enumerate(correct)]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps({
        "n_problems": len(correct), "n_correct": sum(correct), "accuracy": sum(correct) / len(correct),
        "n_no_answer": no_answer, "generation_s": 1.25, "results_file": "results.jsonl",
        "settings": {"limit": limit, "template": "alpaca", "max_new_tokens": 256}}))


def test_gsm8k_greedy_table_reads_every_eval_and_refuses_missing_or_mismatched_ones(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import gsm8k_greedy

    runs, out = tmp_path / "runs", tmp_path / "out"
    solved = {"pre-trained": [True, False, False, False], "lora": [False, True, True, False],
              "pissa": [False] * 4, "balora": [True, True, False, True]}
    for method, correct in solved.items():
        if method != "balora":
            _fake_eval(runs / gsm8k_greedy.SOURCES[method], correct, no_answer=2 if method == "pre-trained" else 0,
                       limit=4)
    with pytest.raises(SystemExit, match="no finished eval for balora"):
        gsm8k_greedy.main(["--runs", str(runs), "--output", str(out)])
    assert not out.exists()  # nothing half-written
    _fake_eval(runs / gsm8k_greedy.SOURCES["balora"], solved["balora"], no_answer=0, limit=4)
    assert gsm8k_greedy.main(["--runs", str(runs), "--output", str(out)]) == 0
    result = json.loads((out / "greedy.json").read_text())
    by_method = {row["method"]: row for row in result["rows"]}
    assert {m: (r["correct"], r["accuracy"], r["no_answer"]) for m, r in by_method.items()} == {
        "pre-trained": (1, 0.25, 2), "lora": (2, 0.5, 0), "pissa": (0, 0.0, 0), "balora": (3, 0.75, 0)}
    assert result["solved_task_ids"] == {"pre-trained": ["0"], "lora": ["1", "2"], "pissa": [],
                                         "balora": ["0", "1", "3"]}
    assert "| balora | 4 | 3 | 0.750 | 0 |" in (out / "greedy.md").read_text()
    summary = runs / gsm8k_greedy.SOURCES["lora"] / "summary.json"
    summary.write_text(summary.read_text().replace('"limit": 4', '"limit": 200'))
    with pytest.raises(SystemExit, match=r"different problem counts \[4, 200\]"):
        gsm8k_greedy.main(["--runs", str(runs), "--output", str(tmp_path / "out2")])
