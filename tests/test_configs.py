"""Every experiment under configs/ parses and validates (no model loads) and is headed by the command that runs it.

The files are found when the tests are collected, so a new config is checked without touching this file. Launcher
configs (accelerate, DeepSpeed), if any, are only parsed as plain YAML/JSON; lm-evaluation-harness task files
(configs/lm_eval/) are checked for their header command and local data.
"""

from __future__ import annotations

import inspect
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from balora.cli import DEMO_CONFIG, build_parser
from balora.experiment import load_experiment
from balora.prepare import task_spec_for

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
LAUNCHER_DIRS = {"accelerate", "deepspeed"}
LM_EVAL_DIR = CONFIGS / "lm_eval"
LAUNCHER_KEYS = {"compute_environment", "distributed_type", "zero_optimization", "deepspeed_config"}
COMMANDS_WITH_A_CONFIG = {"train", "eval", "compare"}


def _is_launcher(path: Path) -> bool:
    if LAUNCHER_DIRS & {part.lower() for part in path.relative_to(CONFIGS).parts[:-1]}:
        return True
    if path.suffix == ".json":
        return True
    try:
        head = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return False  # reported by the experiment test, not at collection
    return isinstance(head, dict) and bool(LAUNCHER_KEYS & set(head))


ALL_YAML = sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))
LM_EVAL_TASKS = [p for p in ALL_YAML if p.is_relative_to(LM_EVAL_DIR)]
EXPERIMENTS = [p for p in ALL_YAML if not _is_launcher(p) and p not in LM_EVAL_TASKS]
LAUNCHERS = [p for p in ALL_YAML + sorted(CONFIGS.rglob("*.json")) if _is_launcher(p)]


def _id(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


def _load(path: Path, overrides: list[str]):
    # GPU experiments (bf16) are validated here as if bf16/fp16 were off, where the loader can do that.
    extra = {"check_hardware": False} if "check_hardware" in inspect.signature(load_experiment).parameters else {}
    return load_experiment(path, overrides, **extra)


def test_configs_are_found():
    assert (CONFIGS / "demo.yaml") in EXPERIMENTS
    assert any(p.parent.name == "nlu" for p in EXPERIMENTS) and any(p.parent.name == "nlg" for p in EXPERIMENTS)


def header_command(path: Path) -> list[str]:
    """The command on the file's first line, e.g. `# balora train configs/x.yaml --data.task rte  (a remark)`."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("# balora "), f"{_id(path)}: first line must be `# balora ...`, the command that runs it"
    command = re.split(r"\s{2,}|\s\(", first[2:].strip())[0]  # text after two spaces or a '(' is a remark
    return shlex.split(command)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=_id)
def test_experiment_parses_and_its_header_runs_it(path, monkeypatch):
    words = header_command(path)
    args, rest = build_parser().parse_known_args(words[1:])
    if args.command in COMMANDS_WITH_A_CONFIG:
        assert args.config == _id(path), f"the header runs {args.config}, not this file"
    elif args.command == "demo":
        assert Path(args.config) == DEMO_CONFIG == path
    else:
        pytest.fail(f"{_id(path)}: header command {words[1]!r} does not run an experiment file")

    def refuse(*a, **kw):
        raise AssertionError("parsing a config must not load a model")

    monkeypatch.setattr("balora.models.load_model", refuse)
    experiment, _ = _load(path, rest)  # the header's own overrides must be valid too
    if not experiment.is_nlg:
        task_spec_for(experiment)  # a known GLUE task, or 'classification' with its fields
    for name in ("train_file", "validation_file"):
        value = getattr(experiment.data, name)
        if value is not None and Path(value).parts[0] == "data":  # bundled data must exist
            assert (REPO_ROOT / value).is_file(), f"{_id(path)}: data.{name} {value} does not exist"


@pytest.mark.parametrize("path", LAUNCHERS, ids=_id)
def test_launcher_config_parses(path):
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    assert isinstance(data, dict) and data
    first = text.splitlines()[0]
    if first.startswith("# accelerate launch"):  # the example command must use this file and a real experiment
        words = shlex.split(first[2:])
        assert words[words.index("--config_file") + 1] == _id(path)
        for word in words:
            if word.startswith("configs/") and word != _id(path):
                assert (REPO_ROOT / word).is_file(), f"{_id(path)}: its command names {word}, which does not exist"


@pytest.mark.parametrize("path", LM_EVAL_TASKS, ids=_id)
def test_lm_eval_task_is_local_and_headed_by_its_command(path):
    """A task for `lm_eval --include_path configs/lm_eval`: its header runs it, its data is a bundled file (so it
    runs offline from the repository root; tests/test_lm_eval.py runs them)."""
    task = yaml.safe_load(path.read_text())
    words = shlex.split(path.read_text().splitlines()[0][2:])
    assert words[0] == "lm_eval" and words[words.index("--include_path") + 1] == _id(path.parent)
    assert words[words.index("--tasks") + 1] == task["task"]
    assert task["dataset_path"] == "json"
    for file in task["dataset_kwargs"]["data_files"].values():
        assert (REPO_ROOT / file).is_file(), f"{_id(path)}: data file {file} does not exist"
