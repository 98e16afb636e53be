"""Task cross-entropy and BA-LoRA's NLG regularizers in one chunked pass with closed-form gradients.

Paper: Chang et al., arXiv 2408.04556, Section 3.2, Eq. 7 (consistency), Eq. 8 (diversity), Eq. 9 (SVD). The values
equal the plain references in `balora.losses`; only the way they are computed differs. The idea is Liger-Kernel's
chunked losses (Hsu et al., arXiv 2410.10989), in plain torch so that it runs on CPU and GPU without compilation:

* the M valid rows of the (B, T, V) logits are visited in chunks of `chunk_size` rows, each gathered into float32
  scratch (whatever the logits' dtype), and every term's value and gradient w.r.t. the chunk is computed there, in
  closed form, during the forward;
* the gradient is written into one logits-shaped buffer that this function owns, in the logits' dtype; backward only
  scales it by the incoming gradient, in place, and hands it over (no second logits-sized tensor).

Closed forms per valid row z (V,), with M valid rows, `ce_scale` = 1 / ce_denominator, label y (see docs/performance.md):

* cross-entropy:  ∂/∂z = ce_scale · (softmax(z) − onehot(y));
* consistency T²·mean KL(p ‖ q), p = softmax(z_teacher/T), q = softmax(z/T):  ∂/∂z = (T/M) · (q − p);
* diversity −mean H(softmax(top-K of z)), with π the top-K softmax:  ∂/∂z_j = π_j (log π_j + H) / M on the top-K
  indices j, 0 elsewhere;
* SVD −Σ_{i≤k} σ_i / ‖Z‖_F:  ∂/∂Z = −U_k V_kᵀ/‖Z‖_F + (Σσ/‖Z‖_F³)·Z (`balora.spectral`, factors found first).

Memory beyond the logits (and teacher logits): the gradient buffer (one logits-sized tensor, which autograd would have
to hold anyway) plus four float32 (chunk, V) scratch buffers (8 MiB each at the default chunk) and, with the SVD term,
(M + V)·(k + oversample) floats. Backward through the returned total works once (`retain_graph` is not supported: the
buffer is consumed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from balora.losses import IGNORE_INDEX
from balora.spectral import (
    SVDMethod,
    TopSingular,
    default_chunk_rows,
    empty_grad_like,
    row_chunks,
    svd_grad_rows,
    top_singular,
    valid_rows,
)

__all__ = ["nlg_fused_loss"]


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


def _fused_pass(
    logits: Tensor, teacher: Tensor | None, rows: Tensor, targets: Tensor, plan: _Plan, svd: TopSingular | None,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(total (), stats (4,) = [mean CE, consistency, diversity, svd], gradient buffer shaped like logits or None)."""
    v = logits.shape[-1]
    m = rows.numel()
    t = plan.temperature
    do_ce, do_kl = plan.ce_scale is not None, plan.consistency_weight != 0.0
    do_div, do_svd = plan.diversity_weight != 0.0, svd is not None
    sums = torch.zeros(3, dtype=torch.float64, device=logits.device)  # Σ CE, Σ KL, Σ H over the rows
    grad = empty_grad_like(logits, rows) if need_grad else None
    student = row_chunks(logits.reshape(-1, v), rows, plan.chunk)
    teachers = row_chunks(teacher.reshape(-1, v), rows, plan.chunk) if do_kl else None
    e_buf = g_buf = None
    if do_svd and need_grad:
        u_scaled, c = svd.grad_terms()
        u_scaled, c = u_scaled * plan.svd_weight, c * plan.svd_weight
    for a, b, z in student:  # z: (n, V) float32 scratch we may overwrite
        n = b - a
        if e_buf is None:
            e_buf, g_buf = torch.empty_like(z), (torch.empty_like(z) if need_grad else None)
        e = e_buf[:n]
        g = g_buf[:n] if need_grad else None
        if need_grad:  # the first term written initialises g: SVD, else CE, else zeros
            if do_svd:
                svd_grad_rows(z, u_scaled[a:b], svd.vh, c, out=g)  # needs the raw z, before the shift below
            elif not do_ce:
                g.zero_()
        if do_div:  # top-K on the raw z, so that ties resolve as in the reference
            top_vals, top_idx = torch.topk(z, k=min(plan.entropy_top_k, v), dim=-1)  # (n, K)
        z.sub_(z.amax(dim=-1, keepdim=True))  # z − max z: every exp below is ≤ 1
        if do_ce:
            tgt = targets[a:b, None]  # (n, 1)
            torch.exp(z, out=e)
            s1 = e.sum(dim=-1, keepdim=True)  # (n, 1)
            sums[0] += (s1.log() - z.gather(1, tgt)).sum()  # log Σ exp(z) − z_y
            if need_grad:
                if do_svd:
                    g.addcmul_(e, plan.ce_scale / s1)
                else:
                    torch.mul(e, plan.ce_scale / s1, out=g)
                g.scatter_add_(1, tgt, (-plan.ce_scale).expand(n, 1))
        if do_kl:
            y = next(teachers)[2]  # (n, V) float32 teacher rows
            y.sub_(y.amax(dim=-1, keepdim=True))
            torch.mul(y, 1.0 / t, out=e).exp_()
            sy = e.sum(dim=-1, keepdim=True)  # p = e / sy
            y.sub_(z)  # ỹ − z̃
            p_dot = torch.bmm(e.unsqueeze(1), y.unsqueeze(2)).view(n, 1) / sy  # E_p[ỹ − z̃]
            torch.mul(z, 1.0 / t, out=y).exp_()
            s2 = y.sum(dim=-1, keepdim=True)  # q = y / s2
            # KL(p ‖ q) = E_p[(ỹ − z̃)/T] + log s2 − log sy, with ỹ, z̃ the max-shifted logits
            sums[1] += (p_dot / t + s2.log() - sy.log()).sum()
            if need_grad:
                scale = plan.consistency_weight * t / m
                g.addcmul_(y, scale / s2)
                g.addcmul_(e, -scale / sy)
        if do_div:
            log_pi = F.log_softmax(top_vals, dim=-1)  # (n, K)
            pi = log_pi.exp()
            entropy = -(pi * log_pi).sum(dim=-1, keepdim=True)  # (n, 1)
            sums[2] += entropy.sum()
            if need_grad:
                g.scatter_add_(1, top_idx, pi * (log_pi + entropy) * (plan.diversity_weight / m))
        if need_grad:
            grad.view(-1, v).index_copy_(0, rows[a:b], g if g.dtype == grad.dtype else g.to(grad.dtype))
    sums = sums.float()
    stats = torch.zeros(4, dtype=torch.float32, device=logits.device)
    if m > 0:
        stats[0], stats[1], stats[2] = sums[0] / m, sums[1] * (t * t / m), -sums[2] / m
    if do_svd:
        stats[3] = svd.loss()
    total = plan.consistency_weight * stats[1] + plan.diversity_weight * stats[2] + plan.svd_weight * stats[3]
    if do_ce:
        total = total + sums[0] * plan.ce_scale
    return total, stats, grad


class _FusedNLGLoss(torch.autograd.Function):
    """Forward runs `_fused_pass`, keeping its gradient buffer; backward scales it in place and returns it."""

    @staticmethod
    def forward(ctx, logits, teacher, rows, targets, plan, svd):
        total, stats, grad = _fused_pass(logits, teacher, rows, targets, plan, svd, need_grad=True)
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
    svd_method: SVDMethod = "randomized",
    svd_oversample: int = 5,
    svd_niter: int = 2,
    svd_seed: int | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Task CE + λ1·consistency + λ2·diversity + λ3·SVD on NLG logits in one chunked pass; minimise the total.

    Shapes: `logits` (B, T, V) any float dtype, `labels` (B, T) with `ignore_index` on prompt/padding,
    `teacher_logits` (B, T, V) (needed when consistency_weight ≠ 0; never receives a gradient). Position t predicts
    labels[:, t + 1]; the M valid positions are those of `losses.nlg_valid_mask`. Returns (total, terms):

        total = Σ_valid CE / ce_denominator + consistency_weight · consistency + diversity_weight · diversity
                + svd_weight · svd                                       (0-dim float32, differentiable w.r.t. logits)

    with `ce_denominator=None` meaning M (a per-batch mean); pass the Trainer's `num_items_in_batch` to normalise by the
    global token count. The regularizers are per-batch means over the local M rows, as in `losses`. `terms` holds
    detached float32 values of the computed terms only: "task_loss" (mean CE over the M tokens, whatever the
    denominator), "consistency_loss" (= `losses.nlg_consistency`), "diversity_loss" (= `losses.nlg_diversity`) and
    "svd_loss" (= `spectral.nlg_svd_loss`). A term with weight 0 (or `with_task_loss=False`) is not computed. No valid
    position gives total 0 with a zero gradient.

    `chunk_size` rows per chunk (default: 8 MiB of float32 per scratch row block); the SVD options are those of
    `spectral.top_singular`. Backward may run once per call (the gradient buffer is handed over, not copied).
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T); got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if consistency_weight != 0.0:
        if teacher_logits is None:
            raise ValueError("consistency_weight != 0 needs teacher_logits (B, T, V); pass them or set the weight to 0")
        if teacher_logits.shape != logits.shape:
            raise ValueError(
                f"teacher_logits {tuple(teacher_logits.shape)} must match logits {tuple(logits.shape)}"
            )
    if temperature <= 0 or entropy_top_k < 1:
        raise ValueError(f"need temperature > 0 and entropy_top_k >= 1; got {temperature}, {entropy_top_k}")
    v = logits.shape[-1]
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
    plan = _Plan(ce_scale, float(consistency_weight), float(diversity_weight), float(svd_weight), float(temperature),
                 int(entropy_top_k), int(chunk))
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    targets = shifted.reshape(-1).index_select(0, rows)  # (M,)
    teacher = teacher_logits.detach() if plan.consistency_weight != 0.0 else None
    svd = None
    if plan.svd_weight != 0.0 and m > 0:
        svd = top_singular(
            logits.detach().reshape(-1, v), rows, top_k=svd_top_k, method=svd_method, oversample=svd_oversample,
            niter=svd_niter, seed=svd_seed, chunk_size=chunk,
        )
    if torch.is_grad_enabled() and logits.requires_grad:
        total, stats = _FusedNLGLoss.apply(logits, teacher, rows, targets, plan, svd)
    else:
        with torch.no_grad():
            total, stats, _ = _fused_pass(logits, teacher, rows, targets, plan, svd, need_grad=False)
    names = [("task_loss", with_task_loss), ("consistency_loss", plan.consistency_weight != 0.0),
             ("diversity_loss", plan.diversity_weight != 0.0), ("svd_loss", plan.svd_weight != 0.0)]
    return total, {name: stats[i].detach() for i, (name, on) in enumerate(names) if on}
