"""Training-step cost of lora, pissa and balora on the bundled models (issue: fast and lean).

    .venv/bin/python benchmarks/bench_steps.py [--steps 12] [--out benchmarks/results/steps]

Each variant runs in its own subprocess (so peak memory is its own): it loads the model, builds the adapters, runs
`--steps` optimizer steps (forward, teacher forward where used, regularizers, backward, AdamW step) on fixed batches
and reports the median step time (after 2 warm-up steps) and the peak resident memory above the level reached after
loading the model. Variants are run interleaved, round by round, so machine noise hits all of them alike; ratios to
pissa are the figures to read.

Variants: lora, pissa, balora (live teacher = the frozen teacher adapter); for NLU also balora-cached (the teacher
logits of every row cached after the first pass over the fixed batches, as after the first epoch); and
balora-copy: the teacher as a separate deep copy of the pre-trained model, the way the paper's code holds it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"nlg": "smollm2-135m", "nlu": "minilm"}
VARIANTS = {
    "nlg": ["lora", "pissa", "balora", "balora-copy"],
    "nlu": ["lora", "pissa", "balora", "balora-cached", "balora-copy"],
}


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmHWM: peak resident, VmRSS: current), in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _batches(task: str, tokenizer, steps: int) -> list[dict]:
    import torch

    if task == "nlg":
        from balora.data.instruct import CausalLMCollator, load_instruct, tokenize_instruct

        data, _ = load_instruct(ROOT / "data/gsm8k/train.jsonl", max_train_samples=64, seed=0)
        data, _ = tokenize_instruct(data, tokenizer, max_length=256)
        collate = CausalLMCollator(tokenizer.pad_token_id)
        rows = [data[i] for i in range(len(data))]
        batches = []
        for i in range(steps):
            batch = collate(rows[(4 * i) % 60 : (4 * i) % 60 + 4])
            # pad every batch to 256 tokens so every step costs the same (sequence 256, batch 4)
            pad = 256 - batch["input_ids"].shape[1]
            if pad > 0:
                batch["input_ids"] = torch.nn.functional.pad(
                    batch["input_ids"], (0, pad), value=tokenizer.pad_token_id
                )
                batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, pad), value=0)
                batch["labels"] = torch.nn.functional.pad(batch["labels"], (0, pad), value=-100)
            batches.append(batch)
        return batches
    from transformers import DataCollatorWithPadding

    from balora.data.glue import get_task_spec, load_glue, tokenize_glue

    splits, _ = load_glue("sst2", max_train_samples=32 * 4, seed=0)
    data = tokenize_glue(splits["train"], tokenizer, get_task_spec("sst2"), 64)
    collate = DataCollatorWithPadding(tokenizer)
    rows = [data[i] for i in range(len(data))]
    return [collate(rows[32 * (i % 4) : 32 * (i % 4) + 32]) for i in range(steps)]


def run_variant(task: str, variant: str, steps: int) -> dict:
    import torch
    from transformers import TrainingArguments

    from balora import BALoRAConfig, BALoRATrainer, get_balora_model
    from balora.models import load_model

    torch.manual_seed(0)
    if task == "nlu":
        model, tokenizer = load_model(MODELS[task], task="nlu", num_labels=2, dtype="float32", device="cpu")
        targets: list[str] | str = ["query", "key", "value", "dense"]
    else:
        model, tokenizer = load_model(MODELS[task], task="nlg", dtype="float32", device="cpu")
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    batches = _batches(task, tokenizer, steps)
    baseline = _status_mb("VmRSS")
    _reset_peak()
    method = "balora" if variant.startswith("balora") else variant
    copy_teacher = copy.deepcopy(model).eval() if variant == "balora-copy" else None
    config = BALoRAConfig(
        method=method,
        r=16,
        target_modules=targets,
        consistency_schedule="constant",
        regularizer_schedule="constant",
        teacher_cache=variant == "balora-cached",
    )
    peft_model = get_balora_model(model, config)
    args = TrainingArguments(output_dir="/tmp/balora-bench", report_to=[], use_cpu=True, max_steps=steps)
    trainer = BALoRATrainer(model=peft_model, args=args)
    trainer.state.max_steps = steps
    if copy_teacher is not None:
        # The paper's way: a full second model as the teacher.
        def copy_teacher_logits(_model, inputs):
            with torch.no_grad():
                return copy_teacher(**inputs).logits

        trainer._teacher_logits = copy_teacher_logits  # type: ignore[method-assign]
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-5)
    peft_model.train()
    if variant == "balora-cached":  # fill the cache: the state after the first epoch
        for batch in batches:
            trainer._teacher_logits(peft_model, {k: v for k, v in batch.items() if k != "labels"})
    times = []
    for batch in batches:
        start = time.perf_counter()
        items = int((batch["labels"][:, 1:] != -100).sum()) if task == "nlg" else batch["labels"].numel()
        loss = trainer.compute_loss(peft_model, batch, num_items_in_batch=items)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {
        "task": task,
        "variant": variant,
        "median_step_s": statistics.median(times[2:]),
        "peak_extra_mb": _status_mb("VmHWM") - baseline,
        "steps": steps,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every variant")
    parser.add_argument("--tasks", default="nlu,nlg")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/steps"))
    parser.add_argument("--worker", nargs=2, metavar=("TASK", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_variant(args.worker[0], args.worker[1], args.steps)))
        return
    results: list[dict] = []
    for round_ in range(args.rounds):
        for task in args.tasks.split(","):
            for variant in VARIANTS[task]:
                cmd = [sys.executable, __file__, "--steps", str(args.steps), "--worker", task, variant]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if out.returncode != 0:
                    raise SystemExit(f"{task}/{variant} failed:\n{out.stderr[-3000:]}")
                row = json.loads(out.stdout.strip().splitlines()[-1])
                row["round"] = round_
                results.append(row)
                print(
                    f"round {round_} {task:3s} {variant:13s} step {row['median_step_s']:.3f} s  "
                    f"peak +{row['peak_extra_mb']:.0f} MB",
                    flush=True,
                )
    write_report(results, Path(args.out), " ".join([".venv/bin/python", "benchmarks/bench_steps.py", *sys.argv[1:]]))


def write_report(results: list[dict], out: Path, command: str) -> None:
    import platform

    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, dict]] = {}
    for task in sorted({r["task"] for r in results}):
        rows = [r for r in results if r["task"] == task]
        per = {}
        for variant in dict.fromkeys(r["variant"] for r in rows):
            mine = [r for r in rows if r["variant"] == variant]
            per[variant] = {
                "median_step_s": statistics.median(r["median_step_s"] for r in mine),
                "peak_extra_mb": statistics.median(r["peak_extra_mb"] for r in mine),
            }
        base = per["pissa"]
        for v in per.values():
            v["time_vs_pissa"] = v["median_step_s"] / base["median_step_s"]
            v["memory_vs_pissa"] = v["peak_extra_mb"] / base["peak_extra_mb"]
        summary[task] = per
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    lines = [
        f"# Training-step cost per method\n\nCommand: `{command}`\n\nMachine: {machine} (shared, noisy: read the "
        "ratios, measured side by side in interleaved rounds).\n",
        "NLG: SmolLM2-135M, sequence 256, batch 4, r = 16 on all projections. NLU: MiniLM, SST-2, batch 32, "
        "max length 64, r = 16. Peak memory: resident memory above the level after loading the model.\n",
    ]
    for task, per in summary.items():
        lines += [
            f"\n## {task.upper()}\n",
            "| variant | median step (s) | × pissa | peak extra (MB) | × pissa |",
            "|---|---|---|---|---|",
        ]
        for name, v in per.items():
            lines.append(
                f"| {name} | {v['median_step_s']:.3f} | {v['time_vs_pissa']:.2f} | {v['peak_extra_mb']:.0f} | "
                f"{v['memory_vs_pissa']:.2f} |"
            )
    (out.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    (out.with_suffix(".json")).write_text(
        json.dumps({"command": command, "machine": machine, "summary": summary, "runs": results}, indent=2)
    )
    plot(summary, out.with_suffix(".png"))


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(summary), 2, figsize=(10, 3.2 * len(summary)), squeeze=False)
    for row, (task, per) in enumerate(summary.items()):
        names = list(per)
        axes[row][0].bar(names, [per[n]["median_step_s"] for n in names], color="#1f77b4")
        axes[row][0].set_title(f"{task.upper()}: median step time (s)")
        axes[row][1].bar(names, [per[n]["peak_extra_mb"] for n in names], color="#d62728")
        axes[row][1].set_title(f"{task.upper()}: peak extra memory (MB)")
        for ax in axes[row]:
            ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
