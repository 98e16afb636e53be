"""PiSSA initialisation: the top-r singular directions of W go into the adapter, the rest stays frozen.

Reference: Meng et al., "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models",
NeurIPS 2024, Section 3. With W = U S Vᵀ (out × in) and PEFT's layout (lora_A: (r, in), lora_B: (out, r), output
W_res x + scaling · B A x):

    A = sqrt(S_r) V_rᵀ / sqrt(scaling),   B = U_r sqrt(S_r) / sqrt(scaling),   W_res = W − scaling · B A

so W_res + scaling · B A = W and the model is unchanged at step 0. The factorisation runs in float32 (float64 is used
for float64 weights) and the residual is cast back to the weight's dtype. Randomized SVD uses `torch.svd_lowrank`
with q = r + oversample columns, seeded inside `torch.random.fork_rng` so the global RNG is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PissaFactors:
    lora_a: Tensor  # (r, in)
    lora_b: Tensor  # (out, r)
    residual: Tensor  # (out, in)


def pissa_factors(
    weight: Tensor,
    r: int,
    scaling: float,
    *,
    niter: int | None = None,
    oversample: int = 8,
    seed: int = 0,
) -> PissaFactors:
    """Factor `weight` (out, in) into PiSSA's (A, B, W_res). `niter=None`: exact SVD; an int: randomized SVD."""
    out_features, in_features = weight.shape
    if not 1 <= r <= min(out_features, in_features):
        raise ValueError(f"rank r={r} must be between 1 and min(out, in)={min(out_features, in_features)}")
    compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(compute_dtype)
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        q = min(r + oversample, out_features, in_features)
        devices = [w.device] if w.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(w, q=q, niter=niter)
        u, s, vh = u[:, :r], s[:r], v[:, :r].T
    root = (s / scaling).sqrt()  # sqrt(S_r / scaling)
    lora_a = root[:, None] * vh  # (r, in)
    lora_b = u * root[None, :]  # (out, r)
    residual = w - scaling * (lora_b @ lora_a)
    return PissaFactors(lora_a=lora_a, lora_b=lora_b, residual=residual)


@torch.no_grad()
def apply_pissa(
    lora_layer: torch.nn.Module,
    adapter_name: str,
    *,
    niter: int | None = None,
    oversample: int = 8,
    seed: int = 0,
) -> None:
    """Initialise one PEFT LoRA layer's adapter with PiSSA and replace its base weight by the residual, in place.

    Handles GPT-2's Conv1D (weight stored as (in, out), PEFT's `fan_in_fan_out`).
    """
    base = lora_layer.get_base_layer()
    fan_in_fan_out = bool(getattr(lora_layer, "fan_in_fan_out", False))
    weight = base.weight.T if fan_in_fan_out else base.weight
    factors = pissa_factors(
        weight,
        lora_layer.r[adapter_name],
        lora_layer.scaling[adapter_name],
        niter=niter,
        oversample=oversample,
        seed=seed,
    )
    lora_a = lora_layer.lora_A[adapter_name].weight
    lora_b = lora_layer.lora_B[adapter_name].weight
    lora_a.copy_(factors.lora_a.to(lora_a.dtype))
    lora_b.copy_(factors.lora_b.to(lora_b.dtype))
    residual = factors.residual.T if fan_in_fan_out else factors.residual
    base.weight.data.copy_(residual.to(base.weight.dtype))
