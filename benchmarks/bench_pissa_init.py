"""PiSSA initialisation cost and accuracy on one LLaMA-7B-shaped layer set: exact vs randomized SVD, ours vs PEFT's.

    .venv/bin/python benchmarks/bench_pissa_init.py [--rank 128] [--out benchmarks/results]

Matrices: one 4096 × 4096 (q/k/v/o) and one 11008 × 4096 (gate/up; down is its transpose), float32, random with a
decaying spectrum: W = G · diag(s) with G Gaussian and s_j = (1 + j)^(−1/2) over the input dimension (plain randn has
a flat spectrum, where no top-r subspace stands out and every randomized method looks bad). r = α = 128 (scaling 1).

Methods: `balora.pissa.pissa_factors` with the exact SVD (`torch.linalg.svd`, full_matrices=False) and with
`torch.svd_lowrank` (q = r + 8, niter 4 and 16); PEFT 0.21's own `init_lora_weights="pissa"` and `"pissa_niter_K"`
(q = r, no oversampling) through `get_peft_model` on a one-layer module holding the same matrix. Each is timed once
(the exact SVD of the 11008 × 4096 matrix takes minutes on this shared CPU). Errors, all relative:

* reconstruction ‖W − W_res − B A‖ / ‖W‖ (the model must be unchanged at step 0: float32 round-off only);
* rank-r part ‖B A − (B A)*‖ / ‖(B A)*‖, against the exact top-r part (B A)* = U_r S_r V_rᵀ;
* residual excess ‖W − B A‖ / ‖W − (B A)*‖ − 1 (0 for the optimal rank-r split).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from balora.pissa import pissa_factors

SHAPES = {"4096x4096 (q/k/v/o)": (4096, 4096), "11008x4096 (gate/up)": (11008, 4096)}
LAYER_COUNTS = {"4096x4096 (q/k/v/o)": 4, "11008x4096 (gate/up)": 3}  # down_proj (4096 × 11008) costs as gate/up


def make_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g) * (1.0 + torch.arange(in_features)) ** -0.5


def errors(w: torch.Tensor, residual: torch.Tensor, ba: torch.Tensor, ba_exact: torch.Tensor) -> dict[str, float]:
    norm = torch.linalg.norm
    return {
        "reconstruction": (norm(w - residual - ba) / norm(w)).item(),
        "rank_r_part": (norm(ba - ba_exact) / norm(ba_exact)).item(),
        "residual_excess": (norm(w - ba) / norm(w - ba_exact) - 1.0).item(),
    }


def run_ours(w: torch.Tensor, rank: int, niter: int | None) -> tuple[float, torch.Tensor, torch.Tensor]:
    start = time.perf_counter()
    f = pissa_factors(w, rank, 1.0, niter=niter, oversample=8, seed=0)
    elapsed = time.perf_counter() - start
    return elapsed, f.residual, f.lora_b @ f.lora_a


def run_peft(w: torch.Tensor, rank: int, init: str) -> tuple[float, torch.Tensor, torch.Tensor]:
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    with torch.no_grad():
        model.proj.weight.copy_(w)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"], init_lora_weights=init)
    torch.manual_seed(0)
    start = time.perf_counter()
    peft_model = get_peft_model(model, config)
    elapsed = time.perf_counter() - start
    layer = peft_model.base_model.model.proj
    ba = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
    return elapsed, layer.get_base_layer().weight.detach().clone(), ba.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    results: dict = {
        "command": "python benchmarks/bench_pissa_init.py " + " ".join(sys.argv[1:]),
        "machine": f"{torch.get_num_threads()}-thread CPU ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "rank": args.rank,
        "matrices": {},
    }
    for label, (out_features, in_features) in SHAPES.items():
        w = make_weight(out_features, in_features)
        rows: dict[str, dict] = {}
        print(label, flush=True)
        t, residual, ba_exact = run_ours(w, args.rank, None)
        rows["balora exact"] = {"seconds": t, **errors(w, residual, ba_exact, ba_exact)}
        for name, runner, option in [
            ("peft pissa (exact)", run_peft, "pissa"),
            ("balora randomized niter 4", run_ours, 4),
            ("peft pissa_niter_4", run_peft, "pissa_niter_4"),
            ("balora randomized niter 16", run_ours, 16),
            ("peft pissa_niter_16", run_peft, "pissa_niter_16"),
        ]:
            t, residual, ba = runner(w, args.rank, option)
            rows[name] = {"seconds": t, **errors(w, residual, ba, ba_exact)}
            print(f"  {name}: {rows[name]}", flush=True)
        results["matrices"][label] = rows
    layer = {
        method: sum(LAYER_COUNTS[m] * results["matrices"][m][method]["seconds"] for m in SHAPES)
        for method in results["matrices"][next(iter(SHAPES))]
    }
    results["one_llama7b_layer_seconds"] = layer
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pissa_init.json").write_text(json.dumps(results, indent=1))
    lines = [
        "# PiSSA initialisation: exact vs randomized SVD, balora vs PEFT",
        "",
        f"Command: `{results['command'].strip()}`",
        "",
        f"Machine: {results['machine']}, shared with other jobs; torch {results['torch']}; each method timed once. "
        f"r = α = {args.rank}; float32 weights with a decaying spectrum (W = G·diag((1+j)^-1/2), G Gaussian).",
        "",
    ]
    for label, rows in results["matrices"].items():
        lines += [
            f"## {label}",
            "",
            "| method | time (s) | ‖W − W_res − BA‖/‖W‖ | rank-r part vs exact | residual excess |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, row in rows.items():
            lines.append(
                f"| {name} | {row['seconds']:.1f} | {row['reconstruction']:.1e} | {row['rank_r_part']:.1e} "
                f"| {row['residual_excess']:.1e} |"
            )
        lines.append("")
    lines += [
        "## One LLaMA-7B layer (4 × 4096² + 3 × 11008×4096), estimated from the above",
        "",
        "| method | seconds per layer | × 32 layers (min) |",
        "| --- | --- | --- |",
    ]
    for name, seconds in layer.items():
        lines.append(f"| {name} | {seconds:.0f} | {seconds * 32 / 60:.0f} |")
    lines.append("")
    (args.out / "pissa_init.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
