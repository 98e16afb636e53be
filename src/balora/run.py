"""One experiment end to end: data, model, BA-LoRA adapter, training, evaluation, and the run directory.

Run directory (the experiment's `output_dir`):
    config.yaml          the resolved experiment (every default filled in)
    adapter/             the trained adapter as a plain LoRA on the original base model (PEFT format, rank 2r for
                         PiSSA-initialised runs) + balora_config.json + tokenizer
    model/               instead of adapter/ for method "full": the whole fine-tuned model + tokenizer
    metrics.json         validation metrics, training time, data statistics
    log_history.json     the Trainer's log history (each loss term and λ per logging step)
    train_loss.png       task loss and each regularizer against the step
    README.md            a model card
    flipped_rows.json    with data.label_noise > 0: which training rows were flipped
    checkpoint-*/        the Trainer's checkpoints (PiSSA form), for --resume
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml

from balora.adapter import get_balora_model, save_adapter
from balora.eval.files import write_json_atomic, write_text_atomic
from balora.experiment import ConfigError, Experiment
from balora.trainer import BALoRATrainer

logger = logging.getLogger(__name__)


def task_spec_for(exp: Experiment) -> Any:
    from balora.data.glue import GLUE_TASKS, TaskSpec

    data = exp.data
    if data.task in GLUE_TASKS:
        return GLUE_TASKS[data.task]
    if data.task == "classification":
        if not data.text_fields or data.num_labels is None:
            raise ConfigError("data.task 'classification' needs data.text_fields and data.num_labels (1 = regression)")
        return TaskSpec(
            name="classification",
            text_fields=tuple(data.text_fields),
            num_labels=data.num_labels,
            regression=data.num_labels == 1,
            label_field=data.label_field,
        )
    raise ConfigError(
        f"data.task {data.task!r} is not known; use a GLUE task ({', '.join(GLUE_TASKS)}), 'classification' "
        "or 'instruct'"
    )


def load_model_for(exp: Experiment, spec: Any = None) -> tuple[Any, Any]:
    from balora.models import load_model

    m = exp.model
    if exp.is_nlg:
        return load_model(m.name, task="nlg", dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code)
    return load_model(
        m.name,
        task="nlu",
        num_labels=spec.num_labels,
        problem_type=spec.problem_type,
        dtype=m.dtype,
        device=m.device,
        trust_remote_code=m.trust_remote_code,
    )


def _instruct_split(exp: Experiment, tokenizer: Any, path: str, limit: int | None, seed: int) -> tuple[Any, dict]:
    """One instruction-data file, loaded, checked and tokenised; with its row statistics."""
    from balora.data.instruct import load_instruct, tokenize_instruct

    data = exp.data
    rows, stats = load_instruct(
        path, format=data.format, max_train_samples=limit, skip_bad_rows=data.skip_bad_rows, seed=seed
    )
    tokenized, token_stats = tokenize_instruct(rows, tokenizer, max_length=data.max_length, template=data.template)
    return tokenized, {**stats, **token_stats}


def prepare_data(exp: Experiment, tokenizer: Any, run_dir: Path | None, seed: int) -> dict[str, Any]:
    """Tokenised train/eval datasets, the collator, the metric function and data statistics."""
    data = exp.data
    if exp.is_nlg:
        from balora.data.instruct import CausalLMCollator

        if data.train_file is None:
            raise ConfigError("data.task 'instruct' needs data.train_file (Alpaca, query/response or GSM8K rows)")
        train, train_stats = _instruct_split(exp, tokenizer, data.train_file, data.max_train_samples, seed)
        result = {
            "train": train,
            "eval": {},
            "collator": CausalLMCollator(tokenizer.pad_token_id),
            "compute_metrics": None,
            "stats": {"train": train_stats},
        }
        if data.validation_file:
            val, val_stats = _instruct_split(exp, tokenizer, data.validation_file, data.max_eval_samples, seed)
            result["eval"] = {"validation": val}
            result["stats"]["validation"] = val_stats
        return result

    from transformers import DataCollatorWithPadding

    from balora.data.glue import load_glue, tokenize_glue
    from balora.data.noise import apply_label_noise, save_flipped
    from balora.eval.glue_metrics import compute_metrics_fn

    spec = task_spec_for(exp)
    splits, stats = load_glue(
        spec,
        train_file=data.train_file,
        validation_file=data.validation_file,
        max_train_samples=data.max_train_samples,
        max_eval_samples=data.max_eval_samples,
        skip_bad_rows=data.skip_bad_rows,
        seed=seed,
    )
    train = splits["train"]
    if data.label_noise > 0:
        train, flipped = apply_label_noise(train, data.label_noise, spec.num_labels, seed, label_field="label")
        stats["train"]["flipped"] = len(flipped)
        if run_dir is not None:
            save_flipped(run_dir / "flipped_rows.json", flipped, meta={"p": data.label_noise, "seed": seed})
    encoded_eval = {
        s: tokenize_glue(splits[s], tokenizer, spec, data.max_length) for s in spec.validation_splits if s in splits
    }
    return {
        "train": tokenize_glue(train, tokenizer, spec, data.max_length),
        "eval": encoded_eval,
        "collator": DataCollatorWithPadding(tokenizer),
        "compute_metrics": compute_metrics_fn(spec),
        "stats": stats,
        "spec": spec,
    }


def evaluate_splits(trainer: Any, eval_sets: dict[str, Any]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for split, dataset in eval_sets.items():
        prefix = "eval" if split == "validation" else f"eval_{split}"
        metrics.update(trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix))
    return metrics


def train_experiment(exp: Experiment, *, resume: bool = False) -> dict[str, Any]:
    """Train one experiment and write its run directory; returns the metrics."""
    from transformers import set_seed

    run_dir = Path(exp.output_dir)
    if resume and not (run_dir.is_dir() and any(run_dir.glob("checkpoint-*/trainer_state.json"))):
        raise ConfigError(
            f"--resume: {run_dir} holds no checkpoint-*/ to continue from; run without --resume "
            "(checkpoints are written when training.save_strategy is not 'no')"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    args = exp.training_arguments()
    set_seed(args.seed)
    spec = None if exp.is_nlg else task_spec_for(exp)
    model, tokenizer = load_model_for(exp, spec)
    prepared = prepare_data(exp, tokenizer, run_dir, args.seed)
    if exp.balora.method == "full":  # every weight trains, no adapter; the BA-LoRA terms are off (config checks)
        config = exp.balora.resolve("nlg" if exp.is_nlg else "nlu")
        trained = model  # loaded models are trainable throughout (a test checks every weight changes)
    else:
        trained = get_balora_model(model, exp.balora)
        config = trained.balora_config
    resolved = exp.to_dict()
    resolved["balora"] = config.to_dict()
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    trainer = BALoRATrainer(
        model=trained,
        balora_config=config,
        args=args,
        train_dataset=prepared["train"],
        eval_dataset=prepared["eval"] or None,
        data_collator=prepared["collator"],
        compute_metrics=prepared["compute_metrics"],
        processing_class=tokenizer,
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    train_seconds = time.perf_counter() - start
    metrics = evaluate_splits(trainer, prepared["eval"])
    metrics["train_seconds"] = round(train_seconds, 2)
    final_terms = last_terms(trainer.state.log_history)
    saved = run_dir / ("model" if config.method == "full" else "adapter")
    if config.method == "full":
        _save_full_model(trainer, saved)
    else:
        save_adapter(trained, saved)  # every rank: a sharded adapter is gathered first
    result = {"metrics": metrics, "final_terms": final_terms, "run_dir": str(run_dir)}
    if not trainer.is_world_process_zero():  # one writer for the run directory
        return result
    tokenizer.save_pretrained(str(saved))
    write_json_atomic(
        run_dir / "metrics.json", {"metrics": metrics, "final_terms": final_terms, "data": prepared["stats"]}
    )
    write_json_atomic(run_dir / "log_history.json", trainer.state.log_history)
    from balora.plots import plot_training_curves

    plot_training_curves(
        {config.method: trainer.state.log_history},
        run_dir / "train_loss.png",
        title=f"{exp.model.name} · {exp.data.task}",
    )
    write_text_atomic(run_dir / "README.md", model_card(exp, config, metrics, prepared["stats"]))
    return result


def _save_full_model(trainer: BALoRATrainer, folder: Path) -> None:
    """The fully fine-tuned model, written to a temp folder renamed into place (never half-written)."""
    import shutil

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))  # the Trainer's own save: unwraps DDP/FSDP/DeepSpeed, gathers shards
    if trainer.args.should_save:
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)


def last_terms(history: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of each loss term."""
    terms: dict[str, float] = {}
    for entry in history:
        for key in ("loss", "task_loss", "consistency_loss", "diversity_loss", "svd_loss"):
            if key in entry:
                terms[key] = float(entry[key])
    return terms


def _weights_note(config: Any) -> str:
    if config.method == "full":
        return ("Full fine-tuning: every weight was trained and `model/` holds the whole model "
                "(`AutoModel*.from_pretrained(\"model\")`); the adapter settings above do not apply.")
    return (f"The adapter in `adapter/` is a plain LoRA that applies to the original base model (for a PiSSA init its "
            f"rank is 2r = {2 * config.r if config.init == 'pissa' else config.r}: ΔW = B·A − B0·A0). Load it with "
            "`PeftModel.from_pretrained(base_model, \"adapter\")`.")


def model_card(exp: Experiment, config: Any, metrics: dict[str, Any], stats: dict[str, Any]) -> str:
    weights = f"λ1={config.consistency_weight}, λ2={config.diversity_weight}, λ3={config.svd_weight}"
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    return f"""---
library_name: {"transformers" if config.method == "full" else "peft"}
base_model: {exp.model.name}
tags: [balora, ba-lora, lora, pissa]
---
# {config.method} {"fine-tune" if config.method == "full" else "adapter"} of `{exp.model.name}` on {exp.data.task}

Trained with [balora](https://arxiv.org/abs/2408.04556) (BA-LoRA: PiSSA init + consistency, diversity and SVD
regularizers).

- Method: `{config.method}` (init `{config.init}`), rank r={config.r}, alpha={config.lora_alpha}, targets
  `{config.target_modules}`
- Loss weights: {weights}; T={config.temperature}, k={config.svd_top_k}, K={config.entropy_top_k};
  schedules: λ1 {config.consistency_schedule}, λ2/λ3 {config.regularizer_schedule}
- Data: {exp.data.task}, train file `{exp.data.train_file or "bundled/hub"}`, label noise {exp.data.label_noise}
- Data statistics: `{json.dumps(stats)}`

{_weights_note(config)}

## Validation metrics
| metric | value |
|---|---|
{rows}
"""
