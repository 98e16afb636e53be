"""Experiments as YAML: sections `model`, `data`, `balora` (BALoRAConfig), `training` (TrainingArguments) and
`output_dir`.

Every key is checked before any model loads: an unknown key names the closest known one, a wrong type or an
out-of-range value names the key, the value and what is allowed. Command-line overrides use dotted keys
(`--training.learning_rate 1e-4`, `--balora.r 16`), their values parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from balora.config import BALoRAConfig


class ConfigError(ValueError):
    """A bad experiment file or override; the message names the key, the value and the fix."""


@dataclass
class ModelSection:
    name: str = field(
        default="minilm",
        metadata={"help": "Hub id, local folder, or a bundled offline name: minilm, smollm2-135m."},
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "auto: bf16 on a GPU that supports it, else float32."}
    )
    device: str = field(default="auto", metadata={"help": "auto (CUDA if present, else CPU), cpu, cuda, cuda:1, ..."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})
    pooling: Literal["cls", "mean"] = field(
        default="cls",
        metadata={
            "help": "NLU: cls = the model class's own head (BERT: on the [CLS] pooler); mean = masked mean of the "
            "last hidden states into a fresh Linear head (what sentence-embedding models such as MiniLM were "
            "trained with)."
        },
    )
    regression_bias: Literal["mean", "zero"] = field(
        default="mean",
        metadata={
            "help": "NLU regression: the fresh head's output bias starts at the training labels' mean (mean) or at "
            "its initial value (zero), so the first steps are not spent learning the offset."
        },
    )


@dataclass
class DataSection:
    task: str = field(
        default="sst2",
        metadata={
            "help": "GLUE task (cola sst2 mrpc qqp stsb mnli qnli rte wnli), 'classification' for your own "
            "columns, or 'instruct' for NLG instruction data."
        },
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Local training file (jsonl/json/csv/tsv/parquet)."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    text_fields: list[str] | None = field(default=None, metadata={"help": "Text columns ('classification' task)."})
    label_field: str = field(default="label", metadata={"help": "Label column ('classification' task)."})
    num_labels: int | None = field(default=None, metadata={"help": "Classes ('classification'); 1 = regression."})
    format: Literal["auto", "alpaca", "query_response", "gsm8k"] = field(
        default="auto", metadata={"help": "NLG: instruction data format; auto detects it from the columns."}
    )
    template: Literal["alpaca", "chat"] = field(
        default="alpaca", metadata={"help": "NLG: prompt template (Alpaca as in the papers, or the chat template)."}
    )
    max_length: int = field(default=128, metadata={"help": "Truncate tokenised examples to this many tokens."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use a seeded random subset of N training rows."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation rows."})
    label_noise: float = field(
        default=0.0, metadata={"help": "Flip this fraction of training labels to another class (seeded)."}
    )
    skip_bad_rows: bool = field(default=False, metadata={"help": "Skip malformed rows (counted) instead of failing."})
    dev_rows: int | None = field(
        default=None,
        metadata={"help": "Hold out this many training rows (seeded) and evaluate on them instead of the validation "
                  "split: for choosing hyper-parameters without seeing it (balora compare --learning-rates)."},
    )
    class_imbalance: float | None = field(
        default=None,
        metadata={"help": "Subsample the least frequent class to this share of the training rows (seeded); "
                  "validation is untouched. Classification only."},
    )

    def __post_init__(self) -> None:
        if self.max_length < 8:
            raise ConfigError(f"data.max_length must be >= 8; got {self.max_length}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name} must be >= 1 or null; got {value}")
        if not 0.0 <= self.label_noise < 1.0:
            raise ConfigError(f"data.label_noise must be in [0, 1); got {self.label_noise}")
        if self.dev_rows is not None and self.dev_rows < 1:
            raise ConfigError(f"data.dev_rows must be >= 1 or null; got {self.dev_rows}")
        if self.class_imbalance is not None and not 0.0 < self.class_imbalance < 0.5:
            raise ConfigError(f"data.class_imbalance must be in (0, 0.5) or null (the minority class's share of "
                              f"the training rows); got {self.class_imbalance}")


@dataclass
class Experiment:
    model: ModelSection
    data: DataSection
    balora: BALoRAConfig
    training: dict[str, Any]
    output_dir: str

    @property
    def is_nlg(self) -> bool:
        return self.data.task == "instruct"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dataclasses.asdict(self.model),
            "data": dataclasses.asdict(self.data),
            "balora": self.balora.to_dict(),
            "training": dict(self.training),
            "output_dir": self.output_dir,
        }

    def training_arguments(self, **overrides: Any) -> Any:
        from transformers import TrainingArguments

        values = {"output_dir": self.output_dir, "report_to": [], **self.training, **overrides}
        try:
            return TrainingArguments(**values)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"training: {error}") from error


SECTIONS: dict[str, type] = {"model": ModelSection, "data": DataSection, "balora": BALoRAConfig}
TOP_LEVEL = ("model", "data", "balora", "training", "output_dir")
# Set by balora itself from other sections, or meaningless for a YAML file.
_TRAINING_RESERVED = {"output_dir"}


def training_fields() -> dict[str, dataclasses.Field]:
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init and f.name not in _TRAINING_RESERVED}


def _suggest(key: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether `value` (from YAML) fits `annotation`; annotations we cannot check are accepted."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple) or annotation in (list, tuple):
        args = typing.get_args(annotation)
        return isinstance(value, list) and (not args or all(_type_ok(v, args[0]) for v in value))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return value in {m.value for m in annotation} or isinstance(value, annotation)
    return True


def _describe(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    return text.replace("<class '", "").replace("'>", "")


_YAML11_BOOLS = {"yes": True, "no": False, "on": True, "off": False, "y": True, "n": False}


def _check_section(section: str, values: dict[str, Any], fields: dict[str, dataclasses.Field], hints: dict) -> None:
    """Check every key and type; a YAML 1.1 boolean word (yes/no/on/off) given to a bool field becomes a bool."""
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key {section}.{key}{_suggest(key, fields)}")
        annotation = hints.get(key, Any)
        word = value.lower() if isinstance(value, str) else None
        if word in _YAML11_BOOLS and not _type_ok(value, annotation) and _type_ok(True, annotation):
            values[key] = value = _YAML11_BOOLS[word]
        if not _type_ok(value, annotation):
            raise ConfigError(f"{section}.{key} = {value!r} has the wrong type; expected {_describe(annotation)}")


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}


def build_experiment(raw: dict[str, Any], *, check_hardware: bool = True) -> Experiment:
    """Validate a parsed YAML mapping and build the experiment (no model is loaded).

    `check_hardware=False` validates the training section as if bf16/fp16 were off, for checking a GPU experiment
    on a machine without one.
    """
    if not isinstance(raw, dict):
        raise ConfigError(
            f"an experiment file must be a YAML mapping with keys {list(TOP_LEVEL)}; got {type(raw).__name__}"
        )
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(f"unknown top-level key {key!r}{_suggest(key, TOP_LEVEL)}; allowed: {list(TOP_LEVEL)}")
    built: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        values = raw.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"section {section!r} must be a mapping; got {values!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        _check_section(section, values, fields, _hints(cls))
        try:
            built[section] = cls(**values)
        except ConfigError:
            raise
        except ValueError as error:
            raise ConfigError(f"{section}: {error}") from error
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise ConfigError(f"section 'training' must be a mapping of TrainingArguments; got {training!r}")
    fields = training_fields()
    from transformers import TrainingArguments

    _check_section("training", training, fields, _hints(TrainingArguments))
    for key in ("learning_rate", "weight_decay"):  # the optimizer would refuse them only after the model loaded
        value = training.get(key)
        if isinstance(value, int | float) and not value >= 0:
            raise ConfigError(f"training.{key} must be a number >= 0; got {value!r}")
    output_dir = raw.get("output_dir")
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError("output_dir is missing: set it to the folder where the run is written, e.g. runs/sst2")
    experiment = Experiment(output_dir=output_dir, training=dict(training), **built)
    if experiment.is_nlg and experiment.model.pooling != "cls":
        raise ConfigError(
            f"model.pooling {experiment.model.pooling!r} is for sequence classification (NLU); a causal LM has no "
            "pooling: remove model.pooling for data.task 'instruct'"
        )
    # TrainingArguments validates its own ranges and combinations (and whether this machine supports bf16/fp16)
    experiment.training_arguments(**({} if check_hardware else {"bf16": False, "fp16": False}))
    return experiment


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader read as YAML 1.2 in two places: `1e-4` (no dot) is a float (YAML 1.1: a string), and
    only true/false are booleans (YAML 1.1 also reads yes/no/on/off as booleans, so that transformers'
    `save_strategy: no` would arrive as False; a bool field still accepts these words, see `_check_section`)."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text as experiment files are read (see `_YamlLoader`)."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--a.b value` pairs (values parsed as YAML) to a raw mapping; returns a new mapping."""
    result = yaml.safe_load(yaml.safe_dump(raw)) or {}
    if len(overrides) % 2:
        raise ConfigError(f"override {overrides[-1]!r} has no value; write --key value (e.g. --training.seed 1)")
    for flag, text in zip(overrides[::2], overrides[1::2], strict=True):
        if not flag.startswith("--") or len(flag) < 3:
            raise ConfigError(f"expected an override like --training.seed 1; got {flag!r}")
        path = flag[2:].replace("-", "_").split(".")
        if path[0] not in TOP_LEVEL:
            raise ConfigError(f"unknown section {path[0]!r} in {flag!r}{_suggest(path[0], TOP_LEVEL)}")
        if not (path == ["output_dir"] or (len(path) == 2 and path[0] in TOP_LEVEL and path[0] != "output_dir")):
            raise ConfigError(
                f"override {flag!r} must name a section and key, e.g. --balora.r 16, --training.seed 1 "
                "or --output_dir D"
            )
        value = load_yaml(text)
        if len(path) == 1:
            result[path[0]] = value
        else:
            result.setdefault(path[0], {})
            if not isinstance(result[path[0]], dict):
                raise ConfigError(f"section {path[0]!r} is not a mapping in the config file")
            result[path[0]][path[1]] = value
    return result


def load_experiment(
    path: str | Path, overrides: list[str] | None = None, *, check_hardware: bool = True
) -> tuple[Experiment, dict[str, Any]]:
    """Read, override and validate an experiment file; returns the experiment and the resolved raw mapping."""
    from balora.io import DataError, read_text

    file = Path(path)
    try:
        raw = load_yaml(read_text(file, "config file", "see configs/ for examples")) or {}
    except DataError as error:
        raise ConfigError(str(error)) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{file}: not valid YAML: {error}") from error
    raw = apply_overrides(raw, overrides or [])
    return build_experiment(raw, check_hardware=check_hardware), raw


def help_text() -> str:
    """Every key with its type, default and help text, for `balora train --help`."""
    lines = ["Experiment keys (YAML sections; override any with --section.key value):", ""]
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            lines.append(
                f"  {f.name} ({_describe(hints.get(f.name, ''))}, default {default!r}): {f.metadata.get('help', '')}"
            )
        lines.append("")
    lines.append("training: any transformers.TrainingArguments field, e.g.:")
    for name, f in training_fields().items():
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = " ".join(str(f.metadata.get("help", "")).split())
        lines.append(f"  {name} (default {default!r}): {help_[:150]}")
    lines.append("")
    lines.append("output_dir: folder of the run (adapter, metrics.json, plots, model card).")
    return "\n".join(lines)
