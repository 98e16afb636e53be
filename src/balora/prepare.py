"""The one preparation step every command shares: an experiment becomes a model, a tokenizer, tokenised datasets, a
collator and a metric function (`Prepared`).

The random state is part of it: `load_model_for` seeds with the experiment's training seed right before loading, so
that a freshly initialised classification head is the same in `train`, `eval`, `diagnose` and `compare`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from balora.experiment import ConfigError, Experiment, training_fields


@dataclass
class Prepared:
    """What a command needs to train or evaluate one experiment.

    `eval` maps a split name ("validation", or "validation_matched"/"validation_mismatched" for MNLI) to its
    tokenised dataset; `flipped` holds the 0-based positions of the training rows whose label was flipped
    (`data.label_noise`); `spec` is the classification task (None for instruction tuning).
    """

    experiment: Experiment
    model: Any
    tokenizer: Any
    train: Any
    eval: dict[str, Any]
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]
    compute_metrics: Callable[[Any], dict[str, float]] | None
    stats: dict[str, Any]
    spec: Any = None
    flipped: list[int] = field(default_factory=list)


def training_seed(experiment: Experiment) -> int:
    """The experiment's `training.seed`, else transformers' own default."""
    return int(experiment.training.get("seed", training_fields()["seed"].default))


def task_spec_for(experiment: Experiment) -> Any:
    """The classification task of an NLU experiment (a `balora.data.glue.TaskSpec`)."""
    from balora.data.glue import GLUE_TASKS, TaskSpec

    data = experiment.data
    if data.task in GLUE_TASKS:
        return GLUE_TASKS[data.task]
    if data.task == "classification":
        if not data.text_fields or data.num_labels is None:
            raise ConfigError("data.task 'classification' needs data.text_fields and data.num_labels (1 = regression)")
        return TaskSpec(name="classification", text_fields=tuple(data.text_fields), num_labels=data.num_labels,
                        regression=data.num_labels == 1, label_field=data.label_field)
    raise ConfigError(f"data.task {data.task!r} is not known; use a GLUE task ({', '.join(GLUE_TASKS)}), "
                      "'classification' or 'instruct'")


def load_model_for(experiment: Experiment, *, name: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of the experiment's model (or of the checkpoint `name`), seeded with its training seed."""
    from transformers import set_seed

    from balora.models import load_model

    m = experiment.model
    set_seed(training_seed(experiment))  # a fresh classification head is then the same in every command
    if experiment.is_nlg:
        return load_model(name or m.name, task="nlg", dtype=m.dtype, device=m.device,
                          trust_remote_code=m.trust_remote_code)
    spec = task_spec_for(experiment)
    return load_model(name or m.name, task="nlu", num_labels=spec.num_labels, problem_type=spec.problem_type,
                      dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code, pooling=m.pooling)


def prepare(experiment: Experiment, *, model: Any = None, tokenizer: Any = None) -> Prepared:
    """Load the model (unless given with its tokenizer), then read, check and tokenise the data."""
    spec = None if experiment.is_nlg else task_spec_for(experiment)  # a bad task fails before any model loads
    if model is None or tokenizer is None:
        model, tokenizer = load_model_for(experiment)
    if experiment.is_nlg:
        return _prepare_instruct(experiment, model, tokenizer)
    return _prepare_classification(experiment, spec, model, tokenizer)


def _instruct_split(experiment: Experiment, tokenizer: Any, path: str, limit: int | None,
                    dev_rows: int | None = None) -> tuple[Any, dict, Any]:
    """One instruction-data file, loaded, checked and tokenised; with its row statistics, and the tokenised dev rows
    carved from it when `dev_rows` is set (else None)."""
    from balora.data.imbalance import carve_dev
    from balora.data.instruct import load_instruct, tokenize_instruct

    data = experiment.data
    seed = training_seed(experiment)
    rows, stats = load_instruct(path, format=data.format, max_train_samples=limit, skip_bad_rows=data.skip_bad_rows,
                                seed=seed)
    dev = None
    if dev_rows is not None:
        rows, dev_raw = carve_dev(rows, dev_rows, seed)
        dev, _ = tokenize_instruct(dev_raw, tokenizer, max_length=data.max_length, template=data.template)
    tokenized, token_stats = tokenize_instruct(rows, tokenizer, max_length=data.max_length, template=data.template)
    return tokenized, {**stats, **token_stats}, dev


def _prepare_instruct(experiment: Experiment, model: Any, tokenizer: Any) -> Prepared:
    from balora.data.instruct import CausalLMCollator

    data = experiment.data
    if data.train_file is None:
        raise ConfigError("data.task 'instruct' needs data.train_file (Alpaca, query/response or GSM8K rows)")
    if data.class_imbalance is not None:
        raise ConfigError("data.class_imbalance applies to classification tasks; remove it for instruction data")
    train, train_stats, dev = _instruct_split(experiment, tokenizer, data.train_file, data.max_train_samples,
                                              data.dev_rows)
    prepared = Prepared(experiment, model, tokenizer, train, {}, CausalLMCollator(tokenizer.pad_token_id), None,
                        {"train": train_stats})
    if dev is not None:  # the dev rows stand in for the validation file: it is never seen
        prepared.eval["validation"] = dev
        prepared.stats["dev"] = {"rows": len(dev), "replaces": "validation"}
    elif data.validation_file:
        val, val_stats, _ = _instruct_split(experiment, tokenizer, data.validation_file, data.max_eval_samples)
        prepared.eval["validation"] = val
        prepared.stats["validation"] = val_stats
    return prepared


def _prepare_classification(experiment: Experiment, spec: Any, model: Any, tokenizer: Any) -> Prepared:
    from transformers import DataCollatorWithPadding

    from balora.data.glue import load_glue, tokenize_glue
    from balora.data.imbalance import apply_class_imbalance, carve_dev
    from balora.data.noise import apply_label_noise
    from balora.eval.glue_metrics import compute_metrics_fn

    data, seed = experiment.data, training_seed(experiment)
    splits, stats = load_glue(spec, train_file=data.train_file, validation_file=data.validation_file,
                              max_train_samples=data.max_train_samples, max_eval_samples=data.max_eval_samples,
                              skip_bad_rows=data.skip_bad_rows, seed=seed,
                              only=("train",) if data.dev_rows is not None else None)
    train, flipped = splits["train"], []
    if data.dev_rows is not None:  # the dev rows stand in for every validation split: it is never seen
        train, dev = carve_dev(train, data.dev_rows, seed)
        splits = {"train": train, **{s: dev for s in spec.validation_splits[:1]}}
        stats["dev"] = {"rows": len(dev), "replaces": spec.validation_splits[0]}
    if data.class_imbalance is not None:
        train, stats["train"]["imbalance"] = apply_class_imbalance(train, data.class_imbalance, spec.num_labels,
                                                                  seed)
    if data.label_noise > 0:
        train, flipped = apply_label_noise(train, data.label_noise, spec.num_labels, seed, label_field="label")
        stats["train"]["flipped"] = len(flipped)
    encoded_eval = {
        s: tokenize_glue(splits[s], tokenizer, spec, data.max_length) for s in spec.validation_splits if s in splits
    }
    return Prepared(experiment, model, tokenizer, tokenize_glue(train, tokenizer, spec, data.max_length),
                    encoded_eval, DataCollatorWithPadding(tokenizer), compute_metrics_fn(spec, per_class=True), stats,
                    spec, flipped)


def evaluate_splits(trainer: Any, eval_sets: dict[str, Any]) -> dict[str, float]:
    """Every validation split through `trainer.evaluate`: `eval_*` for "validation", `eval_<split>_*` otherwise."""
    metrics: dict[str, float] = {}
    for split, dataset in eval_sets.items():
        prefix = "eval" if split == "validation" else f"eval_{split}"
        metrics.update(trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix))
    return metrics
