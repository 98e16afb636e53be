"""Choose balora's NLU defaults by measurement: PiSSA vs BA-LoRA variants on SST-2, MRPC and CoLA with MiniLM.

Each cell is one `balora train` run (its own process, one torch thread; `--jobs` run side by side), written to
`runs/nlu_defaults/<task>/<method>-s<seed>/` and reused when its metrics.json exists. The frozen model's linear probe
(`balora.probe`) on the same rows is the baseline column; for SST-2 `balora diagnose` measures each run's drift.
The report goes to benchmarks/results/nlu_defaults.{md,json,png}.

    .venv/bin/python benchmarks/nlu_defaults.py --seeds 0,1 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "nlu_defaults"
OUT = ROOT / "benchmarks" / "results" / "nlu_defaults"
# task -> (config, overrides): 2,000 training rows, one epoch, the configs' recipe (mean pooling, lr 1e-3, head 5e-3)
TASKS = {
    "sst2": ("configs/nlu/sst2-minilm.yaml", ["--data.max_length", "64"]),
    "mrpc": ("configs/nlu/mrpc-minilm.yaml", []),
    "cola": ("configs/nlu/cola-minilm.yaml", ["--data.max_length", "64"]),
}
COMMON = ["--data.max_train_samples", "2000", "--training.num_train_epochs", "1", "--training.eval_strategy", "'no'",
          "--training.save_strategy", "'no'", "--training.logging_steps", "25", "--training.disable_tqdm", "true"]
METHODS = {
    "pissa": ["--balora.method", "pissa"],
    "balora-paper": ["--balora.method", "balora", "--balora.preset", "paper"],
    "balora-current": ["--balora.method", "balora", "--balora.consistency_target", "current_head"],
    "balora-features": ["--balora.method", "balora", "--balora.consistency_target", "features"],  # the default
}
METRIC = {"sst2": "eval_accuracy", "mrpc": "eval_f1", "cola": "eval_matthews_correlation"}


def run_cell(task: str, method: str, seed: int) -> Path:
    out = RUNS / task / f"{method}-s{seed}"
    if (out / "metrics.json").is_file():
        return out
    config, extra = TASKS[task]
    cmd = [str(ROOT / ".venv/bin/balora"), "train", config, *COMMON, *extra, *METHODS[method],
           "--training.seed", str(seed), "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = RUNS / task / f"{method}-s{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    return out


def diagnose_cell(run: Path) -> dict:
    path = run / "diagnostics.json"
    if not path.is_file():
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        subprocess.run([str(ROOT / ".venv/bin/balora"), "diagnose", str(run)], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    return json.loads(path.read_text())


def probe(task: str) -> dict:
    path = RUNS / task / "probe.json"
    if path.is_file():
        return json.loads(path.read_text())
    code = (
        "import json, sys; from balora.demo import run_probe; from pathlib import Path; "
        f"r = run_probe(Path({TASKS[task][0]!r}), {TASKS[task][1] + COMMON!r}); "
        "print(json.dumps(r))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,mrpc,cola")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    cells = [(t, m, s) for s in seeds for t in tasks for m in methods]
    start = time.time()
    with ThreadPoolExecutor(args.jobs) as pool:
        probes = {t: pool.submit(probe, t) for t in tasks}
        runs = {c: pool.submit(run_cell, *c) for c in cells}
        results = {c: json.loads((f.result() / "metrics.json").read_text()) for c, f in runs.items()}
        drift = {c: pool.submit(diagnose_cell, RUNS / c[0] / f"{c[1]}-s{c[2]}") for c in cells if c[0] == "sst2"}
        drift = {c: f.result() for c, f in drift.items()}
        probes = {t: f.result() for t, f in probes.items()}
    report(tasks, methods, seeds, results, drift, probes, time.time() - start)


def _stat(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def report(tasks, methods, seeds, results, drift, probes, seconds) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    table: dict = {}
    lines = [
        "# NLU defaults: PiSSA vs BA-LoRA variants (MiniLM, 2,000 training rows, 1 epoch)",
        "",
        f"Command: `.venv/bin/python benchmarks/nlu_defaults.py --tasks {','.join(tasks)} --methods "
        f"{','.join(methods)} --seeds {','.join(map(str, seeds))}`; seeds {seeds}; "
        f"machine: 2-core CPU, one torch thread per run; wall time {seconds / 60:.0f} min (finished runs reused).",
        "Recipe (configs/nlu/*-minilm.yaml): mean pooling, PiSSA r = 8 on query/key/value/dense, lr 1e-3 (head 5e-3), "
        "batch 16, linear decay, 6 % warm-up; full validation sets. Mean ± std over seeds.",
        "",
        "| method | " + " | ".join(f"{t} {METRIC[t].removeprefix('eval_')}" for t in tasks)
        + " | SST-2 features drift | SST-2 drift KL (initial head) |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    for method in methods:
        row = []
        for t in tasks:
            vals = [results[(t, method, s)]["metrics"][METRIC[t]] for s in seeds if (t, method, s) in results]
            table.setdefault(method, {})[t] = vals
            row.append(_stat(vals))
        fd = [drift[(t, method, s)]["features_drift"] for t in ["sst2"] for s in seeds if (t, method, s) in drift]
        kl = [drift[(t, method, s)]["drift_kl"] for t in ["sst2"] for s in seeds if (t, method, s) in drift]
        table[method]["sst2_features_drift"], table[method]["sst2_drift_kl"] = fd, kl
        lines.append(f"| {method} | " + " | ".join(row) + f" | {_stat(fd)} | {_stat(kl)} |")
    lines.append("| linear probe (frozen) | " + " | ".join(f"{probes[t]['metrics'][METRIC[t]]:.4f}" for t in tasks)
                 + " | 0 | — |")
    lines += [
        "",
        "- pissa: PiSSA init, task loss only. balora-paper: `--balora.preset paper` (consistency = KL to the "
        "pre-trained model's logits through the initial head; SVD term on the 2-class logits, constant at k = 5). "
        "balora-current: consistency = KL to the current head applied to the pre-trained features; SVD term on "
        "the pooled features. balora-features (balora's `default` preset since this table): consistency = 1 − "
        "cosine of the pooled features to the pre-trained ones; SVD term on the pooled features.",
        "- Verdict: balora-features halves the representation drift of PiSSA (0.19 vs 0.44) at the same SST-2 "
        "accuracy (within seed noise), so it is the default; balora-current and the paper's reading do not lower "
        "the features drift. MRPC F1 is about 0.007 lower with balora-features (2 seeds). CoLA is not learned by "
        "any method at this budget (2,000 rows, 1 epoch; see docs/results.md for a full-data run).",
        "- features drift: `balora diagnose`, mean 1 − cosine between the run's and the pre-trained model's pooled "
        "features on the validation set. drift KL: KL(pre-trained ‖ fine-tuned) of the logits, where the pre-trained "
        "logits come from the initial (random) head.",
    ]
    (OUT.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    (OUT.with_suffix(".json")).write_text(json.dumps({"table": table, "probe": probes, "seeds": seeds}, indent=1))
    plot(tasks, methods, table, probes)


def plot(tasks, methods, table, probes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, METRIC[t].removeprefix("eval_"), probes[t]["metrics"][METRIC[t]]) for t in tasks]
    panels.append(("sst2_features_drift", "SST-2 features drift (lower: closer to pre-trained)", None))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4))
    for ax, (key, title, baseline) in zip(axes, panels, strict=True):
        means = [statistics.mean(table[m][key]) for m in methods]
        errs = [statistics.stdev(table[m][key]) if len(table[m][key]) > 1 else 0 for m in methods]
        ax.bar(range(len(methods)), means, yerr=errs, color="#1f77b4", capsize=3)
        if baseline is not None:
            ax.axhline(baseline, color="#d62728", ls="--", label="linear probe (frozen)")
            ax.legend(fontsize=7)
        low = min([*means, baseline if baseline is not None else min(means)])
        high = max([*means, baseline if baseline is not None else max(means)])
        ax.set_ylim(max(0.0, low - 0.05) if key != "cola" else min(0.0, low), high + 0.03)
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{key}: {title}" if key in METRIC else title, fontsize=9)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
