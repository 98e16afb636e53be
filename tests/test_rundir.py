"""The two layers under the commands: the run directory (claim, write, load back) and the typed preparation step;
and the dependency graph that keeps the commands side by side."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from balora import rundir
from balora.experiment import ConfigError, load_experiment
from balora.io import atomic_dir, read_rows
from balora.losses import IGNORE_INDEX
from balora.prepare import Prepared, load_model_for, prepare

import cli_fixtures as fx

SRC = Path(__file__).resolve().parents[1] / "src" / "balora"
COMMANDS = {"train", "evaluate", "diagnose", "compare", "demo"}


# ---------------------------------------------------------------- the dependency graph


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_commands_stand_side_by_side():
    modules = {p.relative_to(SRC).with_suffix("").as_posix().replace("/", "."): p for p in SRC.rglob("*.py")}
    assert COMMANDS <= modules.keys()
    for name in COMMANDS:
        imported = _imports(modules[name])
        others = {f"balora.{c}" for c in COMMANDS - {name}}
        assert not imported & others, f"command {name} imports {imported & others}"
    with_argparse = {name for name, path in modules.items() if "argparse" in _imports(path)}
    assert with_argparse == {"cli"}
    outside_eval = {name: _imports(path) for name, path in modules.items() if not name.startswith("eval.")}
    assert not [name for name, imported in outside_eval.items() if any(i.startswith("balora.eval.files")
                                                                       for i in imported)]
    for name in ("train", "evaluate", "diagnose"):  # each stands on the two lower layers
        assert {"balora.rundir", "balora.prepare"} & _imports(modules[name]), name


# ---------------------------------------------------------------- claiming a run directory


def test_check_claim_rules(tmp_path: Path):
    free, empty, taken, file = tmp_path / "free", tmp_path / "empty", tmp_path / "taken", tmp_path / "file"
    empty.mkdir()
    taken.mkdir()
    (taken / "metrics.json").write_text("{}")
    file.write_text("x")
    rundir.check_claim(free)
    rundir.check_claim(empty)
    rundir.check_claim(taken, overwrite=True)
    with pytest.raises(ConfigError, match=r"is not empty \(it holds metrics.json\).*--overwrite.*--resume"):
        rundir.check_claim(taken)
    with pytest.raises(ConfigError, match="is a file"):
        rundir.check_claim(file)
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        rundir.check_claim(taken, resume=True)
    with pytest.raises(ConfigError, match="pass one of them"):
        rundir.check_claim(taken, resume=True, overwrite=True)
    (taken / "checkpoint-2").mkdir()
    (taken / "checkpoint-2" / "trainer_state.json").write_text("{}")
    rundir.check_claim(taken, resume=True)


def test_a_failed_fresh_run_leaves_nothing_unless_it_wrote_a_checkpoint(tmp_path: Path):
    run = tmp_path / "a" / "run"
    with pytest.raises(RuntimeError, match="boom"), rundir.claimed(run):
        (run / "config.yaml").write_text("x")
        raise RuntimeError("boom")
    assert not run.exists()
    with pytest.raises(KeyboardInterrupt), rundir.claimed(run):
        (run / "checkpoint-1").mkdir()
        (run / "checkpoint-1" / "trainer_state.json").write_text("{}")
        raise KeyboardInterrupt
    assert (run / "checkpoint-1" / "trainer_state.json").is_file()  # kept for --resume


def test_overwrite_removes_the_old_run_first_and_resume_failure_touches_nothing(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-8").mkdir()
    (run / "checkpoint-8" / "trainer_state.json").write_text("{}")
    (run / "config.yaml").write_text("old")
    with pytest.raises(RuntimeError), rundir.claimed(run, resume=True):
        raise RuntimeError("resumed run failed")
    assert (run / "config.yaml").read_text() == "old"
    with rundir.claimed(run, overwrite=True):
        assert list(run.iterdir()) == []  # the old run's checkpoint cannot be resumed by mistake
        (run / "config.yaml").write_text("new")
    assert [p.name for p in run.iterdir()] == ["config.yaml"]


def test_atomic_dir_uses_a_unique_name_and_keeps_siblings(tmp_path: Path):
    sibling = tmp_path / "out.tmp"
    sibling.mkdir()
    (sibling / "mine.txt").write_text("keep")
    with atomic_dir(tmp_path / "out") as tmp:
        assert tmp.parent == tmp_path and tmp != sibling and tmp.name.startswith(".out.")
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    assert (sibling / "mine.txt").read_text() == "keep"
    with pytest.raises(ValueError), atomic_dir(tmp_path / "other"):
        raise ValueError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp"]  # nothing half-written left


def test_read_rows_names_file_and_position(tmp_path: Path):
    good = tmp_path / "g.jsonl"
    good.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_rows(good) == [(1, {"a": 1}), (3, {"a": 2})]
    listed = tmp_path / "l.jsonl"
    listed.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"l\.jsonl:2: each line must be a JSON object, got list"):
        read_rows(listed)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"a": "café"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8 text.*save it as UTF-8"):
        read_rows(latin)
    with pytest.raises(ValueError, match="is a directory, not a file"):
        read_rows(tmp_path)


# ---------------------------------------------------------------- preparation and the run directory round trip


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("rundir-assets")
    train, validation = fx.write_sst2(root / "sst2")
    return {"root": root, "bert": fx.save_tiny_bert(root / "bert"), "llama": fx.save_tiny_llama(root / "llama"),
            "train": train, "validation": validation, "alpaca": fx.write_alpaca(root / "alpaca", n=8)}


def test_prepare_nlu_gives_typed_datasets_collator_metrics_and_flipped_rows(assets, tmp_path: Path):
    from balora.data.glue import GLUE_TASKS, load_glue
    from balora.data.noise import apply_label_noise

    config = fx.nlu_experiment(tmp_path, assets["bert"], assets["train"], assets["validation"],
                            data={"label_noise": 0.25})
    experiment, _ = load_experiment(config)
    prepared = prepare(experiment)
    assert isinstance(prepared, Prepared) and prepared.spec is GLUE_TASKS["sst2"]
    assert len(prepared.train) == fx.N_SST2_TRAIN and list(prepared.eval) == ["validation"]
    splits, _ = load_glue("sst2", train_file=str(assets["train"]), validation_file=str(assets["validation"]), seed=0)
    _, flipped = apply_label_noise(splits["train"], 0.25, 2, 0)
    assert prepared.flipped == flipped and len(flipped) == 10 and prepared.stats["train"]["flipped"] == 10
    clean = [row["label"] for row in splits["train"]]
    noisy = prepared.train["labels"]
    assert [i for i in range(len(clean)) if clean[i] != noisy[i]] == flipped
    batch = prepared.collator([prepared.eval["validation"][i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 3 and batch["attention_mask"].shape == batch["input_ids"].shape
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    from transformers import EvalPrediction

    scored = prepared.compute_metrics(EvalPrediction(predictions=logits.numpy(), label_ids=[1, 1, 1, 0]))
    assert scored["accuracy"] == pytest.approx(0.75)
    # the fresh head is seeded: loading twice gives the same model
    again, _ = load_model_for(experiment)
    torch.testing.assert_close(again.state_dict(), prepared.model.state_dict())


def test_prepare_nlg_masks_the_prompt(assets, tmp_path: Path):
    config = fx.nlg_experiment(tmp_path, assets["llama"], assets["alpaca"])
    prepared = prepare(load_experiment(config)[0])
    assert prepared.spec is None and prepared.compute_metrics is None and prepared.eval == {}
    assert len(prepared.train) == 8 and prepared.stats["train"]["kept"] == 8
    batch = prepared.collator([prepared.train[i] for i in range(2)])
    labels = batch["labels"]
    assert labels.shape == batch["input_ids"].shape
    supervised = labels != IGNORE_INDEX
    assert supervised.any(dim=1).all() and not supervised[:, 0].any()  # the prompt is never a target
    torch.testing.assert_close(labels[supervised], batch["input_ids"][supervised])


def test_run_directory_round_trip(assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Train, then load the run back: the loaded model gives the trained model's logits; the files are complete."""
    import balora.train

    config = fx.nlu_experiment(tmp_path, assets["bert"], assets["train"], assets["validation"],
                            balora={"method": "balora", "r": 2}, training={"learning_rate": 5e-2})
    experiment, _ = load_experiment(config)
    captured = []
    original = balora.train.adapt

    def capture(*args):
        captured.append(original(*args))
        return captured[-1]

    monkeypatch.setattr(balora.train, "adapt", capture)
    result = balora.train.train_experiment(experiment)
    run = Path(result.run_dir)
    for name in (rundir.CONFIG, rundir.METRICS, rundir.LOG_HISTORY, rundir.PLOT, rundir.CARD,
                 f"{rundir.ADAPTER}/adapter_config.json"):
        assert (run / name).is_file(), name
    assert not [p for p in run.iterdir() if p.name.startswith(".")], "a temporary file or folder was left"
    assert rundir.is_finished(run)
    saved = json.loads((run / rundir.METRICS).read_text())
    assert saved["metrics"] == result.metrics and saved["final_terms"] == result.final_terms

    trained = captured[0][0].eval()
    loaded = rundir.load_run(run)
    assert loaded.experiment.to_dict()["data"] == experiment.to_dict()["data"]
    inputs = loaded.tokenizer(["a fine film", "the plot is dull and long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).logits, trained(**inputs).logits, atol=1e-5, rtol=1e-4)
        with rundir.pretrained_view(loaded.model) as pretrained:
            moved = (pretrained(**inputs).logits - trained(**inputs).logits).abs().max()
    assert moved > 1e-3  # the adapter has moved, so the equality above could fail
