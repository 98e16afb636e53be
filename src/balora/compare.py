"""`balora compare`: methods × seeds × label-noise levels from one experiment, everything else identical.

Each run is the experiment with only `balora.method` (and, for variants, a loss weight), `training.seed`,
`data.label_noise` and `output_dir` changed, trained one after another into OUTPUT/<method>/noise-<p>/seed-<s>/.
A run whose metrics.json exists is finished and never redone (its config must match, or the comparison stops); an
unfinished run directory is deleted and the run trained again from scratch. After training, each run gets its
diagnostics and, with `eval_task`, a generation benchmark. OUTPUT gets comparison.json (every run's figures),
comparison.md (mean ± std over seeds) and comparison.png.

The steps are given, not imported: `train(experiment, overwrite=True)` and `diagnose(run_dir, **options)` (the CLI
passes `balora.train.train_experiment` and `balora.diagnose.diagnose_run`), so the commands stand side by side.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balora import methods as method_presets
from balora import rundir
from balora.experiment import ConfigError, Experiment, load_experiment, load_yaml
from balora.io import read_text, write_json_atomic, write_text_atomic
from balora.plots import _pyplot, _save

# method name -> overrides on top of the experiment. Baselines get explicit zero weights so that a config written
# for balora (with weights set) also runs them.
_NO_REGULARIZERS = ["--balora.consistency_weight", "0.0", "--balora.diversity_weight", "0.0",
                    "--balora.svd_weight", "0.0"]
METHODS: dict[str, list[str]] = {
    "lora": ["--balora.method", "lora", *_NO_REGULARIZERS],
    "pissa": ["--balora.method", "pissa", *_NO_REGULARIZERS],
    "balora": ["--balora.method", "balora"],
    "balora-paper": ["--balora.method", "balora", "--balora.preset", "paper"],  # the paper's literal NLU reading
    "balora-nosvd": ["--balora.method", "balora", "--balora.svd_weight", "0.0"],
    "balora-featsvd": ["--balora.method", "balora", "--balora.svd_input", "features"],
    "full": ["--balora.method", "full", *_NO_REGULARIZERS],
}
METHODS.update({name: method_presets.overrides(name) for name in method_presets.PRESETS})  # dora, balora+dora, ...
RUN_INFO = "compare_run.json"
DIAGNOSTIC_KEYS = ("drift_kl", "perplexity_change", "predicted_class_entropy", "true_label_entropy",
                   "logits_effective_rank", "features_effective_rank", "memorisation", "clean_fit",
                   "distinct_1", "distinct_2")


@dataclass(frozen=True)
class RunSpec:
    method: str
    noise: float
    seed: int

    def subdir(self) -> str:
        return f"{self.method}/noise-{self.noise:g}/seed-{self.seed}"


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if not methods or len(set(methods)) != len(methods):
        raise ConfigError(f"--methods needs distinct names, e.g. lora,pissa,balora; got {text!r}")
    return methods


def parse_seeds(text: str) -> list[int]:
    """'3' means seeds 0, 1, 2; a comma list ('1,7,42') names the seeds."""
    try:
        if "," not in text:
            count = int(text)
            if count < 1:
                raise ConfigError(f"--seeds must be >= 1; got {text!r}")
            return list(range(count))
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes a count (3) or a comma list (0,1,2); got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds repeats a seed: {text!r}")
    return seeds


def parse_noise(text: str) -> list[float]:
    try:
        levels = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--label-noise takes a comma list of rates in [0, 1), e.g. 0,0.2,0.4; got {text!r}") \
            from None
    if not levels or any(not 0.0 <= p < 1.0 for p in levels) or len(set(levels)) != len(levels):
        raise ConfigError(f"--label-noise needs distinct rates in [0, 1); got {text!r}")
    return levels


def plan(config: str | Path, methods: Sequence[str], seeds: Sequence[int], noises: Sequence[float],
         output_dir: Path, overrides: Sequence[str], full_learning_rate: float | None = None,
         ) -> list[tuple[RunSpec, Experiment, dict[str, Any]]]:
    """Every run's spec, validated experiment and raw mapping, in the order they run (before anything trains).

    `full_learning_rate`: the learning rate of the `full` runs only (full fine-tuning usually needs one 10-100x
    smaller than an adapter); None: the experiment's, like every other method.
    """
    if full_learning_rate is not None and ("full" not in methods or not full_learning_rate > 0):
        raise ConfigError(f"--full-learning-rate {full_learning_rate!r}: needs a rate > 0 and `full` in --methods")
    runs = []
    # Seed outermost: an interrupted comparison holds whole seeds of the method × noise grid.
    for seed in seeds:
        for noise in noises:
            for method in methods:
                spec = RunSpec(method, noise, seed)
                per_run = [*METHODS[method], "--training.seed", str(seed), "--data.label_noise", str(noise),
                           "--output_dir", str(output_dir / spec.subdir())]
                if method == "full" and full_learning_rate is not None:
                    per_run += ["--training.learning_rate", repr(float(full_learning_rate))]
                experiment, raw = load_experiment(config, [*overrides, *per_run])
                if experiment.is_nlg and noise > 0:
                    raise ConfigError("label noise applies to classification only; use --label-noise 0 for NLG")
                runs.append((spec, experiment, raw))
    return runs


def _same_config(run_dir: Path, raw: dict[str, Any]) -> None:
    """A finished run is reused only if every key the experiment file and overrides set has the value it had then.

    Library defaults are not compared: a default changed in a newer balora does not invalidate finished runs.
    """
    saved = load_yaml(read_text(run_dir / rundir.CONFIG, "run config")) or {}
    for section, values in raw.items():
        if section == "output_dir" or not isinstance(values, dict):
            continue
        for key, value in values.items():
            before = (saved.get(section) or {}).get(key)
            if before != value:
                raise ConfigError(
                    f"{run_dir} was trained with {section}.{key} = {before!r}, now {value!r}; choose a new "
                    "--output-dir or delete that run to redo it"
                )


Train = Callable[..., Any]  # train(experiment, *, overwrite: bool) writes the run directory
Diagnose = Callable[..., Any]  # diagnose(run_dir, **options) writes run_dir/diagnostics.json


def run_one(spec: RunSpec, experiment: Experiment, raw: dict[str, Any], *, train: Train, diagnose: Diagnose,
            eval_task: str | None, eval_limit: int | None, eval_max_new_tokens: int | None,
            diagnose_options: dict[str, Any]) -> dict[str, Any]:
    """Train (unless finished), evaluate and diagnose one run; returns its figures."""
    run_dir = Path(experiment.output_dir)
    reused = rundir.is_finished(run_dir)
    if reused:
        _same_config(run_dir, raw)
    else:
        start = time.perf_counter()
        train(experiment, overwrite=True)  # an interrupted run is deleted and trained again from scratch
        write_json_atomic(run_dir / RUN_INFO, {"wall_seconds": round(time.perf_counter() - start, 2)})
    if eval_task and not (run_dir / f"eval-{eval_task}" / "summary.json").is_file():
        _generation_eval(run_dir, eval_task, eval_limit, eval_max_new_tokens)
    if not (run_dir / rundir.DIAGNOSTICS).is_file():
        diagnose(run_dir, **diagnose_options)
    return collect(spec, run_dir, eval_task, reused)


def _generation_eval(run_dir: Path, task: str, limit: int | None, max_new_tokens: int | None) -> None:
    from balora.eval.tasks import evaluate_generation

    experiment, model, tokenizer = rundir.load_run(run_dir)
    evaluate_generation(model, tokenizer, task, out_dir=run_dir / f"eval-{task}", limit=limit,
                        max_new_tokens=max_new_tokens, template=experiment.data.template, progress=False)


def _read(path: Path) -> Any:
    return json.loads(read_text(path)) if path.is_file() else None


def collect(spec: RunSpec, run_dir: Path, eval_task: str | None, reused: bool) -> dict[str, Any]:
    """One run's figures from its directory."""
    metrics = _read(run_dir / rundir.METRICS)
    diagnostics = {k: v for k, v in (_read(run_dir / rundir.DIAGNOSTICS) or {}).items() if k != "samples"}
    info = _read(run_dir / RUN_INFO) or {}
    figures = {"method": spec.method, "noise": spec.noise, "seed": spec.seed, "run_dir": str(run_dir),
               "reused": reused, "metrics": metrics["metrics"], "final_terms": metrics.get("final_terms", {}),
               "wall_seconds": info.get("wall_seconds"), "diagnostics": diagnostics}
    if eval_task:
        summary = _read(run_dir / f"eval-{eval_task}" / "summary.json") or {}
        figures["generation"] = {k: v for k, v in summary.items() if isinstance(v, int | float | str)}
    return figures


def main_metric(run: dict[str, Any], eval_task: str | None) -> tuple[str, float | None]:
    """The figure compared across methods: the benchmark accuracy, else the first validation metric."""
    if eval_task:
        return f"{eval_task}_accuracy", run.get("generation", {}).get("accuracy")
    for key in ("eval_accuracy", "eval_matthews_correlation", "eval_pearson", "eval_loss"):
        if key in run["metrics"]:
            return key, run["metrics"][key]
    return "none", None


def _mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarise(runs: Sequence[dict[str, Any]], eval_task: str | None) -> list[dict[str, Any]]:
    """Mean ± std over seeds (sample std, n − 1) per method and noise level."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["noise"]), []).append(run)
    rows = []
    for (method, noise), group in groups.items():
        metric = main_metric(group[0], eval_task)[0]
        row = {"method": method, "noise": noise, "metric": metric, "seeds": [r["seed"] for r in group],
               metric: _mean_std([main_metric(r, eval_task)[1] for r in group]),
               "wall_seconds": _mean_std([r["wall_seconds"] for r in group]),
               "eval_seconds": _mean_std([r.get("generation", {}).get("total_s") for r in group])}
        for key in DIAGNOSTIC_KEYS:
            row[key] = _mean_std([r["diagnostics"].get(key) for r in group])
        rows.append(row)
    return rows


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} logical CPUs visible "
            f"(torch threads {torch.get_num_threads()}), {device}, torch {torch.__version__}")


def compare(config: str | Path, *, train: Train, diagnose: Diagnose, methods: Sequence[str], seeds: Sequence[int],
            noises: Sequence[float], output_dir: str | Path | None = None, overrides: Sequence[str] = (),
            eval_task: str | None = None, eval_limit: int | None = None, eval_max_new_tokens: int | None = None,
            diagnose_options: dict[str, Any] | None = None, command: str = "",
            full_learning_rate: float | None = None) -> dict[str, Any]:
    """Run (or resume) the whole comparison and write comparison.{json,md,png}; returns comparison.json's content."""
    if output_dir is None:
        output_dir = load_experiment(config, list(overrides))[0].output_dir
    out = Path(output_dir)
    runs = plan(config, methods, seeds, noises, out, overrides, full_learning_rate)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": command, "config": str(config), "overrides": list(overrides), "methods": list(methods),
        "seeds": list(seeds), "label_noise": list(noises), "eval_task": eval_task, "eval_limit": eval_limit,
        "full_learning_rate": full_learning_rate if "full" in methods else None,
        "output_dir": str(out), "machine": machine(), "runs": [],
    }
    for index, (spec, experiment, raw) in enumerate(runs, start=1):
        print(f"balora compare: run {index}/{len(runs)}: {spec.subdir()}", flush=True)
        result["runs"].append(run_one(spec, experiment, raw, train=train, diagnose=diagnose,
                                      eval_task=eval_task, eval_limit=eval_limit,
                                      eval_max_new_tokens=eval_max_new_tokens,
                                      diagnose_options=diagnose_options or {}))
        write_json_atomic(out / "comparison.json", result)  # progress so far
    result["summary"] = summarise(result["runs"], eval_task)
    write_json_atomic(out / "comparison.json", result)
    write_report(result, out)
    return result


# ------------------------------------------------------------------------------------------------ report

_DIAGNOSTIC_COLUMNS = (
    ("drift_kl", "drift KL(pre‖ft)"), ("perplexity_change", "Δ perplexity"),
    ("predicted_class_entropy", "H(pred)"), ("true_label_entropy", "H(labels)"),
    ("logits_effective_rank", "erank logits"), ("features_effective_rank", "erank features"),
    ("memorisation", "memorised (flipped)"), ("clean_fit", "fitted (clean)"),
    ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("wall_seconds", "wall (s)"),
    ("eval_seconds", "benchmark eval (s)"),
)


def _cell(stat: dict[str, Any] | None, digits: int = 4) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    mean = stat["mean"] + 0.0  # no "-0.000"
    if stat["n"] > 1:
        return f"{mean:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{mean:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    summary = result["summary"]
    metric = summary[0]["metric"] if summary else "metric"
    noises = result["label_noise"]
    lines = [
        "# balora compare", "",
        f"- command: `{result['command']}`" if result["command"] else f"- config: `{result['config']}`",
        f"- machine: {result['machine']}",
        f"- methods {', '.join(result['methods'])}; seeds {result['seeds']}; label noise {noises}",
        f"- {len(result['runs'])} runs; mean ± sample std over seeds", "",
        *([f"- `full` (full fine-tuning) trained with learning rate {result['full_learning_rate']:g}; every other "
           "setting as the other methods", ""] if result.get("full_learning_rate") is not None else []),
        f"## {metric}", "",
        "| method | " + " | ".join(f"noise {p:g}" for p in noises) + " |",
        "|---|" + "---|" * len(noises),
    ]
    by_key = {(row["method"], row["noise"]): row for row in summary}
    for method in result["methods"]:
        cells = [_cell(by_key.get((method, p), {}).get(metric)) for p in noises]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    present = [(k, title) for k, title in _DIAGNOSTIC_COLUMNS if any(_cell(row.get(k)) != "—" for row in summary)]
    lines += ["", "## Diagnostics (docs/diagnostics.md) and wall time", "",
              "| method | noise | " + " | ".join(title for _, title in present) + " |",
              "|---|---|" + "---|" * len(present)]
    for method in result["methods"]:
        for p in noises:
            row = by_key.get((method, p))
            if row is not None:
                cells = [_cell(row.get(k), 1 if k.endswith("_seconds") else 3) for k, _ in present]
                lines.append(f"| {method} | {p:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Metric against label-noise level, one line per method, error bars = sample std over seeds."""
    plt = _pyplot()
    summary = result["summary"]
    metric = summary[0]["metric"] if summary else "metric"
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for method in result["methods"]:
        rows = sorted((r for r in summary if r["method"] == method and r[metric]["mean"] is not None),
                      key=lambda r: r["noise"])
        if rows:
            ax.errorbar([r["noise"] for r in rows], [r[metric]["mean"] for r in rows],
                        yerr=[r[metric]["std"] for r in rows], marker="o", capsize=3, label=method)
    ax.set_xlabel("label noise (fraction of training labels flipped)")
    ax.set_ylabel(metric.removeprefix("eval_"))
    ax.set_xticks(result["label_noise"])
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{metric.removeprefix('eval_')} vs label noise ({len(result['seeds'])} seeds)")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def write_report(result: dict[str, Any], out: Path) -> None:
    write_text_atomic(out / "comparison.md", markdown(result))
    plot(result, out / "comparison.png")
