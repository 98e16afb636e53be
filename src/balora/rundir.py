"""The run directory: its layout, claiming it for a run, writing a finished run, and loading one back.

Layout (the experiment's `output_dir`):
    config.yaml          the resolved experiment (every default filled in)
    adapter/             the trained adapter as a plain LoRA on the original base model (PEFT format, rank 2r for
                         PiSSA-initialised runs) + balora_config.json + tokenizer
    model/               instead of adapter/ for method "full": the whole fine-tuned model + tokenizer
    log_history.json     the Trainer's log history (each loss term and λ per logging step)
    train_loss.png       task loss and each regularizer against the step
    README.md            a model card
    metrics.json         validation metrics, training time, data statistics; written last: a run is finished when
                         it exists
    flipped_rows.json    with data.label_noise > 0: which training rows were flipped
    checkpoint-*/        the Trainer's checkpoints (PiSSA form), for --resume
    diagnostics.json     written by `balora diagnose`; eval-*/ by `balora eval`

A run is never written over another: a fresh run needs a missing or empty folder (or `overwrite`, which deletes
the old run first); a run that fails leaves nothing behind unless it wrote a checkpoint to resume from; a resumed run
rewrites the finished run's files only once it has finished again.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from balora.experiment import ConfigError, Experiment, build_experiment, load_yaml
from balora.io import atomic_dir, is_empty_dir, read_text, write_json_atomic, write_text_atomic
from balora.losses import LOSS_TERMS
from balora.prepare import load_model_for

CONFIG = "config.yaml"
ADAPTER = "adapter"
MODEL = "model"
METRICS = "metrics.json"
LOG_HISTORY = "log_history.json"
PLOT = "train_loss.png"
CARD = "README.md"
FLIPPED = "flipped_rows.json"
DIAGNOSTICS = "diagnostics.json"
PRETRAINED_ATTR = "balora_pretrained"


def has_checkpoint(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.glob("checkpoint-*/trainer_state.json"))


def is_finished(run_dir: Path) -> bool:
    return (run_dir / METRICS).is_file()


def check_claim(run_dir: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse (ConfigError) to start a run in `run_dir` unless it is free, or `resume`/`overwrite` says what to do."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output_dir and --overwrite deletes it; pass one of them")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} is a file; choose a folder path for the run")
    if resume:
        if not has_checkpoint(run_dir):
            raise ConfigError(f"--resume: {run_dir} holds no checkpoint-*/ to continue from; run without --resume "
                              "(checkpoints are written when training.save_strategy is not 'no')")
        return
    if run_dir.exists() and not overwrite and not is_empty_dir(run_dir):
        held = ", ".join(sorted(p.name for p in run_dir.iterdir())[:5])
        raise ConfigError(f"output_dir {run_dir} is not empty (it holds {held}); a run is never written over "
                          "another: choose a new output_dir, pass --overwrite to delete the old run and train anew, "
                          "or --resume to continue it from its last checkpoint")


@contextlib.contextmanager
def claimed(run_dir: Path, *, resume: bool = False, overwrite: bool = False, main: bool = True) -> Iterator[Path]:
    """Claim `run_dir` for the run inside the block (see `check_claim`); on an error, remove what a fresh run made.

    A failed fresh run that wrote a checkpoint keeps it (and the folder) for --resume. `main=False` (the other
    processes of a distributed run) neither checks (the main process may already have written there) nor creates
    or removes anything.
    """
    if main:
        check_claim(run_dir, resume=resume, overwrite=overwrite)
    if main and not resume:
        if overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield run_dir
    except BaseException:
        if main and not resume and run_dir.is_dir() and not has_checkpoint(run_dir):
            shutil.rmtree(run_dir)
        raise


# ------------------------------------------------------------------------------------------------ writing


def write_config(run_dir: Path, experiment: Experiment, balora_config: Any) -> None:
    import yaml

    resolved = experiment.to_dict()
    resolved["balora"] = balora_config.to_dict()
    write_text_atomic(run_dir / CONFIG, yaml.safe_dump(resolved, sort_keys=False))


def write_flipped(run_dir: Path, flipped: list[int], *, p: float, seed: int) -> None:
    from balora.data.noise import save_flipped

    save_flipped(run_dir / FLIPPED, flipped, meta={"p": p, "seed": seed})


def last_terms(history: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of the total loss and of each loss term."""
    terms: dict[str, float] = {}
    for entry in history:
        for key in ("loss", *LOSS_TERMS):
            if key in entry:
                terms[key] = float(entry[key])
    return terms


def write_run(run_dir: Path, *, experiment: Experiment, balora_config: Any, save_weights: Callable[[Path], None],
              metrics: dict[str, Any], stats: dict[str, Any], log_history: list[dict[str, Any]]) -> dict[str, float]:
    """Write a finished run: weights (via `save_weights(folder)`, into a fresh folder renamed into place), config,
    log history, plot, model card, and metrics.json last. Returns the final loss terms."""
    from balora.plots import plot_training_curves

    (run_dir / METRICS).unlink(missing_ok=True)  # a resumed run is unfinished until its new metrics.json is written
    weights = run_dir / (MODEL if balora_config.method == "full" else ADAPTER)
    if weights.exists():  # a resumed run replaces its earlier weights
        shutil.rmtree(weights)
    with atomic_dir(weights) as tmp:
        save_weights(tmp)
    write_config(run_dir, experiment, balora_config)
    write_json_atomic(run_dir / LOG_HISTORY, log_history)
    plot_training_curves({balora_config.method: log_history}, run_dir / PLOT,
                         title=f"{experiment.model.name} · {experiment.data.task}")
    write_text_atomic(run_dir / CARD, model_card(experiment, balora_config, metrics, stats))
    final_terms = last_terms(log_history)
    write_json_atomic(run_dir / METRICS, {"metrics": metrics, "final_terms": final_terms, "data": stats})
    return final_terms


def _weights_note(config: Any) -> str:
    if config.method == "full":
        return ("Full fine-tuning: every weight was trained and `model/` holds the whole model "
                "(`AutoModel*.from_pretrained(\"model\")`); the adapter settings above do not apply.")
    return (f"The adapter in `adapter/` is a plain LoRA that applies to the original base model (for a PiSSA init its "
            f"rank is 2r = {2 * config.r if config.init == 'pissa' else config.r}: ΔW = B·A − B0·A0). Load it with "
            "`PeftModel.from_pretrained(base_model, \"adapter\")`.")


def model_card(exp: Experiment, config: Any, metrics: dict[str, Any], stats: dict[str, Any]) -> str:
    import json

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


# ------------------------------------------------------------------------------------------------ reading


def read_experiment(run_dir: Path) -> Experiment:
    """The resolved experiment a run was trained with (its config.yaml)."""
    path = run_dir / CONFIG
    if not path.is_file():
        raise ConfigError(f"{path} is missing; is {run_dir} a run directory written by `balora train`?")
    return build_experiment(load_yaml(read_text(path, "run config")), check_hardware=False)


class LoadedRun(NamedTuple):
    experiment: Experiment
    model: Any  # eval mode: the PeftModel with the run's adapter, or the fully fine-tuned model
    tokenizer: Any


def load_run(run_dir: str | Path, *, reference: bool = False) -> LoadedRun:
    """The experiment, model and tokenizer of a finished run, seeded as training was (see `prepare.load_model_for`).

    A full fine-tuning run gives its whole model from `model/`; with `reference=True` the base model is loaded too
    and attached for `pretrained_view` (an adapter run needs nothing extra: its adapter can be disabled).
    """
    from peft import PeftModel

    run_dir = Path(run_dir)
    adapter, full = run_dir / ADAPTER, run_dir / MODEL
    is_full = (full / "config.json").is_file()
    if not is_finished(run_dir) or not ((adapter / "adapter_config.json").is_file() or is_full):
        raise ConfigError(f"{run_dir} is not a finished balora run (it needs {METRICS}, {CONFIG} and "
                          f"{ADAPTER}/ or {MODEL}/); train it with `balora train CONFIG.yaml` first")
    experiment = read_experiment(run_dir)
    if is_full:
        base = load_model_for(experiment)[0] if reference else None
        model, tokenizer = load_model_for(experiment, name=str(full))
        if base is not None:
            model.__dict__[PRETRAINED_ATTR] = base.eval()  # not a submodule: diagnose reads it as the reference
        return LoadedRun(experiment, model.eval(), tokenizer)
    base, tokenizer = load_model_for(experiment)
    return LoadedRun(experiment, PeftModel.from_pretrained(base, str(adapter)).eval(), tokenizer)


@contextlib.contextmanager
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


# ------------------------------------------------------------------------------------------------ export


def export_run(run_dir: str | Path, to: str, out: str | Path) -> Path:
    """`lora`: the run's adapter (already a plain LoRA on the original base); `merged`: base + adapter merged.

    `out` must be missing or an empty folder; it is written under a unique temporary name beside it, then renamed.
    """
    run_dir, out = Path(run_dir), Path(out)
    if to not in ("lora", "merged"):
        raise ConfigError(f"--to must be lora or merged; got {to!r}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give a folder path for the export")
    if out.is_dir() and not is_empty_dir(out):
        raise ConfigError(f"{out} exists and is not empty; choose a new output folder")
    if (run_dir / MODEL / "config.json").is_file():
        raise ConfigError(f"{run_dir} is a full fine-tuning run: it has no adapter; {run_dir / MODEL} already is the "
                          "whole fine-tuned model (copy that folder)")
    if not (run_dir / ADAPTER / "adapter_config.json").is_file():
        raise ConfigError(f"{run_dir / ADAPTER} holds no adapter; is {run_dir} a finished balora run?")
    if to == "lora":
        with atomic_dir(out) as tmp:
            shutil.copytree(run_dir / ADAPTER, tmp, dirs_exist_ok=True)
        return out
    _, model, tokenizer = load_run(run_dir)
    merged = model.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return out

