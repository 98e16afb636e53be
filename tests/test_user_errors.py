"""Each case a new user ran into, through `balora.cli.main`: run folders are never clobbered, and every input error
exits 2 with one message that names the problem and the fix (no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from balora.cli import main

from cli_fixtures import nlu_experiment, save_tiny_bert, write_sst2

HUMANEVAL = Path(__file__).parent / "eval" / "humaneval_fixture.jsonl"  # task ids Fixture/0..3


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    train, validation = write_sst2(root / "sst2")
    return {"bert": save_tiny_bert(root / "bert"), "train": train, "validation": validation}


def _nlu(tmp: Path, assets, name: str = "nlu", **kw) -> Path:
    return nlu_experiment(tmp, assets["bert"], assets["train"], assets["validation"], name=name, **kw)


def _error(capsys) -> str:
    """The error message: the last stderr line (progress bars may come before it); no traceback anywhere."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("balora: error: "), err
    return last


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A finished run of 4 steps with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("finished")
    config = _nlu(tmp, assets, training={"save_strategy": "steps", "save_steps": 2})
    assert main(["train", str(config)]) == 0
    return config, tmp / "nlu"


# ---------------------------------------------------------------- run folders are never clobbered


def test_training_twice_into_one_folder_is_refused(finished, capsys):
    config, run = finished
    before = _snapshot(run)
    assert main(["train", str(config), "--training.max_steps", "2"]) == 2
    err = _error(capsys)
    assert f"output_dir {run} is not empty" in err and "--overwrite" in err and "--resume" in err
    assert _snapshot(run) == before


def test_overwrite_replaces_the_old_run_and_its_checkpoints(assets, tmp_path, capsys):
    config = _nlu(tmp_path, assets, training={"save_strategy": "steps", "save_steps": 2})
    assert main(["train", str(config)]) == 0
    run = tmp_path / "nlu"
    assert (run / "checkpoint-4").is_dir()
    assert main(["train", str(config), "--overwrite", "--training.max_steps", "2",
                 "--training.save_strategy", "no"]) == 0
    assert not list(run.glob("checkpoint-*")), "the old run's checkpoints would be picked up by a later --resume"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["training"]["max_steps"] == 2 and saved["training"]["save_strategy"] == "no"
    history = json.loads((run / "log_history.json").read_text())
    assert max(entry["step"] for entry in history) == 2
    assert main(["train", str(config), "--resume"]) == 2
    assert "holds no checkpoint" in _error(capsys)


def test_a_failed_resume_never_touches_the_finished_run(finished, monkeypatch, capsys):
    from balora.trainer import BALoRATrainer

    config, run = finished
    before = _snapshot(run)

    def crash(self, *args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(BALoRATrainer, "train", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["train", str(config), "--resume", "--training.max_steps", "8", "--balora.r", "3"])
    assert _snapshot(run) == before


def test_a_failed_run_leaves_no_folder(assets, tmp_path, monkeypatch):
    from balora.trainer import BALoRATrainer

    def crash(self, *args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(BALoRATrainer, "train", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["train", str(_nlu(tmp_path, assets))])
    assert not (tmp_path / "nlu").exists()


def test_export_keeps_a_sibling_named_like_its_temporary_folder(finished, tmp_path):
    _, run = finished
    sibling = tmp_path / "out.tmp"
    sibling.mkdir()
    (sibling / "notes.txt").write_text("mine")
    assert main(["export", str(run), "--to", "lora", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert (sibling / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp"]


def test_export_to_a_file_exits_2(finished, tmp_path, capsys):
    _, run = finished
    target = tmp_path / "taken.bin"
    target.write_text("data")
    assert main(["export", str(run), "--to", "merged", str(target)]) == 2
    assert f"{target} is a file" in _error(capsys)
    assert target.read_text() == "data"


# ---------------------------------------------------------------- short runs and YAML 1.1 words


def test_a_run_shorter_than_its_logging_interval_logs_and_plots(assets, tmp_path):
    config = _nlu(tmp_path, assets, training={"max_steps": 3, "logging_steps": 5})
    assert main(["train", str(config)]) == 0
    run = tmp_path / "nlu"
    steps = [entry for entry in json.loads((run / "log_history.json").read_text()) if "loss" in entry]
    assert [entry["step"] for entry in steps] == [3]
    final = json.loads((run / "metrics.json").read_text())["final_terms"]
    assert final["task_loss"] == pytest.approx(steps[0]["task_loss"]) and "consistency_loss" in final
    assert (run / "train_loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("word", "flag"), [("no", False), ("No", False), ("off", False), ("yes", True)])
def test_yaml_11_words_stay_strings_for_string_fields(assets, tmp_path, word, flag):
    """`no` is transformers' own spelling of save_strategy; YAML 1.1 would read it as False (a wrong type)."""
    from balora.experiment import load_experiment

    config = _nlu(tmp_path, assets)
    experiment, raw = load_experiment(config, ["--training.save_strategy", "no", "--training.report_to", "none",
                                               "--data.skip_bad_rows", word, "--training.disable_tqdm", word])
    assert experiment.training["save_strategy"] == "no" and experiment.training["report_to"] == "none"
    assert experiment.data.skip_bad_rows is flag and experiment.training["disable_tqdm"] is flag  # bool fields
    assert raw["data"]["skip_bad_rows"] is flag


# ---------------------------------------------------------------- bad input: exit 2, one message, nothing left


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the input is invalid")

    monkeypatch.setattr("balora.models.load_model", refuse)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["--training.learning_rate", "-1e-4"], "training.learning_rate must be a number >= 0; got -0.0001"),
    (["--training.weight_decay", "-0.1"], "training.weight_decay must be a number >= 0"),
])
def test_negative_rates_exit_2_before_any_model_loads(assets, tmp_path, capsys, no_model_load, overrides, expected):
    assert main(["train", str(_nlu(tmp_path, assets)), *overrides]) == 2
    assert expected in _error(capsys)
    assert not (tmp_path / "nlu").exists()


@pytest.mark.parametrize(("overrides", "expected"), [
    (["--balora.r", "64"], "rank r=64 is larger than min(out, in)=32"),
    (["--balora.target_modules", "[q_proj, v_proj]"], "matches no module of this BertForSequenceClassification"),
])
def test_adapter_settings_the_model_cannot_take_exit_2(assets, tmp_path, capsys, overrides, expected):
    assert main(["train", str(_nlu(tmp_path, assets)), *overrides]) == 2
    err = _error(capsys)
    assert expected in err and err.startswith("balora: error: balora: ")
    assert not (tmp_path / "nlu").exists()


def test_config_file_that_is_not_utf8_or_a_folder_exits_2(assets, tmp_path, capsys, no_model_load):
    config = _nlu(tmp_path, assets)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(config.read_bytes() + "# réglages\n".encode("latin-1"))
    assert main(["train", str(latin)]) == 2
    assert f"config file {latin} is not UTF-8 text" in _error(capsys)
    assert main(["train", str(tmp_path)]) == 2
    err = _error(capsys)
    assert "is a directory, not a file" in err and "does not exist" not in err


def test_data_file_that_is_not_utf8_or_a_folder_exits_2(assets, tmp_path, capsys):
    latin = tmp_path / "train.jsonl"
    latin.write_bytes('{"sentence": "un film magnifique, très réussi", "label": 1}\n'.encode("latin-1"))
    config = nlu_experiment(tmp_path, assets["bert"], latin, assets["validation"])
    assert main(["train", str(config)]) == 2
    assert f"data file {latin} is not UTF-8 text" in _error(capsys)
    config = nlu_experiment(tmp_path, assets["bert"], tmp_path, assets["validation"], name="dir")
    assert main(["train", str(config)]) == 2
    assert "is a directory, not a file" in _error(capsys)
    assert not (tmp_path / "nlu").exists() and not (tmp_path / "dir").exists()


@pytest.mark.parametrize(("rows", "expected"), [
    ('{"task_id": "Fixture/0", "completion": "x"}\n{"task_id": \n', "s.jsonl:2: not valid JSON"),
    ('["Fixture/0", "x"]\n', "s.jsonl:1: each line must be a JSON object, got list"),
    ('{"task_id": "Fixture/0", "output": "x"}\n', "s.jsonl:1: a sample row needs `completion`"),
    ('{"task_id": "Fixture/999", "completion": "x"}\n', "s.jsonl:1: task_id 'Fixture/999' is not a problem"),
])
def test_malformed_samples_exit_2(tmp_path, capsys, rows, expected):
    samples = tmp_path / "s.jsonl"
    samples.write_text(rows)
    assert main(["eval", "--samples", str(samples), "--task", "humaneval", "--data-file", str(HUMANEVAL),
                 "--output-dir", str(tmp_path / "o")]) == 2
    assert expected in _error(capsys)
    assert not (tmp_path / "o").exists()


def test_humaneval_without_data_offline_exits_2(tmp_path, capsys, monkeypatch):
    from balora.eval import problems

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(problems, "DATA_DIR", tmp_path)  # no bundled HumanEval
    samples = tmp_path / "s.jsonl"
    samples.write_text('{"task_id": "HumanEval/0", "completion": "x"}\n')
    assert main(["eval", "--samples", str(samples), "--task", "humaneval", "--output-dir", str(tmp_path / "o")]) == 2
    err = _error(capsys)
    assert "no local data for task 'humaneval'" in err and "data_file" in err
