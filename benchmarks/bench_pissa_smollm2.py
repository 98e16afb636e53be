"""PiSSA initialisation of the bundled SmolLM2-135M: exact vs randomized SVD, balora vs PEFT's own PiSSA.

    .venv/bin/python benchmarks/bench_pissa_smollm2.py [--rank 16] [--out benchmarks/results/pissa_init_smollm2]

All 7 projections of the 30 layers (210 matrices, 576-1536 wide), float32, r = alpha. For each method: wall time of
the whole initialisation (wrapping included; one run each, interleaved with the others on a shared CPU), and how far
the initialised model's logits are from the original model's on a fixed batch (max absolute difference; 0 up to
float32 round-off means "unchanged at step 0").
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from balora import BALoRAConfig, get_balora_model
from balora.models import load_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pissa_init_smollm2")
    args = parser.parse_args()
    model, tokenizer = load_model("smollm2-135m", task="nlg", dtype="float32", device="cpu")
    model.eval()
    batch = tokenizer(["PiSSA keeps the model unchanged at step 0."], return_tensors="pt")
    with torch.no_grad():
        reference = model(**batch).logits
    methods = {
        "balora exact SVD": lambda m: get_balora_model(m, BALoRAConfig(r=args.rank, target_modules=TARGETS)),
        "balora randomized niter 4": lambda m: get_balora_model(
            m, BALoRAConfig(r=args.rank, target_modules=TARGETS, init_niter=4)
        ),
        "balora randomized niter 16": lambda m: get_balora_model(
            m, BALoRAConfig(r=args.rank, target_modules=TARGETS, init_niter=16)
        ),
        "peft pissa": lambda m: get_peft_model(
            m, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights="pissa")
        ),
        "peft pissa_niter_4": lambda m: get_peft_model(
            m, LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights="pissa_niter_4")
        ),
        "peft pissa_niter_16": lambda m: get_peft_model(
            m,
            LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS, init_lora_weights="pissa_niter_16"),
        ),
    }
    rows = []
    for name, build in methods.items():
        fresh = copy.deepcopy(model)
        start = time.perf_counter()
        wrapped = build(fresh)
        seconds = time.perf_counter() - start
        wrapped.eval()
        with torch.no_grad():
            diff = (wrapped(**batch).logits - reference).abs().max().item()
        rows.append({"method": name, "seconds": round(seconds, 2), "max_logit_diff": diff})
        print(f"{name:28s} {seconds:7.2f} s  max |Δlogit| {diff:.2e}", flush=True)
        del wrapped, fresh
    machine = f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} torch threads (shared CPU)"
    command = f".venv/bin/python benchmarks/bench_pissa_smollm2.py --rank {args.rank}"
    lines = [
        "# PiSSA initialisation of SmolLM2-135M (210 matrices)\n",
        f"Command: `{command}`\n\nMachine: {machine}. One run per method; includes balora's frozen teacher adapter.\n",
        "| method | time (s) | max abs logit change at init |",
        "|---|---|---|",
    ]
    lines += [f"| {r['method']} | {r['seconds']:.2f} | {r['max_logit_diff']:.2e} |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(
        json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
