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
import math
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

@dataclass(frozen=True)
class RunSpec:
    """One run of the grid. `imbalance`: the minority class's share (None: the data as it is). `learning_rate` is
    set for the learning-rate selection runs only, which train on the training rows minus the dev rows and are
    scored on the dev rows (OUTPUT/lr-select/...)."""

    method: str
    noise: float
    seed: int
    imbalance: float | None = None
    learning_rate: float | None = None

    def condition(self) -> str:
        """The data condition, the same for every method: 'noise 0.2', 'imbalance 0.05, noise 0'."""
        noise = f"noise {self.noise:g}"
        return noise if self.imbalance is None else f"imbalance {self.imbalance:g}, {noise}"

    def subdir(self) -> str:
        if self.learning_rate is not None:
            return f"lr-select/{self.method}/lr-{self.learning_rate:g}/seed-{self.seed}"
        imbalance = "" if self.imbalance is None else f"imbalance-{self.imbalance:g}/"
        return f"{self.method}/{imbalance}noise-{self.noise:g}/seed-{self.seed}"


def method_overrides(name: str) -> list[str]:
    """The overrides of a method, or of a sweep variant `base@key=value` (the base method with `balora.key` set)."""
    if name in METHODS:
        return list(METHODS[name])
    base, at, setting = name.partition("@")
    key, eq, value = setting.partition("=")
    if not at or not eq or base not in METHODS or not key or not value:
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(METHODS)} (or a sweep variant "
                          "balora@KEY=VALUE, made by --sweep)")
    return [*METHODS[base], f"--balora.{key}", value]


def base_method(name: str) -> str:
    """`balora@consistency_weight=0.1` -> `balora`; a plain method name is its own base."""
    return name.partition("@")[0]


def parse_sweep(text: str, base: str = "balora") -> list[str]:
    """`balora.KEY=v1,v2,...` -> the variant methods `base@KEY=v1`, ... (any `balora.*` key)."""
    key, eq, values = text.partition("=")
    key = key.strip()
    if not eq or not key.startswith("balora.") or key == "balora." or not values.strip():
        raise ConfigError(f"--sweep takes balora.KEY=v1,v2,... (e.g. balora.consistency_weight=0,0.1,0.4); got "
                          f"{text!r}")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if len(set(items)) != len(items):
        raise ConfigError(f"--sweep repeats a value: {text!r}")
    if base not in METHODS:
        raise ConfigError(f"--sweep-method {base!r} is not a method; choose from {', '.join(METHODS)}")
    return [f"{base}@{key.removeprefix('balora.')}={v}" for v in items]


def parse_rates(text: str, flag: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes a comma list of positive numbers, e.g. 1e-4,3e-4,1e-3; got {text!r}") \
            from None
    if not rates or any(not r > 0 for r in rates) or len(set(rates)) != len(rates):
        raise ConfigError(f"{flag} needs distinct positive numbers; got {text!r}")
    return rates


def parse_imbalance(text: str | None) -> list[float | None]:
    """None (no flag): the data as it is; else a comma list of minority-class shares in (0, 0.5)."""
    if text is None:
        return [None]
    try:
        shares = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--class-imbalance takes a comma list of shares in (0, 0.5), e.g. 0.1,0.05; got {text!r}") \
            from None
    if not shares or any(not 0.0 < p < 0.5 for p in shares) or len(set(shares)) != len(shares):
        raise ConfigError(f"--class-imbalance needs distinct shares in (0, 0.5); got {text!r}")
    return list(shares)


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


def _load(config: str | Path, spec: RunSpec, output_dir: Path, overrides: Sequence[str], extra: Sequence[str],
          ) -> tuple[RunSpec, Experiment, dict[str, Any]]:
    per_run = [*method_overrides(spec.method), "--training.seed", str(spec.seed), "--data.label_noise",
               str(spec.noise), *extra, "--output_dir", str(output_dir / spec.subdir())]
    if spec.imbalance is not None:
        per_run += ["--data.class_imbalance", str(spec.imbalance)]
    experiment, raw = load_experiment(config, [*overrides, *per_run])
    if experiment.is_nlg and spec.noise > 0:
        raise ConfigError("label noise applies to classification only; use --label-noise 0 for NLG")
    if experiment.is_nlg and spec.imbalance is not None:
        raise ConfigError("--class-imbalance applies to classification only")
    return spec, experiment, raw


def plan(config: str | Path, methods: Sequence[str], seeds: Sequence[int], noises: Sequence[float],
         output_dir: Path, overrides: Sequence[str], full_learning_rate: float | None = None,
         imbalances: Sequence[float | None] = (None,), learning_rates: dict[str, float] | None = None,
         ) -> list[tuple[RunSpec, Experiment, dict[str, Any]]]:
    """Every run's spec, validated experiment and raw mapping, in the order they run (before anything trains).

    `full_learning_rate`: the learning rate of the `full` runs only (full fine-tuning usually needs one 10-100x
    smaller than an adapter); None: the experiment's, like every other method. `learning_rates`: base method ->
    the rate chosen for it (`select_learning_rates`); a sweep variant runs at its base method's rate.

    Paired seeds: seed s sets `training.seed` = s for every method, and the training subset, the dev rows, the
    imbalance subsample and the label flips are all drawn from that seed alone, so every method of seed s sees the
    same rows, flips and order.
    """
    if full_learning_rate is not None and ("full" not in methods or not full_learning_rate > 0):
        raise ConfigError(f"--full-learning-rate {full_learning_rate!r}: needs a rate > 0 and `full` in --methods")
    runs = []
    # Seed outermost: an interrupted comparison holds whole seeds of the method × condition grid.
    for seed in seeds:
        for imbalance in imbalances:
            for noise in noises:
                for method in methods:
                    extra: list[str] = []
                    rate = (learning_rates or {}).get(base_method(method))
                    if method == "full" and full_learning_rate is not None:
                        rate = full_learning_rate
                    if rate is not None:
                        extra = ["--training.learning_rate", repr(float(rate))]
                    runs.append(_load(config, RunSpec(method, noise, seed, imbalance), output_dir, overrides, extra))
    return runs


def plan_selection(config: str | Path, methods: Sequence[str], rates: Sequence[float], seed: int, dev_rows: int,
                   output_dir: Path, overrides: Sequence[str], imbalance: float | None = None,
                   ) -> list[tuple[RunSpec, Experiment, dict[str, Any]]]:
    """The learning-rate selection runs: each base method at each rate, seed `seed`, no label noise, trained on the
    training rows minus `dev_rows` held-out rows and scored on those (`data.dev_rows`): never on the validation set.
    Evaluation during training is switched off (only the final dev score counts)."""
    bases = list(dict.fromkeys(base_method(m) for m in methods))
    runs = []
    for method in bases:
        for rate in rates:
            extra = ["--training.learning_rate", repr(float(rate)), "--data.dev_rows", str(dev_rows),
                     "--training.eval_strategy", "no"]
            runs.append(_load(config, RunSpec(method, 0.0, seed, imbalance, learning_rate=rate), output_dir,
                              overrides, extra))
    return runs


def selection_score(metrics: dict[str, float]) -> tuple[str, float, bool]:
    """(key, value, higher_is_better) of a selection run's dev score: the task metric for classification (accuracy,
    Matthews correlation or Pearson), else the dev loss (NLG: mean NLL of the dev responses)."""
    for key in ("eval_accuracy", "eval_matthews_correlation", "eval_pearson"):
        if key in metrics:
            return key, metrics[key], True
    if "eval_loss" in metrics:
        return "eval_loss", metrics["eval_loss"], False
    raise ConfigError(f"a selection run has no dev score (metrics {sorted(metrics)})")


def choose_rates(grid: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Each method's best rate on the dev rows; a diverged run (NaN score) never wins; ties go to the smaller rate."""
    best: dict[str, tuple[float, float]] = {}
    for row in grid:
        value = row["score"]
        if value is None or value != value:  # NaN
            continue
        key = value if row["higher_is_better"] else -value
        current = best.get(row["method"])
        if current is None or key > current[0] or (key == current[0] and row["learning_rate"] < current[1]):
            best[row["method"]] = (key, row["learning_rate"])
    missing = sorted({row["method"] for row in grid} - set(best))
    if missing:
        raise ConfigError(f"no learning rate gave a finite dev score for {', '.join(missing)}; try smaller rates")
    return {method: rate for method, (_, rate) in best.items()}


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


def run_one(spec: RunSpec, experiment: Experiment, raw: dict[str, Any], *, train: Train, diagnose: Diagnose | None,
            eval_task: str | None, eval_limit: int | None, eval_max_new_tokens: int | None,
            diagnose_options: dict[str, Any]) -> dict[str, Any]:
    """Train (unless finished), evaluate and diagnose (unless `diagnose` is None) one run; returns its figures."""
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
    if diagnose is not None and not (run_dir / rundir.DIAGNOSTICS).is_file():
        diagnose(run_dir, **diagnose_options)
    return collect(spec, run_dir, eval_task, reused)


def _generation_eval(run_dir: Path, task: str, limit: int | None, max_new_tokens: int | None) -> None:
    from balora.eval.tasks import evaluate_generation

    experiment, model, tokenizer = rundir.load_run(run_dir)
    evaluate_generation(model, tokenizer, task, out_dir=run_dir / f"eval-{task}", limit=limit,
                        max_new_tokens=max_new_tokens, template=experiment.data.template, progress=False)


def _read(path: Path) -> Any:
    return json.loads(read_text(path)) if path.is_file() else None


def curve(history: Sequence[dict[str, Any]], metric: str) -> list[list[float]]:
    """[[step, value], ...] of a validation metric (`eval_accuracy`) evaluated during training, from the Trainer's log
    history (where it is logged as `eval_validation_accuracy` or `eval_accuracy`)."""
    name = metric.removeprefix("eval_")
    keys = (f"eval_validation_{name}", f"eval_{name}")
    points = {int(e["step"]): float(e[k]) for e in history for k in keys if k in e and "step" in e}
    return [[step, points[step]] for step in sorted(points)]  # the final evaluation repeats the last step's


def extras(metrics: dict[str, Any], data_stats: dict[str, Any], history: Sequence[dict[str, Any]],
           main: str) -> dict[str, Any]:
    """The study figures of one run: macro-F1; the recall of the class made a minority (`data.class_imbalance`);
    the curve of the main metric over steps and its best value (the final one included)."""
    out: dict[str, Any] = {}
    if "eval_macro_f1" in metrics:
        out["macro_f1"] = metrics["eval_macro_f1"]
    imbalance = (data_stats.get("train") or {}).get("imbalance")
    if imbalance is not None:
        out["minority_class"] = imbalance["minority_class"]
        out["minority_recall"] = metrics.get(f"eval_recall_{imbalance['minority_class']}")
    points = curve(history, main)
    if len(points) > 1 and main in metrics:  # evaluated during training, not only at the end
        out["curve"] = points
        out[f"best_{main.removeprefix('eval_')}"] = max([v for _, v in points] + [metrics[main]])
    return out


def collect(spec: RunSpec, run_dir: Path, eval_task: str | None, reused: bool) -> dict[str, Any]:
    """One run's figures from its directory."""
    metrics = _read(run_dir / rundir.METRICS)
    diagnostics = {k: v for k, v in (_read(run_dir / rundir.DIAGNOSTICS) or {}).items()
                   if k not in ("samples", "retention")}
    info = _read(run_dir / RUN_INFO) or {}
    figures = {"method": spec.method, "noise": spec.noise, "imbalance": spec.imbalance, "seed": spec.seed,
               "condition": spec.condition(), "run_dir": str(run_dir), "reused": reused,
               "metrics": metrics["metrics"], "final_terms": metrics.get("final_terms", {}),
               "wall_seconds": info.get("wall_seconds"), "diagnostics": diagnostics}
    if spec.learning_rate is not None:
        figures["learning_rate"] = spec.learning_rate
    if eval_task:
        summary = _read(run_dir / f"eval-{eval_task}" / "summary.json") or {}
        figures["generation"] = {k: v for k, v in summary.items() if isinstance(v, int | float | str)}
    history = _read(run_dir / rundir.LOG_HISTORY) or []
    figures["extras"] = extras(metrics["metrics"], metrics.get("data") or {}, history,
                               main_metric(figures, None)[0])
    return figures


def main_metric(run: dict[str, Any], eval_task: str | None) -> tuple[str, float | None]:
    """The figure compared across methods: the benchmark accuracy, else the first validation metric."""
    if eval_task:
        return f"{eval_task}_accuracy", run.get("generation", {}).get("accuracy")
    for key in ("eval_accuracy", "eval_matthews_correlation", "eval_pearson", "eval_loss"):
        if key in run["metrics"]:
            return key, run["metrics"][key]
    if (run.get("diagnostics") or {}).get("task_nll") is not None:  # NLG without a validation file: diagnose's
        return "task_nll", run["diagnostics"]["task_nll"]  # teacher-forced NLL of the task's test references
    return "none", None


# Figures beside the main metric that get means and paired differences when every run has them.
STUDY_KEYS = ("best_accuracy", "best_matthews_correlation", "macro_f1", "minority_recall")
RETENTION_KEYS = ("task_nll", "task_nll_change", "alpaca_nll", "alpaca_kl", "mbpp_nll", "mbpp_kl")
DIAGNOSTIC_KEYS = ("drift_kl", "features_drift", "perplexity_change", "predicted_class_entropy",
                   "true_label_entropy", "logits_effective_rank", "features_effective_rank", "memorisation",
                   "clean_fit", "distinct_1", "distinct_2", *RETENTION_KEYS)
LOWER_IS_BETTER = {"eval_loss", "drift_kl", "features_drift", "memorisation", *RETENTION_KEYS}


def value(run: dict[str, Any], key: str, eval_task: str | None) -> float | None:
    """One figure of a run: the main metric's name, a study figure (`extras`) or a diagnostic."""
    if key == main_metric(run, eval_task)[0]:
        return main_metric(run, eval_task)[1]
    if key.startswith("best_") and len(run.get("extras", {}).get("curve") or []) < 2:
        return None  # evaluated at the end only: no best to speak of
    found = run.get("extras", {}).get(key, run["diagnostics"].get(key))
    return None if found is None else float(found)


def _mean_std(values: Sequence[float | None]) -> dict[str, float | int | None]:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarise(runs: Sequence[dict[str, Any]], eval_task: str | None) -> list[dict[str, Any]]:
    """Mean ± std over seeds (sample std, n − 1) per method and condition (class imbalance, label noise)."""
    groups: dict[tuple[str, Any, float], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["method"], run.get("imbalance"), run["noise"]), []).append(run)
    rows = []
    for (method, imbalance, noise), group in groups.items():
        metric = main_metric(group[0], eval_task)[0]
        row = {"method": method, "noise": noise, "imbalance": imbalance, "condition": group[0].get("condition"),
               "metric": metric, "seeds": [r["seed"] for r in group],
               metric: _mean_std([main_metric(r, eval_task)[1] for r in group]),
               "wall_seconds": _mean_std([r["wall_seconds"] for r in group]),
               "eval_seconds": _mean_std([r.get("generation", {}).get("total_s") for r in group])}
        for key in (*STUDY_KEYS, *DIAGNOSTIC_KEYS):
            row[key] = _mean_std([value(r, key, eval_task) for r in group])
        rows.append(row)
    return rows


def paired_t_interval(differences: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean of paired differences with its two-sided `level` interval from Student's t with n − 1 degrees of
    freedom: mean ± t_{(1+level)/2, n−1} · s / √n, s the sample standard deviation. n < 2: no interval (None)."""
    from scipy import stats

    xs = [float(d) for d in differences]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "low": None, "high": None, "level": level}
    mean = statistics.fmean(xs)
    if n < 2:
        return {"n": 1, "mean": mean, "low": None, "high": None, "level": level}
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * statistics.stdev(xs) / math.sqrt(n)
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "level": level}


def paired_differences(runs: Sequence[dict[str, Any]], reference: str, keys: Sequence[str],
                       eval_task: str | None) -> list[dict[str, Any]]:
    """For each method other than `reference`, each condition and each figure: the differences method − reference
    over the seeds both ran (paired by seed: same rows, flips and order), with `paired_t_interval`."""
    by_run = {(r["method"], r.get("condition"), r["seed"]): r for r in runs}
    methods = list(dict.fromkeys(r["method"] for r in runs))
    conditions = list(dict.fromkeys(r.get("condition") for r in runs))
    out = []
    if reference not in methods:
        return out
    for method in methods:
        if method == reference:
            continue
        for condition in conditions:
            for key in keys:
                diffs, seeds = [], []
                for (m, c, seed), run in by_run.items():
                    ref = by_run.get((reference, c, seed))
                    if m != method or c != condition or ref is None:
                        continue
                    a, b = value(run, key, eval_task), value(ref, key, eval_task)
                    if a is not None and b is not None:
                        diffs.append(a - b)
                        seeds.append(seed)
                if diffs:
                    out.append({"method": method, "reference": reference, "condition": condition, "metric": key,
                                "seeds": seeds, "differences": diffs, **paired_t_interval(diffs)})
    return out


def compared_keys(runs: Sequence[dict[str, Any]], eval_task: str | None) -> list[str]:
    """The main metric, then every study figure and retention / drift figure that some run has (a pair of runs
    that lacks it, e.g. memorisation without label noise, is left out of its differences)."""
    main = main_metric(runs[0], eval_task)[0] if runs else "none"
    keys = [main]
    for key in (*STUDY_KEYS, "drift_kl", "features_drift", "memorisation", *RETENTION_KEYS):
        if key != main and any(value(r, key, eval_task) is not None for r in runs):
            keys.append(key)
    if "alpaca_kl" in keys and "drift_kl" in keys:  # NLG: the same figure under two names
        keys.remove("drift_kl")
    return keys


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} logical CPUs visible "
            f"(torch threads {torch.get_num_threads()}), {device}, torch {torch.__version__}")


def select_learning_rates(config: str | Path, *, train: Train, methods: Sequence[str], rates: Sequence[float],
                          seed: int, dev_rows: int, output_dir: Path, overrides: Sequence[str],
                          imbalance: float | None = None) -> dict[str, Any]:
    """Train each base method at each rate on the dev split (`plan_selection`) and choose each one's best rate."""
    grid = []
    runs = plan_selection(config, methods, rates, seed, dev_rows, output_dir, overrides, imbalance)
    for index, (spec, experiment, raw) in enumerate(runs, start=1):
        print(f"balora compare: learning-rate selection {index}/{len(runs)}: {spec.subdir()}", flush=True)
        figures = run_one(spec, experiment, raw, train=train, diagnose=None, eval_task=None, eval_limit=None,
                          eval_max_new_tokens=None, diagnose_options={})
        key, score, higher = selection_score(figures["metrics"])
        grid.append({"method": spec.method, "learning_rate": spec.learning_rate, "dev_metric": key,
                     "score": score, "higher_is_better": higher, "run_dir": figures["run_dir"]})
    return {"rates": list(rates), "seed": seed, "dev_rows": dev_rows, "imbalance": imbalance,
            "label_noise": 0.0, "grid": grid, "chosen": choose_rates(grid)}


def compare(config: str | Path, *, train: Train, diagnose: Diagnose, methods: Sequence[str], seeds: Sequence[int],
            noises: Sequence[float], output_dir: str | Path | None = None, overrides: Sequence[str] = (),
            eval_task: str | None = None, eval_limit: int | None = None, eval_max_new_tokens: int | None = None,
            diagnose_options: dict[str, Any] | None = None, command: str = "",
            full_learning_rate: float | None = None, imbalances: Sequence[float | None] = (None,),
            learning_rates: Sequence[float] | None = None, dev_rows: int | None = None,
            sweep: Sequence[str] = (), rates_from: str | Path | None = None) -> dict[str, Any]:
    """Run (or resume) the whole comparison and write comparison.{json,md,png}; returns comparison.json's content.

    `learning_rates` (with `dev_rows`): choose each method's rate on a dev split first (`select_learning_rates`,
    seed = the first seed). `rates_from`: reuse the rates another comparison chose (its comparison.json).
    `sweep`: extra variant methods (`parse_sweep`), run and plotted as a trade-off.
    """
    if output_dir is None:
        output_dir = load_experiment(config, list(overrides))[0].output_dir
    out = Path(output_dir)
    all_methods = [*methods, *[v for v in sweep if v not in methods]]
    if learning_rates is not None and dev_rows is None:
        raise ConfigError("--learning-rates needs --dev-rows N: the training rows held out to choose the rate on")
    if dev_rows is not None and learning_rates is None:
        raise ConfigError("--dev-rows is used by --learning-rates only; add --learning-rates or drop --dev-rows")
    # Validate the whole grid before anything trains (a bad override fails now, not after the selection).
    plan(config, all_methods, seeds, noises, out, overrides, full_learning_rate, imbalances)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "command": command, "config": str(config), "overrides": list(overrides), "methods": all_methods,
        "sweep": list(sweep), "seeds": list(seeds), "label_noise": list(noises), "class_imbalance": list(imbalances),
        "eval_task": eval_task, "eval_limit": eval_limit,
        "full_learning_rate": full_learning_rate if "full" in all_methods else None,
        "output_dir": str(out), "machine": machine(), "runs": [],
    }
    chosen = None
    if rates_from is not None:
        if learning_rates is not None:
            raise ConfigError("--rates-from and --learning-rates exclude each other: reuse rates or choose them")
        earlier = json.loads(read_text(Path(rates_from), "comparison"))
        if not isinstance(earlier, dict) or "chosen" not in (earlier.get("lr_selection") or {}):
            raise ConfigError(f"{rates_from} holds no learning-rate selection; run that comparison with "
                              "--learning-rates first")
        result["lr_selection"] = {**earlier["lr_selection"], "from": str(rates_from)}
        chosen = result["lr_selection"]["chosen"]
        missing = sorted({base_method(m) for m in all_methods} - set(chosen) - {"full"})
        if missing:
            raise ConfigError(f"{rates_from} chose no learning rate for {', '.join(missing)}")
    if learning_rates is not None:
        selection_methods = [m for m in all_methods if not (m == "full" and full_learning_rate is not None)]
        result["lr_selection"] = select_learning_rates(
            config, train=train, methods=selection_methods, rates=learning_rates, seed=seeds[0],
            dev_rows=int(dev_rows), output_dir=out, overrides=overrides, imbalance=imbalances[0])
        chosen = result["lr_selection"]["chosen"]
        write_json_atomic(out / "comparison.json", result)
    runs = plan(config, all_methods, seeds, noises, out, overrides, full_learning_rate, imbalances, chosen)
    for index, (spec, experiment, raw) in enumerate(runs, start=1):
        print(f"balora compare: run {index}/{len(runs)}: {spec.subdir()}", flush=True)
        figures = run_one(spec, experiment, raw, train=train, diagnose=diagnose, eval_task=eval_task,
                          eval_limit=eval_limit, eval_max_new_tokens=eval_max_new_tokens,
                          diagnose_options=diagnose_options or {})
        figures["learning_rate"] = float(experiment.training.get("learning_rate", 5e-5))
        result["runs"].append(figures)
        write_json_atomic(out / "comparison.json", result)  # progress so far
    finish(result, out)
    return result


def finish(result: dict[str, Any], out: Path) -> None:
    """Summary, paired differences (vs pissa and vs lora, where they ran) and the report files."""
    eval_task = result.get("eval_task")
    result["summary"] = summarise(result["runs"], eval_task)
    keys = compared_keys(result["runs"], eval_task)
    differences = paired_differences(result["runs"], "pissa", keys, eval_task)
    # against lora too, except pissa − lora: the sign-flipped lora − pissa is already there
    differences += [d for d in paired_differences(result["runs"], "lora", keys, eval_task)
                    if not (d["method"] == "pissa" and differences)]
    result["differences"] = differences
    result["difference_method"] = ("paired t interval over seeds (Student's t, n − 1 degrees of freedom), 95 %; "
                                   "seed s of every method shares its training rows, flips and order")
    write_json_atomic(out / "comparison.json", result)
    write_report(result, out)


# ------------------------------------------------------------------------------------------------ report

_DIAGNOSTIC_COLUMNS = (
    ("drift_kl", "drift KL(pre‖ft)"), ("features_drift", "features drift"), ("perplexity_change", "Δ perplexity"),
    ("task_nll", "task NLL"), ("task_nll_change", "task NLL change"), ("alpaca_nll", "Alpaca NLL"),
    ("alpaca_kl", "Alpaca KL"), ("mbpp_nll", "MBPP NLL"), ("mbpp_kl", "MBPP KL"),
    ("predicted_class_entropy", "H(pred)"), ("true_label_entropy", "H(labels)"),
    ("logits_effective_rank", "erank logits"), ("features_effective_rank", "erank features"),
    ("memorisation", "memorised (flipped)"), ("clean_fit", "fitted (clean)"),
    ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("wall_seconds", "wall (s)"),
    ("eval_seconds", "benchmark eval (s)"),
)
_STUDY_COLUMNS = (("best_accuracy", "best accuracy"), ("best_matthews_correlation", "best MCC"),
                  ("macro_f1", "macro-F1"), ("minority_recall", "minority recall"))


def _cell(stat: dict[str, Any] | None, digits: int = 4) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    mean = stat["mean"] + 0.0  # no "-0.000"
    if stat["n"] > 1:
        return f"{mean:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{mean:.{digits}f}"


def _conditions(result: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(r["condition"] for r in result["summary"]))


def _interval(d: dict[str, Any]) -> str:
    if d["mean"] is None:
        return "—"
    if d["low"] is None:
        return f"{d['mean']:+.4f} (n = 1, no interval)"
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] (n = {d['n']})"


def markdown(result: dict[str, Any]) -> str:
    summary = result["summary"]
    metric = summary[0]["metric"] if summary else "metric"
    conditions = _conditions(result)
    imbalances = [p for p in result.get("class_imbalance", [None]) if p is not None]
    lines = [
        "# balora compare", "",
        f"- command: `{result['command']}`" if result["command"] else f"- config: `{result['config']}`",
        f"- machine: {result['machine']}",
        f"- methods {', '.join(result['methods'])}; seeds {result['seeds']}; label noise {result['label_noise']}"
        + (f"; minority-class share {imbalances}" if imbalances else ""),
        f"- {len(result['runs'])} runs; mean ± sample std over seeds",
        *([f"- {result['note']}"] if result.get("note") else []), "",
        *([f"- `full` (full fine-tuning) trained with learning rate {result['full_learning_rate']:g}; every other "
           "setting as the other methods", ""] if result.get("full_learning_rate") is not None else []),
    ]
    selection = result.get("lr_selection")
    if selection:
        rates = selection["rates"]
        dev_metric = selection["grid"][0]["dev_metric"] if selection["grid"] else "score"
        source = f" (reused from `{selection['from']}`)" if selection.get("from") else ""
        lines += [f"## Learning rates, chosen on a dev split{source}", "",
                  f"Each method trained at each rate on the training rows minus {selection['dev_rows']} held-out "
                  f"rows (seed {selection['seed']}, no label noise), scored by {dev_metric} on those rows; the "
                  "validation set is never seen. The seeds below ran at the chosen rate (**bold**).", "",
                  "| method | " + " | ".join(f"lr {r:g}" for r in rates) + " |", "|---|" + "---|" * len(rates)]
        by = {(g["method"], g["learning_rate"]): g["score"] for g in selection["grid"]}
        for method, best in selection["chosen"].items():
            cells = []
            for r in rates:
                score = by.get((method, r))
                text = "—" if score is None else f"{score:.4f}"
                cells.append(f"**{text}**" if r == best else text)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"## {metric}", "", "| method | " + " | ".join(conditions) + " |", "|---|" + "---|" * len(conditions)]
    by_key = {(row["method"], row["condition"]): row for row in summary}
    for method in result["methods"]:
        cells = [_cell(by_key.get((method, c), {}).get(metric)) for c in conditions]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    study = [(k, title) for k, title in _STUDY_COLUMNS if any(_cell(row.get(k)) != "—" for row in summary)]
    if study:
        lines += ["", "## Study figures", "", "| method | condition | " + " | ".join(t for _, t in study) + " |",
                  "|---|---|" + "---|" * len(study)]
        for method in result["methods"]:
            for c in conditions:
                row = by_key.get((method, c))
                if row is not None:
                    lines.append(f"| {method} | {c} | " + " | ".join(_cell(row.get(k)) for k, _ in study) + " |")
    differences = result.get("differences") or []
    if differences:
        lines += ["", "## Paired differences", "",
                  f"Method − reference, {result.get('difference_method', '')}. An interval that excludes 0 is a "
                  "difference this many seeds resolve; for drift, NLL and memorisation lower is better.", "",
                  "| method − reference | condition | figure | mean difference [95 % CI] (seeds) |",
                  "|---|---|---|---|"]
        for d in differences:
            lines.append(f"| {d['method']} − {d['reference']} | {d['condition']} | {d['metric']} | {_interval(d)} |")
    present = [(k, title) for k, title in _DIAGNOSTIC_COLUMNS if any(_cell(row.get(k)) != "—" for row in summary)]
    lines += ["", "## Diagnostics (docs/diagnostics.md) and wall time", "",
              "| method | condition | " + " | ".join(title for _, title in present) + " |",
              "|---|---|" + "---|" * len(present)]
    for method in result["methods"]:
        for c in conditions:
            row = by_key.get((method, c))
            if row is not None:
                cells = [_cell(row.get(k), 1 if k.endswith("_seconds") else 3) for k, _ in present]
                lines.append(f"| {method} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _x_axis(result: dict[str, Any]) -> tuple[str, str]:
    """The data condition that varies (label noise, else class imbalance) and its axis label."""
    if len(result["label_noise"]) > 1 or len(result.get("class_imbalance", [None])) <= 1:
        return "noise", "label noise (fraction of training labels flipped)"
    return "imbalance", "minority-class share of the training rows"


def plot(result: dict[str, Any], path: Path) -> Path:
    """Metric against label noise (or class imbalance), one line per method, error bars = sample std over seeds."""
    plt = _pyplot()
    summary = result["summary"]
    metric = summary[0]["metric"] if summary else "metric"
    axis, label = _x_axis(result)
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for method in result["methods"]:
        rows = sorted((r for r in summary if r["method"] == method and r[metric]["mean"] is not None
                       and r.get(axis) is not None), key=lambda r: r[axis])
        if rows:
            ax.errorbar([r[axis] for r in rows], [r[metric]["mean"] for r in rows],
                        yerr=[r[metric]["std"] for r in rows], marker="o", capsize=3, label=method)
    ax.set_xlabel(label)
    ax.set_ylabel(metric.removeprefix("eval_"))
    ticks = result["label_noise"] if axis == "noise" else [p for p in result["class_imbalance"] if p is not None]
    ax.set_xticks(ticks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{metric.removeprefix('eval_')} ({len(result['seeds'])} seeds)")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def drift_key(summary: Sequence[dict[str, Any]]) -> str | None:
    """The drift figure of a trade-off plot: retention KL on Alpaca (NLG), else the features' drift (NLU)."""
    for key in ("alpaca_kl", "features_drift", "drift_kl"):
        if any(row.get(key, {}).get("mean") is not None for row in summary):
            return key
    return None


def plot_tradeoff(result: dict[str, Any], path: Path) -> Path | None:
    """A sweep's trade-off: task metric against drift, one point per swept value (labelled) and per other method,
    for the first condition; error bars = sample std over seeds. None if there is no sweep or no drift figure."""
    summary = result["summary"]
    key = drift_key(summary)
    if not result.get("sweep") or key is None or not summary:
        return None
    plt = _pyplot()
    metric = summary[0]["metric"]
    first = _conditions(result)[0]
    rows = [r for r in summary if r["condition"] == first and r[metric]["mean"] is not None
            and r[key]["mean"] is not None]
    fig, ax = plt.subplots(figsize=(5.4, 3.8))
    swept = [r for r in rows if r["method"] in result["sweep"]]
    if swept:
        ax.errorbar([r[key]["mean"] for r in swept], [r[metric]["mean"] for r in swept],
                    xerr=[r[key]["std"] for r in swept], yerr=[r[metric]["std"] for r in swept], marker="o",
                    capsize=3, label=result["sweep"][0].partition("=")[0])
        for r in swept:
            ax.annotate(r["method"].partition("=")[2], (r[key]["mean"], r[metric]["mean"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
    for r in rows:
        if r["method"] not in result["sweep"]:
            ax.errorbar([r[key]["mean"]], [r[metric]["mean"]], xerr=[r[key]["std"]], yerr=[r[metric]["std"]],
                        marker="s", capsize=3, linestyle="none", label=r["method"])
    ax.set_xlabel(f"{key} (lower: closer to the pre-trained model)")
    ax.set_ylabel(metric.removeprefix("eval_"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"trade-off, {first}")
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_curves(result: dict[str, Any], path: Path) -> Path | None:
    """The main metric over training steps (mean over seeds), one panel per condition; None without curves."""
    runs = [r for r in result["runs"] if len(r.get("extras", {}).get("curve") or []) > 1]
    if not runs:
        return None
    plt = _pyplot()
    conditions = list(dict.fromkeys(r["condition"] for r in runs))
    metric = main_metric(runs[0], result.get("eval_task"))[0]
    fig, axes = plt.subplots(1, len(conditions), figsize=(4.2 * len(conditions), 3.4), squeeze=False, sharey=True)
    for ax, condition in zip(axes[0], conditions, strict=True):
        for method in result["methods"]:
            curves = [r["extras"]["curve"] for r in runs if r["method"] == method and r["condition"] == condition]
            if not curves:
                continue
            steps = sorted({step for c in curves for step, _ in c})
            means = [statistics.fmean(v for c in curves for s, v in c if s == step) for step in steps]
            ax.plot(steps, means, marker=".", label=method)
        ax.set_title(condition, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"validation {metric.removeprefix('eval_')}")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def write_report(result: dict[str, Any], out: Path) -> None:
    write_text_atomic(out / "comparison.md", markdown(result))
    plot(result, out / "comparison.png")
    plot_tradeoff(result, out / "tradeoff.png")
    plot_curves(result, out / "curves.png")
