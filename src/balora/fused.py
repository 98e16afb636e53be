"""Task cross-entropy and BA-LoRA's NLG regularizers in one blocked pass with closed-form gradients.

Paper: Chang et al., arXiv 2408.04556, Section 3.2, Eq. 7 (consistency), 8 (diversity), 9 (SVD). The values equal the
plain references in `balora.losses`; only how they are computed differs. The idea is Liger-Kernel's chunked losses
(Hsu et al., arXiv 2410.10989), in plain torch (no compilation) so that it runs on CPU and GPU:

* the M valid rows of the (B, T, V) logits are visited in blocks of `chunk_size` consecutive rows (slices of the
  logits, converted to float32 scratch only when they are not float32), and every term's value and gradient w.r.t.
  the block are computed there, in closed form, during the forward;
* each block's gradient is written into one logits-shaped buffer that this function owns (in the logits' dtype; for
  float32 logits the math writes straight into it); backward scales it by the incoming gradient in place (skipped
  when that is 1) and hands it over: no second logits-sized tensor ever exists.

Closed forms per valid row z (V,), label y, ce_scale = 1 / ce_denominator (derivations in docs/performance.md):

* cross-entropy: ∂/∂z = ce_scale · (softmax(z) − onehot(y));
* consistency T² · mean KL(p ‖ q), p = softmax(z_teacher / T), q = softmax(z / T): ∂/∂z = (T / M) · (q − p);
* diversity −mean H(π), π = softmax(top-K of z): ∂/∂z_j = π_j (log π_j + H) / M on the top-K indices j, 0 elsewhere;
* SVD −Σ_{i≤k} σ_i / ‖Z‖_F: ∂/∂Z = −U_k V_kᵀ / ‖Z‖_F + (Σσ / ‖Z‖_F³) · Z, the factors found first (`balora.spectral`).

Memory beyond the logits and teacher logits: the gradient buffer (one logits-sized tensor, which autograd would hold
anyway), at most four float32 (chunk, V) scratch buffers per worker (2 MiB each at the default chunk), and with the SVD
term (M + V)·(k + oversample) floats. Backward through the total works once: `retain_graph` is not supported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from balora.losses import IGNORE_INDEX, LOSS_TERMS
from balora.rowblocks import (
    Segments,
    blocks_of,
    default_chunk_rows,
    empty_grad_like,
    float_rows,
    map_blocks,
    row_segments,
    scratch,
    valid_rows,
)
from balora.spectral import TopSingular, TopSingularMethod, svd_grad_rows, top_singular

__all__ = ["nlg_fused_loss", "nlg_svd_loss"]


@dataclass(frozen=True)
class _Plan:
    """What to compute: the weights of the terms (0 = skip) and their shared settings."""

    ce_scale: Tensor | None  # () float32, 1 / ce_denominator; None skips the task loss
    consistency_weight: float
    diversity_weight: float
    svd_weight: float
    temperature: float
    entropy_top_k: int
    chunk: int


def _topk(z: Tensor, k: int, block: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """(values (n, k), indices (n, k), row max (n, 1)) of z (n, V), exact, in about one pass over z.

    Every top-k element lies in one of the k blocks (of `block` columns) with the largest block maxima, so a top-k over
    the (n, V/block) block maxima and then over those k·block candidates gives the same values as `torch.topk`, at a
    quarter of its cost here (ties may pick a different but equal-valued index).
    """
    n, v = z.shape
    nb = v // block
    if nb < 4 * k:
        values, indices = torch.topk(z, k, dim=-1)
        return values, indices, z.amax(dim=-1, keepdim=True)
    head = z[:, : nb * block].view(n, nb, block)
    block_max = head.amax(dim=-1)  # (n, nb)
    best = block_max.topk(k, dim=-1).indices  # (n, k)
    cand = head.gather(1, best.unsqueeze(2).expand(n, k, block)).view(n, k * block)
    cand_idx = (best.unsqueeze(2) * block + torch.arange(block, device=z.device)).view(n, k * block)
    row_max = block_max.amax(dim=-1, keepdim=True)
    if nb * block < v:  # the ragged tail is always a candidate
        tail = z[:, nb * block :]
        cand = torch.cat([cand, tail], dim=1)
        cand_idx = torch.cat([cand_idx, torch.arange(nb * block, v, device=z.device).expand(n, -1)], dim=1)
        row_max = torch.maximum(row_max, tail.amax(dim=-1, keepdim=True))
    values, pos = cand.topk(k, dim=-1)
    return values, cand_idx.gather(1, pos), row_max


def _block_terms(
    z: Tensor,
    y: Tensor | None,
    tgt: Tensor,
    g: Tensor | None,
    buffer: Callable[[str], Tensor],
    plan: _Plan,
    m: int,
    svd_part: tuple[Tensor, Tensor, Tensor] | None,
) -> Tensor:
    """Σ CE, Σ KL, Σ H (float64 (3,)) over one block of n valid rows; writes the block's gradient into g if given.

    z (n, V) float32 logits and y (n, V) teacher logits (None without consistency), read-only; tgt (n, 1) labels;
    g (n, V) float32 output; buffer(name) an (n, V) float32 scratch; svd_part (−u/‖Z‖ (n, r), vh (r, V), c) or None.
    """
    n, v = z.shape
    t = plan.temperature
    do_ce, do_kl, do_div = plan.ce_scale is not None, y is not None, plan.diversity_weight != 0.0
    sums = torch.zeros(3, dtype=torch.float64, device=z.device)
    if g is not None:  # the first term written initialises g: SVD, else CE, else zeros
        if svd_part is not None:
            svd_grad_rows(z, svd_part[0], svd_part[1], svd_part[2], out=g)
        elif not do_ce:
            g.zero_()
    if do_div:
        top_vals, top_idx, z_max = _topk(z, min(plan.entropy_top_k, v))  # (n, K), (n, K), (n, 1)
    else:
        z_max = z.amax(dim=-1, keepdim=True)
    if do_ce or (do_kl and t in (1.0, 2.0)):
        e = torch.sub(z, z_max, out=buffer("e")).exp_()  # exp(z − max z) ≤ 1
        s1 = e.sum(dim=-1, keepdim=True)  # (n, 1)
    if do_ce:
        sums[0] = (s1.log() - (z.gather(1, tgt) - z_max)).sum()  # log Σ exp(z) − z_y
        if g is not None:  # ce_scale · (softmax(z) − onehot(y))
            if svd_part is not None:
                g.addcmul_(e, plan.ce_scale / s1)
            else:
                torch.mul(e, plan.ce_scale / s1, out=g)
            g.scatter_add_(1, tgt, (-plan.ce_scale).expand(n, 1))
    if do_kl:
        y_max = y.amax(dim=-1, keepdim=True)
        p = torch.add(-y_max / t, y, alpha=1.0 / t, out=buffer("p")).exp_()  # exp((y − max y)/T)
        sp = p.sum(dim=-1, keepdim=True)  # teacher probabilities = p / sp
        # KL(p ‖ q) = Σ p·(y − z)/T − (max y − max z)/T + log Σ exp((z − max z)/T) − log sp
        p_dot = torch.sub(y, z, out=buffer("d")).mul_(p).sum(dim=-1, keepdim=True) / sp
        if t == 2.0:  # exp((z − max z)/2) = sqrt(exp(z − max z)): one pass instead of two
            q = torch.sqrt(e, out=buffer("d"))
        elif t == 1.0:
            q = e
        else:
            q = torch.add(-z_max / t, z, alpha=1.0 / t, out=buffer("d")).exp_()
        sq = q.sum(dim=-1, keepdim=True)  # student probabilities at T = q / sq
        sums[1] = ((p_dot - y_max + z_max) / t + sq.log() - sp.log()).sum()
        if g is not None:  # ∂/∂z of T²·mean KL = (T/M)(q/sq − p/sp)
            scale = plan.consistency_weight * t / m
            g.addcmul_(q, scale / sq).addcmul_(p, -scale / sp)
    if do_div:
        log_pi = F.log_softmax(top_vals, dim=-1)  # (n, K)
        pi = log_pi.exp()
        entropy = -(pi * log_pi).sum(dim=-1, keepdim=True)  # (n, 1)
        sums[2] = entropy.sum()
        if g is not None:  # ∂(−H/M)/∂z_j = π_j (log π_j + H) / M on the top-K indices
            g.scatter_add_(1, top_idx, pi * (log_pi + entropy) * (plan.diversity_weight / m))
    return sums


def _fused_pass(
    logits: Tensor,
    teacher: Tensor | None,
    segs: Segments,
    targets: Tensor,
    plan: _Plan,
    svd: TopSingular | None,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(total (), stats (4,) = [mean CE, consistency, diversity, svd], gradient buffer shaped like logits or None)."""
    v, m, t, dev = logits.shape[-1], int(targets.numel()), plan.temperature, logits.device
    flat = logits.detach().reshape(-1, v)
    teacher_flat = teacher.reshape(-1, v) if teacher is not None else None
    grad = empty_grad_like(logits, segs) if need_grad else None
    direct = need_grad and grad.dtype == torch.float32  # write each block's gradient straight into `grad`
    if svd is not None and need_grad:
        u_scaled, c = svd.grad_terms()
        u_scaled, c = u_scaled * plan.svd_weight, c * plan.svd_weight

    def work(state: dict[str, Tensor], a: int, b: int, rows: slice) -> None:
        n = b - a
        z = float_rows(flat, rows, state, "z")  # (n, V) float32, read-only
        y = float_rows(teacher_flat, rows, state, "y") if teacher_flat is not None else None
        g = None
        if need_grad:
            g = grad.view(-1, v)[rows] if direct else scratch(state, "g", n, v, dev)
        svd_part = (u_scaled[a:b], svd.vh, c) if svd is not None and need_grad else None
        sums = _block_terms(z, y, targets[a:b, None], g, lambda key: scratch(state, key, n, v, dev), plan, m, svd_part)
        state["sums"] = state["sums"] + sums if "sums" in state else sums
        if need_grad and not direct:
            grad.view(-1, v)[rows] = g

    states = map_blocks(work, blocks_of(segs, plan.chunk), dev)
    sums = sum((st["sums"] for st in states if "sums" in st), torch.zeros(3, dtype=torch.float64, device=dev)).float()
    stats = torch.zeros(4, dtype=torch.float32, device=dev)
    if m > 0:
        stats[0], stats[1], stats[2] = sums[0] / m, sums[1] * (t * t / m), -sums[2] / m
    if svd is not None:
        stats[3] = svd.loss()
    total = plan.consistency_weight * stats[1] + plan.diversity_weight * stats[2] + plan.svd_weight * stats[3]
    if plan.ce_scale is not None:
        total = total + sums[0] * plan.ce_scale
    return total, stats, grad


class _FusedNLGLoss(torch.autograd.Function):
    """Forward runs `_fused_pass`, keeping its gradient buffer; backward scales it in place and returns it."""

    @staticmethod
    def forward(ctx, logits, teacher, segs, targets, plan, svd):
        total, stats, grad = _fused_pass(logits, teacher, segs, targets, plan, svd, need_grad=True)
        ctx.grad = grad
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_stats: Tensor | None):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError(
                "nlg_fused_loss: its gradient buffer was consumed by a first backward; retain_graph=True is not "
                "supported, call nlg_fused_loss again instead"
            )
        if not (grad_total.device.type == "cpu" and float(grad_total) == 1.0):  # skip a full pass when scale is 1
            grad.mul_(grad_total.to(grad.dtype))
        return grad, None, None, None, None, None


def nlg_fused_loss(
    logits: Tensor,
    labels: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    with_task_loss: bool = True,
    ce_denominator: float | Tensor | None = None,
    consistency_weight: float = 0.0,
    diversity_weight: float = 0.0,
    svd_weight: float = 0.0,
    temperature: float = 2.0,
    entropy_top_k: int = 20,
    svd_top_k: int = 10,
    svd_method: TopSingularMethod = "randomized",
    svd_oversample: int = 20,
    svd_niter: int = 2,
    svd_seed: int | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    rows: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Task CE + λ1·consistency + λ2·diversity + λ3·SVD on NLG logits in one chunked pass; minimise the total.

    Shapes: `logits` (B, T, V) any float dtype, `labels` (B, T) with `ignore_index` on prompt/padding,
    `teacher_logits` (B, T, V) (needed when consistency_weight ≠ 0; never receives a gradient). Position t predicts
    labels[:, t + 1]; the M valid positions are those of `losses.nlg_valid_mask`. Returns (total, terms):

        total = Σ_valid CE / ce_denominator + consistency_weight · consistency + diversity_weight · diversity
                + svd_weight · svd                                   (0-dim float32, differentiable w.r.t. logits)

    with `ce_denominator=None` meaning M (a per-batch mean); pass the Trainer's `num_items_in_batch` to normalise by
    the global token count. The regularizers are per-batch means over the local M rows, as in `losses`. `terms` holds
    detached float32 values of the computed terms only: "task_loss" (mean CE over the M tokens, whatever the
    denominator), "consistency_loss" (= `losses.nlg_consistency`), "diversity_loss" (= `losses.nlg_diversity`) and
    "svd_loss" (= `nlg_svd_loss`). A term with weight 0 (or `with_task_loss=False`) is not computed. No valid
    position gives total 0 with a zero gradient.

    `chunk_size` rows per block (default: 2 MiB of float32 per block); the SVD options are those of
    `spectral.top_singular` (its default oversample is 20, not the paper's 5: see there). Logits that are not
    contiguous are copied once. Backward may run once per call (the gradient buffer is handed over, not copied).
    `rows`: `rowblocks.valid_rows(labels)` when the caller has it already (computed once per training step).
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T); got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if consistency_weight != 0.0:
        if teacher_logits is None:
            raise ValueError("consistency_weight != 0 needs teacher_logits (B, T, V); pass them or set it to 0")
        if teacher_logits.shape != logits.shape:
            raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must match logits {tuple(logits.shape)}")
    if temperature <= 0 or entropy_top_k < 1:
        raise ValueError(f"need temperature > 0 and entropy_top_k >= 1; got {temperature}, {entropy_top_k}")
    v = logits.shape[-1]
    if rows is None:
        rows = valid_rows(labels, ignore_index=ignore_index)
    m = rows.numel()
    chunk = chunk_size or default_chunk_rows(v)
    if chunk < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    ce_scale = None
    if with_task_loss:
        if ce_denominator is None:
            ce_denominator = max(m, 1)
        if isinstance(ce_denominator, Tensor):
            ce_scale = 1.0 / ce_denominator.detach().float().clamp_min(1.0).to(logits.device)
        elif ce_denominator > 0:
            ce_scale = torch.tensor(1.0 / ce_denominator, device=logits.device)
        else:
            raise ValueError(f"ce_denominator must be > 0 (or None for the local token count); got {ce_denominator}")
    plan = _Plan(
        ce_scale,
        float(consistency_weight),
        float(diversity_weight),
        float(svd_weight),
        float(temperature),
        int(entropy_top_k),
        int(chunk),
    )
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    targets = shifted.reshape(-1).index_select(0, rows)  # (M,)
    teacher = teacher_logits.detach() if plan.consistency_weight != 0.0 else None
    svd = None
    if plan.svd_weight != 0.0 and m > 0:
        svd = top_singular(
            logits.detach().reshape(-1, v),
            rows,
            top_k=svd_top_k,
            method=svd_method,
            oversample=svd_oversample,
            niter=svd_niter,
            seed=svd_seed,
            chunk_size=chunk,
        )
    segs = row_segments(rows)
    if torch.is_grad_enabled() and logits.requires_grad:
        total, stats = _FusedNLGLoss.apply(logits, teacher, segs, targets, plan, svd)
    else:
        with torch.no_grad():
            total, stats, _ = _fused_pass(logits, teacher, segs, targets, plan, svd, need_grad=False)
    computed = (with_task_loss, plan.consistency_weight != 0.0, plan.diversity_weight != 0.0, plan.svd_weight != 0.0)
    return total, {name: stat.detach() for name, stat, on in zip(LOSS_TERMS, stats, computed, strict=True) if on}


def nlg_svd_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    top_k: int = 10,
    oversample: int = 20,
    niter: int = 2,
    method: TopSingularMethod = "randomized",
    seed: int | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Spectral concentration of the supervised-token logits (paper Eq. 9), in [−√k, 0], minimise; explicit backward.

    L = −(Σ_{i≤k} σ_i) / ‖Z‖_F with Z (M, V) the rows of `logits` (B, T, V) at `nlg_valid_mask(labels)` (B, T).
    The value is `losses.nlg_svd`'s (exactly for "exact"; for "randomized" up to the sketch's error, see
    `spectral.top_singular`); the gradient is the closed form of `balora.spectral` at the computed factors. It is
    `nlg_fused_loss` with the SVD term alone (no valid position: 0 with a zero gradient).
    """
    total, _ = nlg_fused_loss(logits, labels, with_task_loss=False, svd_weight=1.0, svd_top_k=top_k,
                              svd_method=method, svd_oversample=oversample, svd_niter=niter, svd_seed=seed,
                              chunk_size=chunk_size, ignore_index=ignore_index)
    return total
