"""The greedy GSM8K sanity check of the knowledge-drift study (issue 11): accuracy of seed 0 of each method and of
the pre-trained model on the first N test problems, from the `balora eval` folders that `benchmarks/studies.sh
gsm8k_greedy` writes. A sanity check, not a comparison: at this model size (SmolLM2-135M) a few problems in a hundred
are solved, so N ≤ 200 resolves only gross failures (a fine-tune that stopped giving answers).

    .venv/bin/python benchmarks/gsm8k_greedy.py [--runs runs/studies] [--output benchmarks/results/study_drift-greedy]
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from balora.io import write_json_atomic, write_text_atomic

SOURCES = {  # method -> its eval folder under --runs
    "pre-trained": "gsm8k-base-eval",
    "lora": "drift/lora/noise-0/seed-0/eval-gsm8k",
    "pissa": "drift/pissa/noise-0/seed-0/eval-gsm8k",
    "balora": "drift/balora/noise-0/seed-0/eval-gsm8k",
}


def load(folder: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((folder / "summary.json").read_text())
    rows = [json.loads(line) for line in (folder / summary["results_file"]).read_text().splitlines() if line.strip()]
    return summary, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/studies", help="the studies' run folder")
    parser.add_argument("--output", default="benchmarks/results/study_drift-greedy", help="where greedy.md/json go")
    args = parser.parse_args(argv)
    runs = Path(args.runs)
    found = {m: runs / sub for m, sub in SOURCES.items() if (runs / sub / "summary.json").is_file()}
    missing = sorted(set(SOURCES) - set(found))
    if missing:
        raise SystemExit(f"gsm8k_greedy: no finished eval for {', '.join(missing)} under {runs}; run "
                         "`benchmarks/studies.sh gsm8k_greedy` first")
    table, solved = [], {}
    limits = set()
    for method, folder in found.items():
        summary, rows = load(folder)
        limits.add(summary["settings"]["limit"])
        solved[method] = sorted(r["task_id"] for r in rows if r["correct"])
        table.append({"method": method, "problems": summary["n_problems"], "correct": summary["n_correct"],
                      "accuracy": summary["accuracy"], "no_answer": summary["n_no_answer"],
                      "generation_s": round(summary["generation_s"], 1),
                      "template": summary["settings"]["template"],
                      "max_new_tokens": summary["settings"]["max_new_tokens"]})
    if len(limits) != 1:
        raise SystemExit(f"gsm8k_greedy: the evals cover different problem counts {sorted(limits)}; rerun them alike")
    result = {"command": "benchmarks/studies.sh gsm8k_greedy; .venv/bin/python benchmarks/gsm8k_greedy.py",
              "machine": f"{platform.machine()}, torch threads 1 (OMP_NUM_THREADS=1), CPU only",
              "rows": table, "solved_task_ids": solved}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# GSM8K greedy accuracy: a sanity check of the knowledge-drift study", "",
             f"Command: `{result['command']}`. Machine: {result['machine']}.", "",
             "Seed 0 of each method of `study_drift` (SmolLM2-135M-Instruct, 24 steps on GSM8K) and the pre-trained "
             "model, greedy decoding, the first "
             f"{limits.pop()} GSM8K test problems, the study's prompt template. Too few problems to compare methods; "
             "it checks that the fine-tunes still answer.", "",
             "| model | problems | correct | accuracy | no answer | generation (s) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['problems']} | {r['correct']} | {r['accuracy']:.3f} | {r['no_answer']} | "
              f"{r['generation_s']} |" for r in table]
    lines += ["", "Solved problems (task ids): " + "; ".join(f"{m}: {', '.join(ids) or 'none'}"
                                                            for m, ids in solved.items()), ""]
    write_json_atomic(out / "greedy.json", result)
    write_text_atomic(out / "greedy.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
