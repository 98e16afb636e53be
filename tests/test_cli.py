"""`balora train / eval` end to end on tiny local models: the run directory, overrides, input errors, resume, Ctrl-C.

Runs go through `balora.cli.main([...])` in-process, as `balora ...` would run them; one check uses a real subprocess
(`python -m balora train --help`).
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from balora.cli import main

from cli_fixtures import (
    N_SST2_VALIDATION,
    REPO_ROOT,
    nlg_experiment,
    nlu_experiment,
    save_tiny_bert,
    save_tiny_llama,
    write_alpaca,
    write_sst2,
)

TERMS = ("task_loss", "consistency_loss", "diversity_loss", "svd_loss")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    train, validation = write_sst2(root / "sst2")
    return {
        "bert": save_tiny_bert(root / "bert"), "llama": save_tiny_llama(root / "llama"), "train": train,
        "validation": validation, "alpaca": write_alpaca(root / "alpaca"),
    }


def _nlu(tmp: Path, assets, name: str = "nlu", **kw) -> Path:
    return nlu_experiment(tmp, assets["bert"], assets["train"], assets["validation"], name=name, **kw)


def _read_json(path: Path):
    return json.loads(path.read_text())


def _train_steps(history: list[dict]) -> list[dict]:
    return [entry for entry in history if "loss" in entry]


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.std() > 0.01, "the plot is blank"


NLU_OVERRIDES = ["--balora.r", "4", "--training.learning_rate", "2e-2", "--data.max_train_samples", "32",
                 "--balora.consistency_weight", "0.5", "--data.label_noise", "0.25"]


@pytest.fixture(scope="module")
def nlu_run(assets, tmp_path_factory):
    """One NLU run of 4 steps with checkpoints every 2 steps and overrides on the command line (the file says r=2,
    lr=1e-2, all 40 rows, no label noise)."""
    tmp = tmp_path_factory.mktemp("nlu")
    config = _nlu(tmp, assets, training={"save_strategy": "steps", "save_steps": 2})
    assert main(["train", str(config), *NLU_OVERRIDES]) == 0
    return tmp / "nlu"


# ---------------------------------------------------------------- help


def test_python_m_balora_train_help_lists_keys_with_their_help():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "balora", "train", "--help"], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    consistency = next(line for line in lines if line.strip().startswith("consistency_weight"))
    assert "λ1" in consistency and "consistency" in consistency.split(":", 1)[1]
    learning_rate = next(line for line in lines if line.strip().startswith("learning_rate "))
    assert "learning rate" in learning_rate.lower()
    assert "--resume" in done.stdout and "--section.key value" in done.stdout


# ---------------------------------------------------------------- a training run and its directory


def test_nlu_train_writes_the_run_directory(nlu_run):
    for name in ("config.yaml", "metrics.json", "log_history.json", "train_loss.png", "README.md",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/balora_config.json",
                 "adapter/tokenizer.json", "checkpoint-2/trainer_state.json", "checkpoint-4/trainer_state.json"):
        assert (nlu_run / name).is_file(), name

    metrics = _read_json(nlu_run / "metrics.json")
    accuracy = metrics["metrics"]["eval_accuracy"]
    assert 0.0 <= accuracy <= 1.0
    assert accuracy * N_SST2_VALIDATION == pytest.approx(round(accuracy * N_SST2_VALIDATION))  # k of 24 rows
    assert metrics["data"]["validation"]["used"] == N_SST2_VALIDATION

    steps = _train_steps(_read_json(nlu_run / "log_history.json"))
    assert [entry["step"] for entry in steps] == [1, 2, 3, 4]
    for entry in steps:
        for term in TERMS:
            assert math.isfinite(entry[term]), (term, entry)
        assert entry["lambda_consistency"] == pytest.approx(0.5)
    assert metrics["final_terms"]["task_loss"] == pytest.approx(steps[-1]["task_loss"])
    _assert_png(nlu_run / "train_loss.png")

    card = (nlu_run / "README.md").read_text()
    assert "library_name: peft" in card
    assert f"| eval_accuracy | {accuracy:.4f} |" in card
    assert "rank r=4" in card and "2r = 8" in card and "label noise 0.25" in card


def test_label_noise_writes_the_flipped_rows(nlu_run):
    flipped = _read_json(nlu_run / "flipped_rows.json")
    assert flipped["count"] == round(0.25 * 32) == 8  # of the 32 rows kept by data.max_train_samples
    indices = flipped["flipped_indices"]
    assert len(set(indices)) == 8 and all(0 <= i < 32 for i in indices)
    assert flipped["p"] == 0.25 and flipped["seed"] == 0
    assert _read_json(nlu_run / "metrics.json")["data"]["train"]["flipped"] == 8


def test_overrides_change_the_resolved_config(nlu_run):
    resolved = yaml.safe_load((nlu_run / "config.yaml").read_text())
    assert resolved["balora"]["r"] == 4
    assert resolved["balora"]["consistency_weight"] == 0.5
    assert resolved["balora"]["diversity_weight"] == 0.03  # unset keys filled from the NLU preset
    assert resolved["balora"]["init"] == "pissa" and resolved["balora"]["task"] == "nlu"
    assert resolved["training"]["learning_rate"] == 0.02
    assert resolved["data"]["max_train_samples"] == 32 and resolved["data"]["label_noise"] == 0.25
    assert resolved["training"]["max_steps"] == 4  # from the file, untouched

    metrics = _read_json(nlu_run / "metrics.json")
    assert metrics["data"]["train"]["used"] == 32
    steps = _train_steps(_read_json(nlu_run / "log_history.json"))
    assert {entry["learning_rate"] for entry in steps} == {0.02}
    adapter = _read_json(nlu_run / "adapter" / "adapter_config.json")
    assert adapter["r"] == 8  # PiSSA: a plain LoRA of rank 2r on the original weights
    tensors = load_file(str(nlu_run / "adapter" / "adapter_model.safetensors"))
    assert {t.shape[0] for name, t in tensors.items() if "lora_A" in name} == {8}


def test_eval_run_reproduces_the_training_metrics(nlu_run, capsys):
    assert main(["eval", "--run", str(nlu_run)]) == 0
    trained = _read_json(nlu_run / "metrics.json")["metrics"]
    evaluated = _read_json(nlu_run / "eval-validation" / "metrics.json")
    assert evaluated["eval_accuracy"] == trained["eval_accuracy"]
    assert evaluated["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-4)
    assert f"eval_accuracy = {trained['eval_accuracy']:.4f}" in capsys.readouterr().out


def test_eval_config_evaluates_the_base_model(assets, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config = _nlu(tmp_path, assets)
    assert main(["eval", str(config)]) == 0
    got = _read_json(tmp_path / "nlu" / "eval-base-validation" / "metrics.json")
    assert not (tmp_path / "nlu" / "adapter").exists()

    model = AutoModelForSequenceClassification.from_pretrained(assets["bert"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(assets["bert"])
    rows = [json.loads(line) for line in assets["validation"].read_text().splitlines()]
    losses, correct = [], 0
    with torch.no_grad():
        for row in rows:
            logits = model(**tokenizer(row["sentence"], truncation=True, max_length=32, return_tensors="pt")).logits
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor([row["label"]])).item())
            correct += int(logits.argmax(-1).item() == row["label"])
    assert got["eval_accuracy"] == pytest.approx(correct / len(rows))
    assert got["eval_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_nlg_train_on_instruction_data(assets, tmp_path):
    config = nlg_experiment(tmp_path, assets["llama"], assets["alpaca"], training={"per_device_train_batch_size": 4})
    assert main(["train", str(config)]) == 0
    run = tmp_path / "nlg"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["task"] == "instruct" and resolved["balora"]["task"] == "nlg"
    assert resolved["balora"]["regularizer_schedule"] == "two_phase"  # NLG preset
    assert _read_json(run / "adapter" / "adapter_config.json")["r"] == 4
    stats = _read_json(run / "metrics.json")["data"]["train"]
    assert stats["format"] == "alpaca" and stats["kept"] == 24 and stats["supervised_tokens"] > 0

    steps = _train_steps(_read_json(run / "log_history.json"))
    assert [entry["step"] for entry in steps] == [1, 2, 3, 4]
    # two_phase: λ2 = λ3 = 0 for the first 20 % of steps (step 1 of 4), so those terms are not computed there
    assert steps[0]["lambda_diversity"] == 0 and "diversity_loss" not in steps[0]
    for entry in steps[1:]:
        assert entry["lambda_diversity"] > 0
        for term in TERMS:
            assert math.isfinite(entry[term]), (term, entry)
    _assert_png(run / "train_loss.png")


# ---------------------------------------------------------------- bad input: exit 2, a message, nothing trained


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the config is invalid")

    monkeypatch.setattr("balora.models.load_model", refuse)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["--balora.consistancy_weight", "0.1"], ["balora.consistancy_weight", "did you mean 'consistency_weight'"]),
        (["--trainig.seed", "1"], ["'trainig'", "did you mean 'training'"]),
        (["--training.learning_rat", "0.1"], ["training.learning_rat", "did you mean 'learning_rate'"]),
        (["--balora.r", "two"], ["balora.r = 'two'", "wrong type", "int"]),
        (["--data.template", "alpacca"], ["data.template = 'alpacca'", "wrong type"]),
        (["--balora.target_modules", "[1, 2]"], ["balora.target_modules", "wrong type"]),
        (["--balora.r", "0"], ["balora", "r must be an integer >= 1; got 0"]),
        (["--data.label_noise", "1.5"], ["data.label_noise must be in [0, 1); got 1.5"]),
        (["--balora.temperature", "-1"], ["balora", "temperature must be > 0"]),
        (["--training.lr_scheduler_type", "cosinee"], ["training:", "cosinee"]),
        (["--balora.r"], ["'--balora.r' has no value"]),
    ],
)
def test_bad_config_exits_2_before_any_model_loads(assets, tmp_path, capsys, no_model_load, overrides, expected):
    config = _nlu(tmp_path, assets)
    assert main(["train", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("balora: error: ")
    for text in expected:
        assert text in err, (text, err)
    assert not (tmp_path / "nlu").exists()


def test_missing_config_file_exits_2(tmp_path, capsys, no_model_load):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml" in err and "does not exist" in err


def test_missing_model_path_exits_2(assets, tmp_path, capsys):
    config = nlu_experiment(tmp_path, tmp_path / "no" / "such-model", assets["train"], assets["validation"])
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "no/such-model" in err and "does not exist" in err
    assert not (tmp_path / "nlu").exists()  # a failed run leaves no folder


def test_malformed_data_row_names_file_and_line(assets, tmp_path, capsys):
    lines = assets["train"].read_text().splitlines()
    lines[4] = json.dumps({"sentence": "a fine film", "label": "positive"})
    bad = tmp_path / "bad_train.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    config = nlu_experiment(tmp_path, assets["bert"], bad, assets["validation"])
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}, line 5" in err and "'positive'" in err and "skip_bad_rows" in err
    assert not (tmp_path / "nlu").exists()


# ---------------------------------------------------------------- resume and interruption


def test_resume_continues_from_the_checkpoint(assets, nlu_run, tmp_path, monkeypatch):
    """Stop the run of `nlu_run` after step 2, resume it to step 4: the result is the uninterrupted run."""
    from balora.trainer import BALoRATrainer

    config = _nlu(tmp_path, assets, training={"save_strategy": "steps", "save_steps": 2})
    assert main(["train", str(config), *NLU_OVERRIDES, "--training.max_steps", "2"]) == 0  # "interrupted"
    run = tmp_path / "nlu"
    assert (run / "checkpoint-2" / "trainer_state.json").is_file()

    started_at: list[int] = []
    original = BALoRATrainer.training_step

    def counting_step(self, *args, **kwargs):
        started_at.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BALoRATrainer, "training_step", counting_step)
    assert main(["train", str(config), *NLU_OVERRIDES, "--training.max_steps", "4", "--resume"]) == 0
    assert started_at == [2, 3]  # only the two missing steps ran: a restart would start at 0

    history = _train_steps(_read_json(run / "log_history.json"))
    assert [entry["step"] for entry in history] == [1, 2, 3, 4]
    whole = _train_steps(_read_json(nlu_run / "log_history.json"))
    for resumed, straight in zip(history, whole, strict=True):  # weights, optimizer and data order were restored
        assert resumed["task_loss"] == pytest.approx(straight["task_loss"], rel=1e-5)
    got = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(nlu_run / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_resume_without_a_checkpoint_exits_2(assets, tmp_path, capsys, no_model_load):
    assert main(["train", str(_nlu(tmp_path, assets)), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "no checkpoint" in err and str(tmp_path / "nlu") in err
    assert not (tmp_path / "nlu").exists()


def test_ctrl_c_exits_130_and_points_to_resume(assets, tmp_path, capsys, monkeypatch):
    from balora.trainer import BALoRATrainer

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(BALoRATrainer, "train", interrupted)
    assert main(["train", str(_nlu(tmp_path, assets))]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" in err
    assert not (tmp_path / "nlu").exists()  # no checkpoint was written: nothing to resume, nothing left
