"""`balora.experiment`: YAML experiments, dotted overrides, and the checks that run before any model loads."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

import pytest
import yaml

from balora.config import BALoRAConfig
from balora.experiment import (
    SECTIONS,
    ConfigError,
    DataSection,
    ModelSection,
    apply_overrides,
    build_experiment,
    help_text,
    load_experiment,
    training_fields,
)


def _raw(**sections):
    raw = {"model": {"name": "minilm"}, "data": {"task": "sst2"}, "balora": {"r": 4},
           "training": {"max_steps": 2, "report_to": []}, "output_dir": "runs/x"}
    for key, value in sections.items():
        if isinstance(raw.get(key), dict) and isinstance(value, dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def _error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        build_experiment(raw)
    return str(info.value)


# ---------------------------------------------------------------- overrides


def test_overrides_set_dotted_keys_with_yaml_typed_values():
    raw = _raw()
    out = apply_overrides(raw, [
        "--balora.r", "16", "--training.learning_rate", "1e-4", "--training.bf16", "true",
        "--balora.target_modules", "[query, value]", "--data.validation_file", "null", "--model.name", "./m",
        "--output_dir", "runs/y", "--training.warmup-steps", "0.1", "--balora.alpha", "2.5e1",
    ])
    assert out["balora"]["r"] == 16 and type(out["balora"]["r"]) is int
    assert out["training"]["learning_rate"] == 1e-4 and type(out["training"]["learning_rate"]) is float
    assert out["balora"]["alpha"] == 25.0
    assert out["training"]["bf16"] is True
    assert out["balora"]["target_modules"] == ["query", "value"]
    assert out["data"]["validation_file"] is None and "validation_file" in out["data"]
    assert out["model"]["name"] == "./m" and out["output_dir"] == "runs/y"
    assert out["training"]["warmup_steps"] == 0.1  # dashes in a flag mean underscores
    assert out["training"]["max_steps"] == 2  # untouched keys stay
    assert raw == _raw()  # the input mapping is not modified


def test_overrides_create_a_missing_section():
    out = apply_overrides({"output_dir": "o"}, ["--training.seed", "3"])
    assert out == {"output_dir": "o", "training": {"seed": 3}}


def test_a_number_without_a_dot_in_the_file_is_a_float(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(_raw()).replace("max_steps: 2", "max_steps: 2\n  learning_rate: 3e-4"))
    experiment, raw = load_experiment(path)
    assert experiment.training["learning_rate"] == pytest.approx(3e-4)
    assert experiment.training_arguments().learning_rate == pytest.approx(3e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--balora.r"], "'--balora.r' has no value"),
        (["balora.r", "4"], "expected an override like --training.seed 1; got 'balora.r'"),
        (["--", "4"], "expected an override like"),
        (["--balora", "4"], "must name a section and key"),
        (["--balora.r.x", "4"], "must name a section and key"),
        (["--output_dir.x", "4"], "must name a section and key"),
        (["--trainig.seed", "1"], "unknown section 'trainig' in '--trainig.seed'; did you mean 'training'?"),
        (["--zzz.seed", "1"], "unknown section 'zzz'"),
    ],
)
def test_malformed_overrides(overrides, message):
    with pytest.raises(ConfigError) as info:
        apply_overrides(_raw(), overrides)
    assert message in str(info.value)
    if "zzz" in message:
        assert "did you mean" not in str(info.value)


def test_override_into_a_section_that_is_not_a_mapping():
    with pytest.raises(ConfigError, match="section 'balora' is not a mapping"):
        apply_overrides(_raw(balora=[1, 2]), ["--balora.r", "4"])


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_raw(balora={"consistancy_weight": 0.1}),
         "unknown key balora.consistancy_weight; did you mean 'consistency_weight'?"),
        (_raw(data={"max_len": 64}), "unknown key data.max_len; did you mean 'max_length'?"),
        (_raw(model={"dtyp": "float32"}), "unknown key model.dtyp; did you mean 'dtype'?"),
        (_raw(training={"learning_rat": 0.1}), "unknown key training.learning_rat; did you mean 'learning_rate'?"),
        (_raw(ouput_dir="x"), "unknown top-level key 'ouput_dir'; did you mean 'output_dir'?"),
        (_raw(training={"output_dir": "elsewhere"}), "unknown key training.output_dir"),  # set by output_dir
    ],
)
def test_unknown_keys_name_the_closest_known_key(raw, message):
    assert message in _error(raw)


def test_no_suggestion_when_nothing_is_close():
    message = _error(_raw(balora={"qqqqqq": 1}))
    assert "unknown key balora.qqqqqq" in message and "did you mean" not in message


# ---------------------------------------------------------------- types and ranges


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_raw(balora={"r": "eight"}), "balora.r = 'eight' has the wrong type; expected int"),
        (_raw(balora={"r": True}), "balora.r = True has the wrong type"),  # a bool is not an int
        (_raw(balora={"r": 4.0}), "balora.r = 4.0 has the wrong type"),
        (_raw(balora={"method": "qlora"}), "balora.method = 'qlora' has the wrong type; expected Literal"),
        (_raw(model={"dtype": "float64"}), "model.dtype = 'float64' has the wrong type"),
        (_raw(balora={"target_modules": [1, 2]}), "balora.target_modules = [1, 2] has the wrong type"),
        (_raw(data={"text_fields": "sentence"}), "data.text_fields = 'sentence' has the wrong type"),
        (_raw(data={"skip_bad_rows": "yes please"}), "data.skip_bad_rows = 'yes please' has the wrong type"),
        (_raw(training={"seed": "x"}), "training.seed = 'x' has the wrong type"),
        (_raw(training={"learning_rate": "fast"}), "training.learning_rate = 'fast' has the wrong type"),
        (_raw(balora=[1]), "section 'balora' must be a mapping"),
        (_raw(training=[1]), "section 'training' must be a mapping"),
    ],
)
def test_wrong_types_name_key_value_and_expected_type(raw, message):
    assert message in _error(raw)


@pytest.mark.parametrize(
    "sections",
    [
        {"balora": {"target_modules": "all-linear", "temperature": 2, "init_niter": None, "alpha": 16}},
        {"balora": {"target_modules": ["query", "value"], "init_niter": 4, "method": "pissa"}},
        {"data": {"text_fields": ["a", "b"], "num_labels": None, "template": "chat", "format": "gsm8k"}},
        {"model": {"dtype": "bfloat16", "trust_remote_code": True}},
        {"training": {"learning_rate": 1, "report_to": ["none"], "seed": 3}},  # an int is a valid float
    ],
)
def test_right_types_are_accepted(sections):
    experiment = build_experiment(_raw(**sections))
    for section, values in sections.items():
        for key, value in values.items():
            got = experiment.training[key] if section == "training" else getattr(getattr(experiment, section), key)
            assert got == value


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_raw(balora={"r": 0}), "balora: r must be an integer >= 1; got 0"),
        (_raw(balora={"dropout": 1.0}), "balora: dropout must be in [0, 1)"),
        (_raw(balora={"method": "pissa", "svd_weight": 0.1}), "balora: method='pissa' trains without regularizers"),
        (_raw(data={"max_length": 4}), "data.max_length must be >= 8; got 4"),
        (_raw(data={"label_noise": 1.0}), "data.label_noise must be in [0, 1); got 1.0"),
        (_raw(data={"max_train_samples": 0}), "data.max_train_samples must be >= 1 or null; got 0"),
        (_raw(output_dir=None), "output_dir is missing"),
        (_raw(output_dir=""), "output_dir is missing"),
    ],
)
def test_out_of_range_values_name_the_key(raw, message):
    assert message in _error(raw)


@pytest.mark.parametrize(
    ("training", "needle"),
    [
        ({"lr_scheduler_type": "cosinee"}, "cosinee"),
        ({"eval_strategy": "sometimes"}, "sometimes"),
        ({"load_best_model_at_end": True, "eval_strategy": "steps", "save_strategy": "epoch"},
         "load_best_model_at_end"),
    ],
)
def test_training_arguments_errors_are_config_errors_naming_training(training, needle):
    message = _error(_raw(training=training))
    assert message.startswith("training: ") and needle in message


def test_not_a_mapping():
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        build_experiment([1, 2])


def test_load_experiment_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_experiment(bad)


def test_experiment_round_trips_through_to_dict():
    experiment = build_experiment(_raw(data={"task": "instruct", "train_file": "t.json"}))
    assert experiment.is_nlg and not build_experiment(_raw()).is_nlg
    again = build_experiment(yaml.safe_load(yaml.safe_dump(experiment.to_dict())))
    assert again == experiment
    assert isinstance(experiment.balora, BALoRAConfig) and experiment.balora.r == 4
    args = experiment.training_arguments()
    assert args.output_dir == "runs/x" and args.max_steps == 2 and args.report_to == []


# ---------------------------------------------------------------- help


def _help_blocks(text: str) -> dict[str, list[str]]:
    """The help text split into blocks: a header line ending in ':' and its indented lines."""
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line and not line.startswith(" "):
            current = blocks.setdefault(line.split(":", 1)[0], [])
        elif line.strip():
            current.append(line)
    return blocks


def test_help_text_lists_every_key_of_every_section_with_its_help():
    text = help_text()
    blocks = _help_blocks(text)
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            line = next((ln for ln in blocks[section] if ln.startswith(f"  {f.name} (")), None)
            assert line is not None, f"{section}.{f.name} missing from the help"
            assert f.metadata["help"] in line, f"{section}.{f.name}: help text missing"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert f"default {default!r})" in line, f"{section}.{f.name}: default missing"
            if typing.get_origin(hints[f.name]) is Literal:
                assert all(repr(choice) in line for choice in typing.get_args(hints[f.name])), line
    training = "training" if "training" in blocks else next(k for k in blocks if k.startswith("training"))
    for name in training_fields():
        assert any(ln.startswith(f"  {name} (default ") for ln in blocks[training]), f"training.{name} missing"
    assert next(ln for ln in blocks[training] if ln.startswith("  learning_rate ")).count("learning rate")
    assert "output_dir" in blocks
    assert {ModelSection, DataSection, BALoRAConfig} == set(SECTIONS.values())
    assert "λ1" in next(ln for ln in blocks["balora"] if ln.startswith("  consistency_weight ("))


def test_the_old_pissa_init_key_svd_niter_still_works_with_a_warning():
    """`svd_niter` (PiSSA init) is now `init_niter`, distinct from the loss's `svd_loss_niter`."""
    with pytest.warns(FutureWarning, match="svd_niter is renamed init_niter"):
        config = BALoRAConfig(svd_niter=4)
    assert config.init_niter == 4 and config.svd_niter is None and "svd_niter" not in config.to_dict()
    with pytest.warns(FutureWarning):
        experiment = build_experiment(_raw(balora={"svd_niter": 16}))
    assert experiment.balora.init_niter == 16
    with pytest.raises(ValueError, match="disagree"):
        BALoRAConfig(svd_niter=4, init_niter=2)
    assert BALoRAConfig.from_dict(BALoRAConfig(init_niter=3).to_dict()).init_niter == 3
