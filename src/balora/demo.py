"""`balora demo`: PiSSA and BA-LoRA on the same data with the same seed, side by side with a linear probe on the frozen
model's features (the cheapest honest baseline), fully offline."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from balora.eval.files import write_json_atomic
from balora.experiment import load_experiment
from balora.plots import plot_metric_bars, plot_training_curves
from balora.run import train_experiment

METHODS = ("pissa", "balora")
PROBE = "linear probe (frozen)"


def run_probe(config: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The frozen model's linear probe on the same training and validation rows as the runs (`balora.probe`)."""
    from transformers import set_seed

    from balora.probe import linear_probe
    from balora.run import load_model_for, prepare_data, task_spec_for

    experiment, _ = load_experiment(config, list(overrides or []))
    args = experiment.training_arguments()
    set_seed(args.seed)
    spec = task_spec_for(experiment)
    model, tokenizer = load_model_for(experiment, spec)
    prepared = prepare_data(experiment, tokenizer, None, args.seed)
    start = time.perf_counter()
    result = linear_probe(model, prepared["train"], prepared["eval"]["validation"], prepared["collator"], spec)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["final_terms"] = {}
    return result


def run_demo(config: Path, output_dir: Path) -> dict[str, Any]:
    """Train each method of METHODS from `config`, print a table and write plots and a summary to `output_dir`."""
    results: dict[str, Any] = {}
    histories: dict[str, Any] = {}
    for method in METHODS:
        experiment, _ = load_experiment(config, ["--balora.method", method, "--output_dir", str(output_dir / method)])
        print(
            f"\n=== {method}: {experiment.model.name} on {experiment.data.task} "
            f"({experiment.data.max_train_samples or 'all'} training rows) ===",
            flush=True,
        )
        start = time.perf_counter()
        result = train_experiment(experiment)
        result["seconds"] = round(time.perf_counter() - start, 1)
        results[method] = result

        histories[method] = json.loads((output_dir / method / "log_history.json").read_text())
    print(f"\n=== {PROBE}: logistic regression on the frozen model's pooled features, same rows ===", flush=True)
    probe = run_probe(config)
    metric = _main_metric(results[METHODS[0]]["metrics"])
    table = format_table({**results, PROBE: probe}, metric)
    print("\n" + table)
    plot_training_curves(histories, output_dir / "demo_losses.png", title="PiSSA vs BA-LoRA: loss terms")
    plot_metric_bars(
        {**{m: results[m]["metrics"][metric] for m in METHODS}, "linear probe": probe["metrics"][metric]},
        output_dir / "demo_accuracy.png",
        metric=metric,
        title="validation " + metric.removeprefix("eval_"),
    )
    (output_dir / "demo_table.md").write_text(table + "\n")
    write_json_atomic(output_dir / "demo_summary.json", {**results, "linear_probe": probe})
    print(f"\nbalora demo: plots and runs written to {output_dir}/ (demo_losses.png, demo_accuracy.png)")
    return results


def _main_metric(metrics: dict[str, Any]) -> str:
    for key in ("eval_accuracy", "eval_matthews_correlation", "eval_pearson"):
        if key in metrics:
            return key
    raise ValueError(f"no validation metric in {sorted(metrics)}")


def format_table(results: dict[str, Any], metric: str) -> str:
    terms = ("task_loss", "consistency_loss", "diversity_loss", "svd_loss")
    header = f"| method | {metric.removeprefix('eval_')} | " + " | ".join(terms) + " | time (s) |"
    lines = [header, "|" + "---|" * (len(terms) + 3)]
    for method, result in results.items():
        final = result["final_terms"]
        cells = [f"{final[t]:.4f}" if t in final else "—" for t in terms]
        lines.append(
            f"| {method} | {result['metrics'][metric]:.4f} | " + " | ".join(cells) + f" | {result['seconds']} |"
        )
    return "\n".join(lines)
