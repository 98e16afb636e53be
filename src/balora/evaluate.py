"""`balora eval` and `balora export`: evaluate a base model or a trained run; export a run's adapter."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from balora.eval.files import write_json_atomic
from balora.experiment import ConfigError, Experiment, build_experiment, load_experiment
from balora.run import evaluate_splits, load_model_for, prepare_data, task_spec_for


def load_run(run_dir: Path, *, reference: bool = False) -> tuple[Experiment, Any, Any]:
    """(experiment, model with the run's adapter, tokenizer) of a run directory written by `balora train`.

    A full fine-tuning run gives its whole model from `model/`; with `reference=True` the base model is loaded too
    and attached for `pretrained_view` (an adapter run needs nothing extra: its adapter can be disabled).
    """
    from peft import PeftModel

    config, adapter, full = run_dir / "config.yaml", run_dir / "adapter", run_dir / "model"
    is_full = (full / "config.json").is_file()
    if not config.is_file() or not ((adapter / "adapter_config.json").is_file() or is_full):
        raise FileNotFoundError(
            f"{run_dir} is not a finished balora run (needs config.yaml and adapter/adapter_config.json, or model/ "
            "for full fine-tuning); train it with `balora train CONFIG.yaml` first"
        )
    experiment = build_experiment(yaml.safe_load(config.read_text()))
    spec = None if experiment.is_nlg else task_spec_for(experiment)
    if is_full:
        base = load_model_for(experiment, spec)[0] if reference else None  # first: the seeded head is the run's
        tuned = dataclasses.replace(experiment, model=dataclasses.replace(experiment.model, name=str(full)))
        model, tokenizer = load_model_for(tuned, spec)
        if base is not None:
            model.__dict__[PRETRAINED_ATTR] = base.eval()  # not a submodule: diagnose reads it as the reference
        return experiment, model.eval(), tokenizer
    base, tokenizer = load_model_for(experiment, spec)
    model = PeftModel.from_pretrained(base, str(adapter))
    return experiment, model.eval(), tokenizer


PRETRAINED_ATTR = "balora_pretrained"


@contextmanager
def pretrained_view(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block, the pre-trained model of a loaded run: the PeftModel with its adapter disabled (the saved
    adapter is a plain LoRA on the original weights), or for a full fine-tuning run the base model loaded beside it."""
    reference = model.__dict__.get(PRETRAINED_ATTR)
    if reference is not None:
        yield reference
        return
    if not hasattr(model, "disable_adapter"):
        raise ValueError("this full fine-tuning run was loaded without its base model: use load_run(..., "
                         "reference=True)")
    with model.disable_adapter():
        yield model


def evaluate_command(args: argparse.Namespace) -> str:
    if args.samples:
        if not args.task:
            raise ConfigError("--samples needs --task (gsm8k, math, mbpp or humaneval)")
        from balora.eval.tasks import score_samples

        out = Path(args.output_dir or f"eval-{args.task}")
        summary = score_samples(args.task, args.samples, data_file=args.data_file, out_dir=out,
                                isolation=args.isolation)
        return f"{args.task}: {_summary_line(summary)}; results in {out}"
    if bool(args.run) == bool(args.config):
        raise ConfigError("give either a config file (evaluates the base model) or --run RUN_DIR, not both or none")
    if args.run:
        run_dir = Path(args.run)
        experiment, model, tokenizer = load_run(run_dir)
        out = Path(args.output_dir or run_dir / f"eval-{args.task or 'validation'}")
    else:
        experiment, _ = load_experiment(args.config)
        spec = None if experiment.is_nlg else task_spec_for(experiment)
        model, tokenizer = load_model_for(experiment, spec)
        out = Path(args.output_dir or Path(experiment.output_dir) / f"eval-base-{args.task or 'validation'}")
    out.mkdir(parents=True, exist_ok=True)
    if args.task:
        from balora.eval.tasks import evaluate_generation

        summary = evaluate_generation(
            model,
            tokenizer,
            args.task,
            data_file=args.data_file,
            limit=args.limit,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            template=experiment.data.template,
            n_samples=args.n_samples,
            temperature=args.temperature,
            isolation=args.isolation,
            out_dir=out,
        )
        return f"{args.task}: {_summary_line(summary)}; results in {out}"
    metrics = evaluate_validation(experiment, model, tokenizer, out)
    shown = ", ".join(
        f"{k} = {v:.4f}"
        for k, v in metrics.items()
        if isinstance(v, float) and "runtime" not in k and "per_second" not in k
    )
    return f"{shown}; metrics in {out / 'metrics.json'}"


def _summary_line(summary: dict[str, Any]) -> str:
    keys = [k for k in summary if k.startswith(("accuracy", "pass@", "perplexity"))]
    return ", ".join(f"{k} = {summary[k]:.4f}" for k in keys) or str(summary)


def evaluate_validation(experiment: Experiment, model: Any, tokenizer: Any, out: Path) -> dict[str, Any]:
    """The task's validation metrics (NLU) or validation loss (NLG) with a plain Trainer; written to out."""
    from transformers import Trainer

    args = experiment.training_arguments(output_dir=str(out))
    prepared = prepare_data(experiment, tokenizer, None, args.seed)
    if not prepared["eval"]:
        raise ConfigError("this experiment has no validation split; set data.validation_file")
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=prepared["collator"],
        compute_metrics=prepared["compute_metrics"],
        processing_class=tokenizer,
    )
    metrics = evaluate_splits(trainer, prepared["eval"])
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def export_run(run_dir: Path, to: str, out: Path) -> Path:
    """`lora`: the run's adapter (already a plain LoRA on the original base); `merged`: base + adapter merged."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output folder")
    if to == "lora":
        adapter = run_dir / "adapter"
        if (run_dir / "model" / "config.json").is_file():
            raise ConfigError(f"{run_dir} is a full fine-tuning run: it has no adapter; {run_dir / 'model'} is the "
                              "whole fine-tuned model")
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter} holds no adapter; is {run_dir} a finished balora run?")
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(adapter, tmp)
        if out.exists():
            out.rmdir()
        tmp.replace(out)
        return out
    if to != "merged":
        raise ConfigError(f"--to must be lora or merged; got {to!r}")
    if (run_dir / "model" / "config.json").is_file():
        raise ConfigError(f"{run_dir} is a full fine-tuning run: {run_dir / 'model'} already is the whole model; "
                          "copy that folder (there is no adapter to merge)")
    _, model, tokenizer = load_run(run_dir)
    merged = model.merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    return out
