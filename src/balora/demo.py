"""`balora demo`: PiSSA and BA-LoRA on the same data with the same seed, side by side with a linear probe on the frozen
model's features (the cheapest honest baseline), fully offline.

The training step is given (`train(experiment, overwrite=...)`; the CLI passes `balora.train.train_experiment`), so
that the demo does not import another command.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from balora import rundir
from balora.experiment import load_experiment
from balora.io import read_text, write_json_atomic, write_text_atomic
from balora.losses import LOSS_TERMS
from balora.plots import plot_metric_bars, plot_training_curves

METHODS = ("pissa", "balora")
PROBE = "linear probe (frozen)"


def run_probe(config: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The frozen model's linear probe on the same training and validation rows as the runs (`balora.probe`)."""
    from balora.prepare import prepare
    from balora.probe import linear_probe

    experiment, _ = load_experiment(config, list(overrides or []))
    prepared = prepare(experiment)
    start = time.perf_counter()
    p = prepared
    result = linear_probe(p.model, p.train, p.eval["validation"], p.collator, p.spec)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["final_terms"] = {}
    return result


def run_demo(config: Path, output_dir: Path, *, train: Callable[..., Any], overwrite: bool = False) -> dict[str, Any]:
    """Train each method of METHODS from `config`, print a table and write plots and a summary to `output_dir`.

    The runs go to OUTPUT_DIR/<method>; an earlier demo there is refused unless `overwrite` (checked for every
    method before the first one trains).
    """
    experiments = {
        method: load_experiment(config, ["--balora.method", method, "--output_dir", str(output_dir / method)])[0]
        for method in METHODS
    }
    for experiment in experiments.values():
        rundir.check_claim(Path(experiment.output_dir), overwrite=overwrite)
    results: dict[str, Any] = {}
    histories: dict[str, Any] = {}
    for method, experiment in experiments.items():
        print(
            f"\n=== {method}: {experiment.model.name} on {experiment.data.task} "
            f"({experiment.data.max_train_samples or 'all'} training rows) ===",
            flush=True,
        )
        start = time.perf_counter()
        result = dataclasses.asdict(train(experiment, overwrite=overwrite))
        result["seconds"] = round(time.perf_counter() - start, 1)
        results[method] = result

        histories[method] = json.loads(read_text(output_dir / method / rundir.LOG_HISTORY))
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
    write_text_atomic(output_dir / "demo_table.md", table + "\n")
    write_json_atomic(output_dir / "demo_summary.json", {**results, "linear_probe": probe})
    print(f"\nbalora demo: plots and runs written to {output_dir}/ (demo_losses.png, demo_accuracy.png)")
    return results


def _main_metric(metrics: dict[str, Any]) -> str:
    for key in ("eval_accuracy", "eval_matthews_correlation", "eval_pearson"):
        if key in metrics:
            return key
    raise ValueError(f"no validation metric in {sorted(metrics)}")


def format_table(results: dict[str, Any], metric: str) -> str:
    terms = LOSS_TERMS
    header = f"| method | {metric.removeprefix('eval_')} | " + " | ".join(terms) + " | time (s) |"
    lines = [header, "|" + "---|" * (len(terms) + 3)]
    for method, result in results.items():
        final = result["final_terms"]
        cells = [f"{final[t]:.4f}" if t in final else "—" for t in terms]
        lines.append(
            f"| {method} | {result['metrics'][metric]:.4f} | " + " | ".join(cells) + f" | {result['seconds']} |"
        )
    return "\n".join(lines)
