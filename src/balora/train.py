"""`balora train`: one experiment end to end: prepare it (`balora.prepare`), wrap the model in its BA-LoRA adapter,
train, evaluate, and write the run directory (`balora.rundir`, which documents the layout)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from balora import rundir
from balora.adapter import get_balora_model, save_adapter
from balora.experiment import ConfigError, Experiment
from balora.prepare import Prepared, evaluate_splits, prepare, training_seed
from balora.trainer import BALoRATrainer

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: str
    metrics: dict[str, float]
    final_terms: dict[str, float]


class LogLastStep(TrainerCallback):
    """Log the last step of a run that has logged no step yet (a run shorter than `logging_steps`), so that every
    run has its final loss terms and its plot."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step >= state.max_steps and not any("loss" in entry for entry in state.log_history):
            control.should_log = True
        return control


def adapt(experiment: Experiment, model: Any, prepared: Prepared | None = None) -> tuple[Any, Any]:
    """(the model to train, its resolved BALoRAConfig): the PEFT model with the adapter, or for method "full" the
    model itself. A setting the model cannot take (r larger than a layer, targets that match nothing) is a
    ConfigError. `init: corda` calibrates on the first `balora.corda_samples` rows of `prepared.train`."""
    task = "nlg" if experiment.is_nlg else "nlu"
    try:
        if experiment.balora.method == "full":  # every weight trains, no adapter; the BA-LoRA terms are off
            return model, experiment.balora.resolve(task)  # loaded models are trainable throughout (tested)
        calibration = None
        if experiment.balora.init == "corda":
            if prepared is None:
                raise ValueError("init='corda' needs the training rows to calibrate on")
            calibration = calibration_pass(prepared, experiment.balora.corda_samples)
        trained = get_balora_model(model, experiment.balora, calibration=calibration)
    except ValueError as error:
        raise ConfigError(f"balora: {error}") from error
    return trained, trained.balora_config


def calibration_pass(prepared: Prepared, rows: int, batch_size: int = 1) -> Any:
    """fn(model): forward passes (eval mode, no labels) over the first `rows` training rows, for CorDA's covariance.
    One row per pass: PEFT's CorDA hook reads a (1, T, H) input (and a padded row would add its pad tokens)."""
    import torch

    dataset = prepared.train.select(range(min(rows, len(prepared.train))))

    def run(model: Any) -> None:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                batch = prepared.collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                batch.pop("labels", None)
                model(**{k: v.to(device) for k, v in batch.items()})
        model.train(was_training)

    return run


def train_experiment(experiment: Experiment, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train one experiment into its `output_dir` (free, or `overwrite`n, or `resume`d) and return its metrics."""
    run_dir = Path(experiment.output_dir)
    args = experiment.training_arguments()
    with rundir.claimed(run_dir, resume=resume, overwrite=overwrite, main=args.should_save):
        prepared = prepare(experiment)
        _start_regression_head(prepared)
        trained, config = adapt(experiment, prepared.model, prepared)
        if args.should_save and not resume:  # a resumed run rewrites its files only once it has finished
            rundir.write_config(run_dir, experiment, config)
            if experiment.data.label_noise > 0:
                rundir.write_flipped(run_dir, prepared.flipped, p=experiment.data.label_noise,
                                     seed=training_seed(experiment))
        trainer = BALoRATrainer(
            model=trained, balora_config=config, args=args, train_dataset=prepared.train,
            eval_dataset=prepared.eval or None, data_collator=prepared.collator,
            compute_metrics=prepared.compute_metrics, processing_class=prepared.tokenizer, callbacks=[LogLastStep()],
        )
        start = time.perf_counter()
        trainer.train(resume_from_checkpoint=True if resume else None)
        train_seconds = time.perf_counter() - start
        metrics = evaluate_splits(trainer, prepared.eval)
        metrics["train_seconds"] = round(train_seconds, 2)
        if not args.should_save:  # another process of a distributed run: its part of a sharded save only
            if config.method == "full":
                trainer.save_model()
            else:  # an FSDP-sharded adapter is gathered by every rank; rank 0 writes it (balora.distributed)
                save_adapter(trained, run_dir / rundir.ADAPTER)
            return TrainResult(str(run_dir), metrics, rundir.last_terms(trainer.state.log_history))
        final_terms = rundir.write_run(
            run_dir, experiment=experiment, balora_config=config, save_weights=_saver(trainer, trained, prepared),
            metrics=metrics, stats=prepared.stats, log_history=trainer.state.log_history,
        )
    return TrainResult(str(run_dir), metrics, final_terms)


def _start_regression_head(prepared: Prepared) -> None:
    """`model.regression_bias: mean`: a regression head's output bias starts at the training labels' mean."""
    if prepared.spec is None or not prepared.spec.regression or prepared.experiment.model.regression_bias != "mean":
        return
    from balora.heads import set_output_bias

    labels = prepared.train["labels"]
    if not set_output_bias(prepared.model, float(sum(labels) / max(len(labels), 1))):
        logger.warning("model.regression_bias 'mean': the head's output layer has no bias; it starts at 0")


def _saver(trainer: BALoRATrainer, trained: Any, prepared: Prepared) -> Any:
    def save(folder: Path) -> None:
        if trainer.balora_config.method == "full":
            trainer.save_model(str(folder))  # the Trainer's own save: unwraps DDP/FSDP/DeepSpeed, gathers shards
        else:
            save_adapter(trained, folder)
        prepared.tokenizer.save_pretrained(str(folder))

    return save
