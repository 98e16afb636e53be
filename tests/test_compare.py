"""`balora compare` on a tiny saved BERT: the grid, the three output files, and resuming without redoing runs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml

from balora import compare as compare_module
from balora.cli import main
from balora.diagnose import diagnose_run
from balora.experiment import ConfigError
from balora.train import train_experiment

STEPS = {"train": train_experiment, "diagnose": diagnose_run}

GOOD = "good great fine nice happy".split()
BAD = "bad awful poor sad ugly".split()
FILLER = "the a film movie plot story was is very quite".split()


def save_tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT with a word-level tokenizer, saved as a model folder `load_model` reads (no downloads)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(special + GOOD + BAD + FILLER)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                        model_max_length=32)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=40, num_labels=2, pad_token_id=0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_sentiment(path: Path, n: int, seed: int) -> Path:
    """SST-2-like rows: label 1 when the sentence holds a GOOD word, 0 for a BAD word."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            label = rng.randint(0, 1)
            words = rng.sample(FILLER, 3) + [rng.choice(GOOD if label else BAD)]
            rng.shuffle(words)
            f.write(json.dumps({"sentence": " ".join(words), "label": label}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with `model/`, `train.jsonl`, `validation.jsonl` and `experiment.yaml` (2 optimizer steps)."""
    root = tmp_path_factory.mktemp("tiny_sst2")
    save_tiny_bert(root / "model")
    write_sentiment(root / "train.jsonl", 48, seed=1)
    write_sentiment(root / "validation.jsonl", 24, seed=2)
    experiment = {
        "model": {"name": str(root / "model"), "dtype": "float32", "device": "cpu"},
        "data": {"task": "sst2", "train_file": str(root / "train.jsonl"),
                 "validation_file": str(root / "validation.jsonl"), "max_length": 16},
        "balora": {"method": "balora", "r": 2, "target_modules": ["query", "value"], "svd_top_k": 1},
        "training": {"max_steps": 2, "per_device_train_batch_size": 16, "per_device_eval_batch_size": 32,
                     "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no", "eval_strategy": "no",
                     "seed": 0, "report_to": [], "disable_tqdm": True},
        "output_dir": str(root / "runs" / "default"),
    }
    (root / "experiment.yaml").write_text(yaml.safe_dump(experiment))
    return root


def _metric_by_run(result: dict) -> dict[tuple[str, float, int], float]:
    return {(r["method"], r["noise"], r["seed"]): r["metrics"]["eval_accuracy"] for r in result["runs"]}


def test_compare_grid_files_and_resume(tiny_setup: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tiny_setup / "cmp"
    import balora.train

    real_train = train_experiment
    calls: list[str] = []

    def crashing(experiment, **kw):  # noqa: ANN001, ANN003, ANN202
        calls.append(experiment.output_dir)
        if len(calls) == 3:  # the third run dies half-way: a run dir without metrics.json
            Path(experiment.output_dir).mkdir(parents=True)
            (Path(experiment.output_dir) / "config.yaml").write_text("half-written")
            raise RuntimeError("simulated crash")
        return real_train(experiment, **kw)

    monkeypatch.setattr(balora.train, "train_experiment", crashing)  # the step `balora compare` passes
    args = ["compare", str(tiny_setup / "experiment.yaml"), "--methods", "lora,balora", "--seeds", "2",
            "--label-noise", "0,0.25", "--output-dir", str(out)]
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args)
    assert len(calls) == 3
    assert not (out / "comparison.md").exists()

    calls.clear()
    counting = lambda experiment, **kw: (calls.append(experiment.output_dir), real_train(experiment, **kw))[1]  # noqa: E731
    monkeypatch.setattr(balora.train, "train_experiment", counting)
    assert main(args) == 0
    assert len(calls) == 6, "the two finished runs must not be redone; the crashed one is redone"
    assert str(out / "lora/noise-0.25/seed-0") in calls  # the crashed (third) run

    result = json.loads((out / "comparison.json").read_text())
    assert len(result["runs"]) == 8
    assert {(r["method"], r["noise"], r["seed"]) for r in result["runs"]} == {
        (m, p, s) for m in ("lora", "balora") for p in (0.0, 0.25) for s in (0, 1)
    }
    assert sum(r["reused"] for r in result["runs"]) == 2
    for run in result["runs"]:
        assert 0.0 <= run["metrics"]["eval_accuracy"] <= 1.0
        assert run["wall_seconds"] > 0
        diagnostics = run["diagnostics"]
        assert diagnostics["drift_kl"] >= 0.0
        assert (diagnostics["memorisation"] is None) == (run["noise"] == 0.0)
        saved = yaml.safe_load((Path(run["run_dir"]) / "config.yaml").read_text())
        assert saved["training"]["seed"] == run["seed"] and saved["data"]["label_noise"] == run["noise"]
        assert saved["training"]["max_steps"] == 2 and saved["balora"]["r"] == 2  # everything else identical
    assert {row["method"] for row in result["summary"]} == {"lora", "balora"}
    for row in result["summary"]:
        stat = row["eval_accuracy"]
        assert stat["n"] == 2 and stat["std"] >= 0.0
        values = [r["metrics"]["eval_accuracy"] for r in result["runs"]
                  if (r["method"], r["noise"]) == (row["method"], row["noise"])]
        assert stat["mean"] == pytest.approx(sum(values) / 2)
    table = (out / "comparison.md").read_text()
    assert "| lora |" in table and "| balora |" in table and "noise 0.25" in table and "drift" in table
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A run whose metrics.json is gone is redone, alone, and reproduces its figures.
    before = _metric_by_run(result)
    (out / "balora/noise-0/seed-1/metrics.json").unlink()
    calls.clear()
    assert main(args) == 0
    assert calls == [str(out / "balora/noise-0/seed-1")]
    after = _metric_by_run(json.loads((out / "comparison.json").read_text()))
    assert after == before


def test_compare_refuses_a_changed_config(tiny_setup: Path) -> None:
    out = tiny_setup / "cmp_changed"
    base = ["compare", str(tiny_setup / "experiment.yaml"), "--methods", "lora", "--seeds", "1",
            "--output-dir", str(out)]
    assert main(base) == 0
    with pytest.raises(ConfigError, match="training.learning_rate = 0.01, now 0.5"):
        compare_module.compare(tiny_setup / "experiment.yaml", **STEPS, methods=["lora"], seeds=[0], noises=[0.0],
                               output_dir=out, overrides=["--training.learning_rate", "0.5"])


def test_methods_seeds_and_noise_parsing() -> None:
    assert compare_module.parse_methods("lora, pissa,balora-nosvd") == ["lora", "pissa", "balora-nosvd"]
    assert compare_module.parse_methods("balora-featsvd,full") == ["balora-featsvd", "full"]
    with pytest.raises(ConfigError, match="unknown method 'qlora'"):
        compare_module.parse_methods("qlora")
    assert compare_module.parse_seeds("3") == [0, 1, 2]
    assert compare_module.parse_seeds("7,42") == [7, 42]
    with pytest.raises(ConfigError):
        compare_module.parse_seeds("0")
    assert compare_module.parse_noise("0,0.2,0.4") == [0.0, 0.2, 0.4]
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        compare_module.parse_noise("0,1.5")


def test_baseline_methods_override_regularizer_weights(tiny_setup: Path) -> None:
    runs = compare_module.plan(tiny_setup / "experiment.yaml",
                               ["lora", "pissa", "balora", "balora-nosvd", "balora-featsvd"], [3],
                               [0.0], tiny_setup / "plan", ["--balora.svd_weight", "0.5"])
    by_method = {spec.method: exp for spec, exp, _ in runs}
    assert by_method["lora"].balora.svd_weight == 0.0 and by_method["pissa"].balora.method == "pissa"
    assert by_method["balora"].balora.svd_weight == 0.5
    assert by_method["balora-nosvd"].balora.svd_weight == 0.0 and by_method["balora-nosvd"].balora.method == "balora"
    assert by_method["balora-featsvd"].balora.svd_input == "features"
    assert by_method["balora"].balora.svd_input is None  # from the preset: features (default), logits (paper)
    assert by_method["balora"].balora.resolve("nlu").svd_input == "features"
    assert all(exp.training["seed"] == 3 for exp in by_method.values())


def test_nlu_svd_term_is_inert_with_k5_and_two_classes(tiny_setup: Path) -> None:
    """With the paper's reading (preset paper, k = 5) and 2 classes the SVD term is the constant −1: balora and
    balora-nosvd train alike; on the pooled features (balora-featsvd) the same k gives a real term that changes
    training."""
    result = compare_module.compare(tiny_setup / "experiment.yaml", **STEPS,
                                    methods=["balora", "balora-nosvd", "balora-featsvd"], seeds=[0],
                                    noises=[0.25], output_dir=tiny_setup / "svd_ablation",
                                    overrides=["--balora.svd_top_k", "5", "--balora.preset", "paper"])
    with_svd, without, on_features = result["runs"]
    assert -1.0 < on_features["final_terms"]["svd_loss"] < -0.1
    assert on_features["final_terms"]["task_loss"] != without["final_terms"]["task_loss"]
    assert with_svd["final_terms"]["svd_loss"] == -1.0 and "svd_loss" not in without["final_terms"]
    assert with_svd["metrics"]["eval_loss"] == without["metrics"]["eval_loss"]
    assert with_svd["final_terms"]["task_loss"] == without["final_terms"]["task_loss"]
    assert with_svd["diagnostics"]["drift_kl"] == without["diagnostics"]["drift_kl"]


def test_full_fine_tuning_runs_trains_every_weight_and_diagnoses_against_the_base(tiny_setup: Path) -> None:
    import torch
    from transformers import BertForSequenceClassification

    from balora.rundir import export_run, load_run, pretrained_view

    out = tiny_setup / "full"
    with pytest.raises(ConfigError, match="`full` in --methods"):
        compare_module.plan(tiny_setup / "experiment.yaml", ["lora"], [0], [0.0], out, [], full_learning_rate=1e-3)
    result = compare_module.compare(tiny_setup / "experiment.yaml", **STEPS, methods=["lora", "full"], seeds=[0],
                                    noises=[0.25], output_dir=out, full_learning_rate=1e-3)
    lora_run, full_run = result["runs"]
    run_dir = Path(full_run["run_dir"])
    assert (run_dir / "model" / "config.json").is_file() and not (run_dir / "adapter").exists()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["balora"]["method"] == "full" and saved["training"]["learning_rate"] == 1e-3
    lora_saved = yaml.safe_load((Path(lora_run["run_dir"]) / "config.yaml").read_text())
    assert lora_saved["training"]["learning_rate"] == 1e-2  # only `full` gets --full-learning-rate

    base = BertForSequenceClassification.from_pretrained(tiny_setup / "model")
    tuned = BertForSequenceClassification.from_pretrained(run_dir / "model")
    base_weights, tuned_weights = base.state_dict(), tuned.state_dict()
    untrained = [name for name in base_weights if torch.equal(base_weights[name], tuned_weights[name])]
    assert untrained == [], f"full fine-tuning left {untrained} unchanged"

    _, plain, _ = load_run(run_dir)  # evaluation needs no base model beside it: none is loaded
    with pytest.raises(ValueError, match="reference=True"), pretrained_view(plain):
        pass
    _, model, _ = load_run(run_dir, reference=True)
    with pretrained_view(model) as reference:
        assert reference is not model
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(value, base_weights[name], msg=name)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, tuned_weights[name], msg=name)
    assert full_run["diagnostics"]["drift_kl"] > 0.0 and full_run["diagnostics"]["memorisation"] is not None
    table = (out / "comparison.md").read_text()
    assert "| full |" in table and "learning rate 0.001" in table

    assert main(["eval", "--run", str(run_dir)]) == 0  # the saved model reproduces the run's validation accuracy
    evaluated = json.loads((run_dir / "eval-validation" / "metrics.json").read_text())
    assert evaluated["eval_accuracy"] == pytest.approx(full_run["metrics"]["eval_accuracy"])

    with pytest.raises(ConfigError, match="full fine-tuning run"):
        export_run(run_dir, "lora", tiny_setup / "export_lora")
    with pytest.raises(ConfigError, match="full fine-tuning run"):
        export_run(run_dir, "merged", tiny_setup / "export_merged")


def test_nlg_comparison_scores_the_benchmark_and_diagnoses_full_and_adapter_runs(tmp_path: Path) -> None:
    """NLG: lr 0 for the adapter run (no drift), a real rate for `full` (drift), GSM8K scored for both."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "eval"))
    from tiny_lm import tiny_instruct_setup

    config = tiny_instruct_setup(tmp_path)
    with pytest.raises(ConfigError, match="label noise applies to classification only"):
        compare_module.plan(config, ["pissa"], [0], [0.2], tmp_path / "x", [])
    result = compare_module.compare(
        config, **STEPS, methods=["pissa", "full"], seeds=[0], noises=[0.0], output_dir=tmp_path / "cmp",
        eval_task="gsm8k", eval_limit=2, eval_max_new_tokens=4, full_learning_rate=0.05,
        diagnose_options={"drift_file": tmp_path / "train.json", "drift_samples": 4, "generations": 2,
                          "max_new_tokens": 4},
    )
    pissa, full = result["runs"]
    for run in (pissa, full):
        assert run["generation"]["n_problems"] == 2 and 0.0 <= run["generation"]["accuracy"] <= 1.0
        assert (Path(run["run_dir"]) / "eval-gsm8k" / "summary.json").is_file()
    assert pissa["diagnostics"]["drift_kl"] == pytest.approx(0.0, abs=1e-6)
    assert full["diagnostics"]["drift_kl"] > 1e-4 and full["diagnostics"]["perplexity_change"] != 0.0
    assert (Path(full["run_dir"]) / "model" / "config.json").is_file()
    rows_by_method = {row["method"]: row for row in result["summary"]}
    assert rows_by_method["full"]["eval_seconds"]["mean"] == pytest.approx(full["generation"]["total_s"])
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "## gsm8k_accuracy" in table and "benchmark eval (s)" in table and "Δ perplexity" in table
