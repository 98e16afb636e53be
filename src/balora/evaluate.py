"""`balora eval`: a trained run or a base model on the experiment's validation split or a generation benchmark, or
completions made elsewhere scored without a model. Results go to an `eval-*` folder (see `evaluate`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balora import rundir
from balora.experiment import ConfigError, Experiment, load_experiment
from balora.io import write_json_atomic
from balora.prepare import evaluate_splits, load_model_for, prepare


@dataclass
class EvalResult:
    out_dir: Path
    figures: dict[str, Any]  # the benchmark's summary.json, or the validation metrics (metrics.json)


def score_completions(task: str, samples_file: str | Path, *, data_file: str | Path | None = None,
                      output_dir: str | Path | None = None, isolation: str = "auto") -> EvalResult:
    """Score a JSONL of completions (task_id or index, completion) for `task`; loads no model."""
    from balora.eval.tasks import score_samples

    out = Path(output_dir or f"eval-{task}")
    return EvalResult(out, score_samples(task, samples_file, data_file=data_file, out_dir=out, isolation=isolation))


def evaluate(*, run: str | Path | None = None, config: str | Path | None = None, task: str | None = None,
             data_file: str | Path | None = None, limit: int | None = None, batch_size: int = 8,
             max_new_tokens: int = 512, n_samples: int = 1, temperature: float = 0.0,
             output_dir: str | Path | None = None, isolation: str = "auto") -> EvalResult:
    """Evaluate a run (base + its adapter, or its full model) or, from a config, the base model alone.

    Without `task`: the experiment's validation split (metrics.json); with `task`: a generation benchmark
    (summary.json and results.jsonl). Default folder: RUN/eval-TASK, or OUTPUT_DIR/eval-base-TASK for a base model.
    """
    if (run is None) == (config is None):
        raise ConfigError("give either a config file (evaluates the base model) or --run RUN_DIR, not both or none")
    name = task or "validation"
    if run is not None:
        experiment, model, tokenizer = rundir.load_run(run)
        out = Path(output_dir or Path(run) / f"eval-{name}")
    else:
        experiment = load_experiment(config)[0]  # type: ignore[arg-type]
        model, tokenizer = load_model_for(experiment)
        out = Path(output_dir or Path(experiment.output_dir) / f"eval-base-{name}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file; give a folder for the results")
    if task is None:
        return EvalResult(out, evaluate_validation(experiment, model, tokenizer, out))
    from balora.eval.tasks import evaluate_generation

    summary = evaluate_generation(
        model, tokenizer, task, data_file=data_file, limit=limit, batch_size=batch_size,
        max_new_tokens=max_new_tokens, template=experiment.data.template, n_samples=n_samples,
        temperature=temperature, isolation=isolation, out_dir=out,
    )
    return EvalResult(out, summary)


def evaluate_validation(experiment: Experiment, model: Any, tokenizer: Any, out: Path) -> dict[str, Any]:
    """The task's validation metrics (NLU) or validation loss (NLG) with a plain Trainer; written to out."""
    from transformers import Trainer

    prepared = prepare(experiment, model=model, tokenizer=tokenizer)
    if not prepared.eval:
        raise ConfigError("this experiment has no validation split; set data.validation_file")
    trainer = Trainer(model=model, args=experiment.training_arguments(output_dir=str(out)),
                      data_collator=prepared.collator, compute_metrics=prepared.compute_metrics,
                      processing_class=tokenizer)
    metrics = evaluate_splits(trainer, prepared.eval)
    write_json_atomic(out / "metrics.json", metrics)
    return metrics
