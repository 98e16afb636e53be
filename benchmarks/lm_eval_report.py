"""The report of benchmarks/lm_eval_smollm2.sh: lm_eval's figures for the base, the adapter (peft=) and the merged
export, per-problem agreement of the two exports, and lm_eval's generation task beside `balora eval` on the same
problems.

    .venv/bin/python benchmarks/lm_eval_report.py runs/lm_eval_smollm2 LIMIT GEN_LIMIT STEPS [ARGS-OF-THE-SCRIPT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lm_eval_run(folder: Path, task: str) -> tuple[dict, list[dict]]:
    (results_file,) = folder.rglob("results_*.json")
    (samples_file,) = folder.rglob(f"samples_{task}_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return json.loads(results_file.read_text())["results"][task], sorted(samples, key=lambda s: s["doc_id"])


def seconds(folder: Path) -> float:
    return float(Path(f"{folder}.time").read_text().split()[-1])


def main() -> int:
    out, limit, gen_limit, steps = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    args = sys.argv[5] if len(sys.argv) > 5 else ""
    report: dict = {"command": f"benchmarks/lm_eval_smollm2.sh {args}".strip(), "limit": limit,
                    "gen_limit": gen_limit, "steps": steps, "answer_task": {}}
    lls = {}
    for what in ("base", "lora", "merged"):
        results, samples = lm_eval_run(out / f"lm_eval-{what}", "balora_gsm8k_answer")
        lls[what] = [float(s["filtered_resps"][0][0]) for s in samples]
        report["answer_task"][what] = {"acc": results["acc,none"], "perplexity": results["perplexity,none"],
                                       "wall_s": seconds(out / f"lm_eval-{what}")}
    report["lora_vs_merged_max_abs_ll"] = max(abs(a - b) for a, b in zip(lls["lora"], lls["merged"], strict=True))
    report["base_vs_lora_max_abs_ll"] = max(abs(a - b) for a, b in zip(lls["base"], lls["lora"], strict=True))

    results, samples = lm_eval_run(out / "lm_eval-lora-gen", "balora_gsm8k")
    samples = [s for s in samples if s["filter"] == "strict-match"]  # lm_eval logs each document once per filter
    ours = json.loads((out / "run/eval-gsm8k/summary.json").read_text())
    our_rows = sorted((json.loads(line) for line in (out / "run/eval-gsm8k/results.jsonl").read_text().splitlines()),
                      key=lambda r: r["index"])
    same_text = sum(s["resps"][0][0].strip() == r["output"].strip() for s, r in zip(samples, our_rows, strict=True))
    report["generation"] = {
        "lm_eval_strict": results["exact_match,strict-match"],
        "lm_eval_flexible": results["exact_match,flexible-extract"],
        "balora_eval_accuracy": ours["accuracy"], "identical_completions": same_text, "n": len(samples),
        "lm_eval_wall_s": seconds(out / "lm_eval-lora-gen"), "balora_eval_generation_s": ours["generation_s"],
    }
    dest = ROOT / "benchmarks/results/lm_eval_smollm2"
    dest.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    a, g = report["answer_task"], report["generation"]
    lines = [
        f"# lm-evaluation-harness on balora's exports (SmolLM2-135M, a {steps}-step BA-LoRA run)", "",
        f"Command: `OMP_NUM_THREADS=1 {report['command']}` (lm_eval 0.4.13, offline: HF_HUB_OFFLINE=1, "
        "HF_DATASETS_OFFLINE=1; one thread on a 2-core machine shared with two other jobs).", "",
        f"The run trains {steps} steps of `configs/nlg/gsm8k-smollm2.yaml` in float32 ({4 * steps} rows): a pipeline "
        "check, not a model worth scoring.", "",
        f"## `balora_gsm8k_answer` (loglikelihood, first {limit} GSM8K test problems)", "",
        "| model | acc | perplexity | lm_eval wall (s) |", "|---|---|---|---|",
        *[f"| {w} | {a[w]['acc']:.3f} | {a[w]['perplexity']:.3f} | {a[w]['wall_s']:.0f} |" for w in a],
        "",
        f"Largest per-problem |Δ log p| between the adapter (`peft=`) and the merged export: "
        f"{report['lora_vs_merged_max_abs_ll']:.2e}; between the base and the adapter: "
        f"{report['base_vs_lora_max_abs_ll']:.3f}.", "",
        f"## `balora_gsm8k` (generation, adapter, first {gen_limit} problems, 256 new tokens) beside `balora eval`",
        "", "| scorer | accuracy |", "|---|---|",
        f"| lm_eval, strict-match (`#### n`) | {g['lm_eval_strict']:.3f} |",
        f"| lm_eval, flexible-extract (last number) | {g['lm_eval_flexible']:.3f} |",
        f"| `balora eval --task gsm8k` | {g['balora_eval_accuracy']:.3f} |", "",
        f"Identical completions (same prompt, greedy): {g['identical_completions']} of {g['n']}. "
        f"lm_eval took {g['lm_eval_wall_s']:.0f} s in all; balora eval's generation "
        f"{g['balora_eval_generation_s']:.0f} s.",
        "",
    ]
    dest.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
