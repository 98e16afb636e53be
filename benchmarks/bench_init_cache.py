"""Cached PiSSA init on the bundled SmolLM2-135M: the SVD once, then a load.

    .venv/bin/python benchmarks/bench_init_cache.py [--rank 16] [--out benchmarks/results/pissa_init_cache]

All 7 projections of the 30 layers (210 matrices), float32, exact SVD, r = alpha. Times `get_balora_model` (the
start-up step of `balora train` that runs the init) three ways on fresh copies of the model: no cache, the first run
with `init_cache` (SVD + hashing + writing the entry) and the second run (hashing + loading the entry, no SVD), plus
the hashing alone. Checks the cached model's weights equal the uncached ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer

from balora import BALoRAConfig, get_balora_model
from balora.init_cache import init_key
from balora.models import load_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pissa_init_cache")
    args = parser.parse_args()
    model, _ = load_model("smollm2-135m", task="nlg", dtype="float32", device="cpu")
    folder = Path(tempfile.mkdtemp(prefix="balora-init-cache-"))
    rows, states = [], {}
    try:
        for name, cache in (("no cache (SVD)", None), ("cache, 1st run (SVD + store)", str(folder)),
                            ("cache, 2nd run (load, no SVD)", str(folder))):
            config = BALoRAConfig(r=args.rank, target_modules=TARGETS, init_cache=cache)
            fresh = copy.deepcopy(model)
            start, cpu = time.perf_counter(), time.process_time()
            wrapped = get_balora_model(fresh, config)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            states[name] = {n: p.detach().clone() for n, p in wrapped.named_parameters() if ".default." in n
                            or "base_layer" in n}
            rows.append({"run": name, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2)})
            print(f"{name:32s} {seconds:7.2f} s wall {cpu:7.2f} s CPU", flush=True)
            if cache is not None and "2nd" in name:
                layers = [(n, m) for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)]
                start, cpu = time.perf_counter(), time.process_time()
                init_key(layers, "default", config)
                rows.append({"run": "hashing the target weights alone",
                             "seconds": round(time.perf_counter() - start, 2),
                             "cpu_seconds": round(time.process_time() - cpu, 2)})
            del wrapped, fresh
        entry_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    reference = states["no cache (SVD)"]
    identical = all(torch.equal(reference[k], s[k]) for s in states.values() for k in reference)
    machine = f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads (shared CPU)"
    command = f"OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_init_cache.py --rank {args.rank}"
    lines = [
        "# Cached PiSSA init of SmolLM2-135M (210 matrices, exact SVD)\n",
        f"Command: `{command}`\n\nMachine: {machine}. One run each; `get_balora_model` wall time (teacher adapter "
        f"included). Entry size {entry_bytes / 2**20:.0f} MiB. Weights of the three runs bitwise identical: "
        f"{identical}.\n",
        "Run with OMP_NUM_THREADS=1: on a shared, loaded CPU the CPU time is the figure to compare (wall time "
        "includes waiting for the CPU).\n",
        "| run | wall (s) | CPU (s) |", "|---|---|---|",
        *[f"| {r['run']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} |" for r in rows],
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows,
                                                          "entry_mib": entry_bytes / 2**20,
                                                          "identical": identical}, indent=1))


if __name__ == "__main__":
    main()
