"""bf16 on this CPU: step time and loss curve of the bundled NLG config in float32, bf16 autocast and bf16 weights.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_bf16_cpu.py [--steps 16] [--out benchmarks/results/bf16_cpu]
    .venv/bin/python benchmarks/bench_bf16_cpu.py --render     # rewrite the .md from the .json

Each variant is `configs/nlg/gsm8k-smollm2.yaml` (SmolLM2-135M, BA-LoRA r = 16 on every projection, batch 4, max
length 384) trained by `BALoRATrainer` through balora's own preparation, with only these overrides:

- float32:       `model.dtype: float32` (what `auto` gives on a CPU);
- bf16-autocast: float32 weights, `training.bf16: true` (the Trainer's CPU autocast);
- bf16-weights:  `model.dtype: bfloat16` (weights, adapters and optimizer state in bf16).

All variants train the same rows in the same order (same seed and data subset) for `--steps` optimizer steps with
`gradient_accumulation_steps: 1` (so one step is one forward + teacher forward + backward of one batch of 4; the
config's accumulation of 2 only doubles the time of a step). The PiSSA init is cached in a folder of this run
(`--init-cache`), so float32 and autocast, whose weights are the same, share one SVD. Step times are the median of
the steps after the first two; the variants run one after another in one process, so read the ratios to float32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/nlg/gsm8k-smollm2.yaml"
VARIANTS = {
    "float32": ["--model.dtype", "float32"],
    "bf16-autocast": ["--model.dtype", "float32", "--training.bf16", "true"],
    "bf16-weights": ["--model.dtype", "bfloat16"],
}


def cpu_flags() -> list[str]:
    """The CPU's bf16-relevant feature flags (AMX tiles, AVX-512 BF16), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f.startswith("amx") or f in ("avx512_bf16", "avx512f", "avx512_vnni"))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line for line in f if line.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def run_variant(name: str, overrides: list[str], steps: int, batch: int, cache: Path, out_dir: Path) -> dict:
    import torch
    from transformers import TrainerCallback

    from balora.experiment import load_experiment
    from balora.prepare import prepare
    from balora.train import adapt
    from balora.trainer import BALoRATrainer

    experiment, _ = load_experiment(CONFIG, [
        *overrides, "--balora.init_cache", str(cache), "--data.max_train_samples", str(steps * batch),
        "--training.per_device_train_batch_size", str(batch), "--training.gradient_accumulation_steps", "1",
        "--training.max_steps", str(steps), "--training.logging_steps", "1", "--training.save_strategy", "no",
        "--training.report_to", "[]", "--training.disable_tqdm", "true", "--training.use_cpu", "true",
        "--output_dir", str(out_dir / name),
    ])  # fmt: skip

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)
            print(f"  {name} step {len(self.times)}/{steps}: {self.times[-1]:.2f} s", flush=True)

    start = time.perf_counter()
    prepared = prepare(experiment)
    trained, config = adapt(experiment, prepared.model)
    setup_s = time.perf_counter() - start
    timer = StepTimer()
    trainer = BALoRATrainer(model=trained, balora_config=config, args=experiment.training_arguments(),
                            train_dataset=prepared.train, data_collator=prepared.collator,
                            processing_class=prepared.tokenizer, callbacks=[timer])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "step" in entry]
    lengths = [len(row["input_ids"]) for row in prepared.train]
    return {
        "overrides": overrides,
        "weights_dtype": str(next(trained.parameters()).dtype).removeprefix("torch."),
        "trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.")
                                    for p in trained.parameters() if p.requires_grad}),
        "setup_s": round(setup_s, 2),
        "step_s": [round(t, 3) for t in timer.times],
        "median_step_s": round(statistics.median(timer.times[2:] or timer.times), 3),
        "loss": [float(e["loss"]) for e in logs],
        "task_loss": [float(e.get("task_loss", e["loss"])) for e in logs],
        "tokens_per_row": {"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }


def paired_ratio(variant: dict, ref: dict) -> float:
    """Median over steps (after the first two) of this variant's step time over float32's on the same batch: the
    batches differ in length, so step i of one variant is compared with step i of the other."""
    ratios = [a / b for a, b in zip(variant["step_s"], ref["step_s"], strict=True)]
    return statistics.median(ratios[2:] or ratios)


def write_markdown(path: Path, result: dict) -> None:
    ref = result["variants"]["float32"]
    lines = [
        "# bf16 on this CPU: the bundled NLG config in float32, bf16 autocast and bf16 weights", "",
        f"Command: `{result['command']}`", "",
        f"Machine: {result['machine']}; CPU flags: {', '.join(result['cpu_flags']) or 'none'}. "
        "Other jobs shared the 2 cores throughout: the times are slower than on a quiet "
        "machine and the variants ran one after another in one process, so read the ratios, and the per-step ratio "
        "(same batch) over the ratio of medians.", "",
        f"Config: `configs/nlg/gsm8k-smollm2.yaml` (SmolLM2-135M, BA-LoRA, r = 16, all projections), batch "
        f"{result['batch']}, gradient accumulation 1, {result['steps']} steps on the same rows in the same order; "
        f"mean {ref['tokens_per_row']['mean']} tokens per row (max {ref['tokens_per_row']['max']}).", "",
        "| variant | weights (trainable) | median step (s) | × float32 (medians) | "
        "× float32 (median of per-step ratios) | loss at step 1 | loss at last step | "
        "max \\|Δ task loss\\| vs float32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in result["variants"].items():
        delta = max(abs(a - b) for a, b in zip(v["task_loss"], ref["task_loss"], strict=True))
        lines.append(f"| {name} | {v['weights_dtype']} ({', '.join(v.get('trainable_dtypes', ['?']))}) | "
                     f"{v['median_step_s']:.2f} | "
                     f"{v['median_step_s'] / ref['median_step_s']:.2f} | {paired_ratio(v, ref):.2f} | "
                     f"{v['loss'][0]:.4f} | {v['loss'][-1]:.4f} | {delta:.4f} |")
    lines += ["", "Task loss (cross-entropy) per step:", "",
              "| step | " + " | ".join(result["variants"]) + " |", "|---" * (len(result["variants"]) + 1) + "|"]
    for i in range(result["steps"]):
        lines.append(f"| {i + 1} | " + " | ".join(f"{v['task_loss'][i]:.4f}" for v in result["variants"].values())
                     + " |")
    lines += ["", "Step times (s): " + "; ".join(f"{n} {v['step_s']}" for n, v in result["variants"].items()), ""]
    loads = [f"{n} {v['load_average_1min_at_end']}" for n, v in result["variants"].items()
             if "load_average_1min_at_end" in v]
    if loads:
        lines += ["1-minute load average at the end of each variant: " + "; ".join(loads) + ".", ""]
    for title, text in result.get("notes", {}).items():  # added by hand to the .json after the run
        lines += [f"## {title}", "", text, ""]
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--init-cache", default=str(ROOT / "runs/bench_bf16_cpu/init_cache"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/bf16_cpu"))
    parser.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json")
    args = parser.parse_args()
    if args.render:
        out = Path(args.out)
        write_markdown(out.with_suffix(".md"), json.loads(out.with_suffix(".json").read_text()))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from balora.compare import machine

    names = args.variants.split(",")
    if names[0] != "float32":
        parser.error("--variants must start with float32 (the reference)")
    result = {"command": "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "unset") + " .venv/bin/python "
              + " ".join([Path(sys.argv[0]).relative_to(ROOT).as_posix() if Path(sys.argv[0]).is_absolute()
                          else sys.argv[0], *sys.argv[1:]]),
              "machine": f"{machine()}, {cpu_model()}", "cpu_flags": cpu_flags(), "steps": args.steps,
              "batch": args.batch, "variants": {}}
    print(f"torch threads {torch.get_num_threads()}; CPU flags {result['cpu_flags']}", flush=True)
    runs = ROOT / "runs/bench_bf16_cpu"
    for name in names:
        print(f"{name}: loading, PiSSA init (cached in {args.init_cache}), {args.steps} steps", flush=True)
        result["variants"][name] = run_variant(name, VARIANTS[name], args.steps, args.batch, Path(args.init_cache),
                                               runs)
        v = result["variants"][name]
        print(f"{name}: setup {v['setup_s']} s, median step {v['median_step_s']} s, losses {v['loss']}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(out.with_suffix(".md"), result)
    print(f"wrote {out.with_suffix('.md')} and .json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
