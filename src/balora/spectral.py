"""The NLG SVD regularizer (paper Eq. 9) with an explicit gradient, and its exact hidden-space form for a frozen head.

L = −S / ‖Z‖_F with S = Σ_{i≤k} σ_i(Z), Z (M, V) the logits at the M valid positions (`losses.nlg_valid_mask`).
Where σ_k > σ_{k+1}, ∂S/∂Z = U_k V_kᵀ, hence ∂L/∂Z = −U_k V_kᵀ / ‖Z‖_F + (S / ‖Z‖_F³) · Z.

Autograd through `torch.svd_lowrank` (the paper's code, `losses.nlg_svd`) also differentiates the random sketch
(pytorch#69531) and costs 2-3× more. Here the top-k factors are found without autograd, reading Z block by block (no
float32 copy of the (M, V) logits), and the formula above gives the gradient (`balora.fused` applies it; its
`nlg_svd_loss` is this term alone). Singular values below 1e-5·σ_max (float32 round-off of a rank-deficient Z:
k ≥ rank, identical rows) are dropped with their vectors: there L is not differentiable and this returns the
minimum-norm element of the superdifferential. Z = 0 gives L = 0, zero gradient.

`hidden_svd_loss`: with a frozen, bias-free head W (V, d), Z = H Wᵀ and Z Zᵀ = (H R)(H R)ᵀ for any R Rᵀ = WᵀW (from
the d × d Gram, computed once per head). So σ(Z) = σ(H R), ‖Z‖_F = ‖H R‖_F, the top-k come from a small symmetric
eigenproblem, the gradient flows into H as ∂L/∂(HR) · Rᵀ, and no (M, V) matrix exists at all.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from balora.losses import IGNORE_INDEX
from balora.rowblocks import (
    Segments,
    blocks_of,
    default_chunk_rows,
    float_rows,
    map_blocks,
    row_segments,
    run_share,
    valid_rows,
)

__all__ = [
    "TopSingular",
    "TopSingularMethod",
    "clear_head_cache",
    "head_gram_root",
    "hidden_svd_loss",
    "top_singular",
]

TopSingularMethod = Literal["randomized", "exact"]  # how `top_singular` computes the factors
_RTOL = 1e-5  # singular values below _RTOL · σ_max are float32 round-off, not signal


# --------------------------------------------------------------------------------------------------------------------
# Top-k singular triplets of the valid-row logits
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopSingular:
    """Top singular triplets of Z (M, V), float32, round-off ones dropped: u (M, r), s (r,), vh (r, V), r ≤ k.

    fro () = ‖Z‖_F, exact (not estimated).
    """

    u: Tensor
    s: Tensor
    vh: Tensor
    fro: Tensor

    def loss(self) -> Tensor:
        """−Σσ / ‖Z‖_F as a 0-dim float32 tensor; 0 when Z = 0."""
        tiny = torch.finfo(torch.float32).tiny
        return -(self.s.sum() / self.fro.clamp_min(tiny)) * (self.fro > tiny)

    def grad_terms(self) -> tuple[Tensor, Tensor]:
        """(u_scaled (M, r), c ()) with ∂L/∂Z = u_scaled @ vh + c · Z: u_scaled = −u/‖Z‖_F, c = S/‖Z‖_F³."""
        tiny = torch.finfo(torch.float32).tiny
        inv = (self.fro > tiny).float() / self.fro.clamp_min(tiny)
        return -self.u * inv, self.s.sum() * inv * inv * inv


def _eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    """torch.linalg.eigh, single-threaded on CPU: with 2 threads on a loaded machine LAPACK's many small parallel
    regions made a 576 × 576 eigh take 18 s instead of 0.2 s."""
    if x.device.type != "cpu":
        return torch.linalg.eigh(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigh(x)
    finally:
        torch.set_num_threads(threads)


def _thin_svd(a: Tensor, k: int, rtol: float = _RTOL) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k thin SVD (u, s, vh) of a float64 (m, n) matrix with min(m, n) small, via its smaller Gram's eigh.

    Used for every small factorisation: LAPACK's SVD and QR of tall-skinny matrices run as many small parallel
    regions and were 10-25× slower here with 2 threads on a loaded machine. σ ≤ rtol·σ_max are dropped.
    """
    wide = a.shape[0] <= a.shape[1]
    evals, evecs = _eigh(a @ a.T if wide else a.T @ a)
    s, evecs = evals.flip(0)[:k].clamp_min(0).sqrt(), evecs.flip(1)[:, :k]
    keep = s > rtol * s[0] if s.numel() else s > 0
    s, evecs = s[keep], evecs[:, keep]
    return (evecs, s, (evecs.T @ a) / s[:, None]) if wide else ((a @ evecs) / s, s, evecs.T)


def _power_pass(flat: Tensor, segs: Segments, basis: Tensor, chunk: int, norm: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(Y = Z basis (M, q), X = Zᵀ Y (V, q), ‖Z‖_F² float64 if `norm` else 0), reading Z by runs or blocks.

    float32 logits: two large matmuls per run of valid rows, which beat cache-sized blocks here (MKL blocks them
    itself). Other dtypes: float32 copies of cache-sized blocks, each used twice while in cache.
    """
    y = basis.new_empty(sum(b - a for a, b, _ in segs), basis.shape[1])
    blocks = blocks_of(segs, 1 << 40 if flat.dtype == torch.float32 else max(chunk, 32))

    def work(state, a, b, rows):
        z = float_rows(flat, rows, state)
        if "xt" not in state:
            state["xt"] = basis.new_zeros(basis.shape[1], flat.shape[1])
            state["sq"] = torch.zeros((), dtype=torch.float64, device=flat.device)
        state["xt"].addmm_(torch.mm(z, basis, out=y[a:b]).T, z)  # (q, V) += Yᵀ Z: row-major, z read in order
        if norm:
            state["sq"] += torch.linalg.vector_norm(z).double().square()

    states = run_share(work, blocks) if flat.dtype == torch.float32 else map_blocks(work, blocks, flat.device)
    states = [states] if isinstance(states, dict) else states
    return y, sum(st["xt"] for st in states).T, sum(st["sq"] for st in states)


def _ritz(y: Tensor, x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rayleigh–Ritz on span(Y) from Y (M, q) and X = Zᵀ Y (V, q): with Y = P S Wᵀ, Pᵀ Z = S⁻¹ Wᵀ Xᵀ; float64."""
    p, s_y, wh = _thin_svd(y.double(), y.shape[1], rtol=1e-10)
    ub, s, vh = _thin_svd((wh @ x.double().T) / s_y[:, None], k)  # SVD of Pᵀ Z (r, V)
    return (p @ ub).float(), s.float(), vh.float()


def _randomized(flat: Tensor, segs: Segments, k: int, q: int, niter: int, seed: int | None, chunk: int):
    """Randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1) in niter + 1 reads of Z.

    Each read applies ZᵀZ block by block (Y = Z Q, X = Zᵀ Y) to a (V, q) basis, started from a Gaussian Ω. The last
    Y spans Z (ZᵀZ)^niter Ω, the subspace `torch.svd_lowrank(Z, q, niter)` reaches in 2·niter + 2 reads.
    """
    generator = None
    if seed is not None:
        generator = torch.Generator(device=flat.device)
        generator.manual_seed(seed)
    basis = torch.randn(flat.shape[1], q, generator=generator, device=flat.device)  # Ω (V, q)
    sq = None
    for i in range(niter + 1):
        y, x, sq_i = _power_pass(flat, segs, basis, chunk, norm=sq is None)
        sq = sq_i if sq is None else sq
        if i < niter:
            basis = _thin_svd(x.double(), q, rtol=1e-10)[0].float()  # orthonormalise
    return (*_ritz(y, x, k), sq)


def _exact(flat: Tensor, segs: Segments, rows: Tensor, k: int, chunk: int):
    """Top-k column space from the float64 eigh of Z Zᵀ (M, M), then Rayleigh–Ritz on Z (σ to float32 accuracy)."""
    m, v = rows.numel(), flat.shape[1]
    gram = torch.zeros(m, m, dtype=torch.float64, device=flat.device)
    width = max(1, chunk * v // m)
    for c in range(0, v, width):  # over column blocks of Z
        block = flat[rows, c : c + width].float()  # (M, width)
        gram += (block @ block.T).double()
    basis = _eigh(gram)[1][:, -k:].float()  # (M, k)
    xt = torch.zeros(k, v, device=flat.device)
    for a, b, sl in blocks_of(segs, chunk):
        xt.addmm_(basis[a:b].T, flat[sl].float())  # basisᵀ Z (k, V)
    u, s, vh = _thin_svd(xt.double(), k)
    return (basis.double() @ u).float(), s.float(), vh.float(), gram.diagonal().sum()


@torch.no_grad()
def top_singular(
    flat: Tensor,
    rows: Tensor,
    *,
    top_k: int = 10,
    method: TopSingularMethod = "randomized",
    oversample: int = 20,
    niter: int = 2,
    seed: int | None = None,
    chunk_size: int | None = None,
) -> TopSingular:
    """Top-k singular triplets of Z = flat[rows].float() (M, V), reading Z in row blocks (never copied whole).

    `flat` (N, V) any float dtype, `rows` (M,) int64 ascending. "randomized": q = top_k + oversample sketch columns,
    `niter` power iterations, the Gaussian start drawn from a generator seeded with `seed` (else from the global RNG,
    like `torch.svd_lowrank`); it falls back to "exact" when min(M, V) ≤ 2q, as `losses.nlg_svd` does. The paper's
    code uses oversample 5; 20 costs about the same here (the reads of Z dominate) and keeps the gradient's cosine to
    the exact one ≥ 0.99 on slowly decaying spectra, where 5 gives 0.8-0.99 (see docs/performance.md).
    "exact": deterministic, O(M² · V) work and an (M, M) float64 Gram, for small problems and references.
    """
    if top_k < 1 or oversample < 0 or niter < 0:
        raise ValueError(f"need top_k >= 1, oversample >= 0, niter >= 0; got {top_k}, {oversample}, {niter}")
    if method not in ("randomized", "exact"):
        raise ValueError(f"method must be 'randomized' or 'exact'; got {method!r}")
    m, v = rows.numel(), flat.shape[1]
    chunk, segs, k, q = chunk_size or default_chunk_rows(v), row_segments(rows), min(top_k, m, v), top_k + oversample
    if k == 0:  # nothing supervised
        empty = torch.zeros(0, device=flat.device)
        return TopSingular(empty.new_zeros(m, 0), empty, empty.new_zeros(0, v), empty.new_zeros(()))
    if method == "exact" or min(m, v) <= 2 * q:
        u, s, vh, sq = _exact(flat, segs, rows, k, chunk)
    else:
        u, s, vh, sq = _randomized(flat, segs, k, q, niter, seed, chunk)
    return TopSingular(u.contiguous(), s, vh.contiguous(), sq.sqrt().float())


def svd_grad_rows(z: Tensor, u_scaled: Tensor, vh: Tensor, c: Tensor, out: Tensor) -> Tensor:
    """out = ∂L/∂Z for one row block: c · z + u_scaled @ vh, with z (n, V), u_scaled (n, r), vh (r, V)."""
    torch.mul(z, c, out=out)
    return out.addmm_(u_scaled, vh)


# --------------------------------------------------------------------------------------------------------------------
# Hidden space, frozen head: Z = H Wᵀ
# --------------------------------------------------------------------------------------------------------------------

_ROOT_CACHE: dict[int, tuple[weakref.ref, int, Tensor]] = {}


def clear_head_cache() -> None:
    """Forget every cached Gram root (they are also recomputed when their weight is modified in place)."""
    _ROOT_CACHE.clear()


def _gram_root(gram: Tensor) -> Tensor:
    """R (d, r) float64 with R Rᵀ = gram (d, d) PSD, from its eigendecomposition; null directions dropped."""
    evals, evecs = _eigh(gram.double())
    keep = evals > evals[-1].clamp_min(0) * gram.shape[0] * torch.finfo(torch.float64).eps
    return evecs[:, keep] * evals[keep].sqrt()


@torch.no_grad()
def head_gram_root(head_weight: Tensor) -> Tensor:
    """R (d, r) float64 with R Rᵀ = WᵀW for a head weight W (V, d); cached per tensor and in-place version.

    WᵀW is accumulated in float64 over row blocks of W (no float64 copy of W), once per frozen head.
    """
    hit = _ROOT_CACHE.get(id(head_weight))
    if hit is not None and hit[0]() is head_weight and hit[1] == head_weight._version:
        return hit[2]
    for stale in [key for key, (ref, _, _) in _ROOT_CACHE.items() if ref() is None]:
        del _ROOT_CACHE[stale]
    d = head_weight.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64, device=head_weight.device)
    for a in range(0, head_weight.shape[0], 4096):
        block = head_weight[a : a + 4096].double()
        gram.addmm_(block.T, block)
    root = _gram_root(gram)
    _ROOT_CACHE[id(head_weight)] = (weakref.ref(head_weight), head_weight._version, root)
    return root


class _HiddenSVDLoss(torch.autograd.Function):
    """Forward computes L and ∂L/∂H at the valid rows ((M, d)-sized); backward scatters the gradient."""

    @staticmethod
    def forward(ctx, hidden: Tensor, rows: Tensor, root: Tensor, top_k: int) -> Tensor:
        a = hidden.reshape(-1, hidden.shape[-1])[rows].double() @ root  # (M, r): A Aᵀ = Z Zᵀ
        u, s, ph = _thin_svd(a, min(top_k, *a.shape))  # eigh of the (r, r) Gram Aᵀ A
        top = TopSingular(u, s, ph, torch.linalg.vector_norm(a))
        u_scaled, c = top.grad_terms()
        ctx.grad_h = (u_scaled @ (ph @ root.T) + c * (a @ root.T)).float()  # (−U_k P_kᵀ/F + c A) Rᵀ, (M, d)
        ctx.rows, ctx.shape, ctx.dtype = rows, hidden.shape, hidden.dtype
        return top.loss().float()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad = torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad_output.device)
        grad.view(-1, ctx.shape[-1]).index_copy_(0, ctx.rows, (ctx.grad_h * grad_output).to(ctx.dtype))
        return grad, None, None, None


def hidden_svd_loss(
    hidden: Tensor,
    labels: Tensor | None,
    head_weight: Tensor | None,
    *,
    top_k: int = 10,
    gram: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    rows: Tensor | None = None,
) -> Tensor:
    """Exact NLG SVD term (paper Eq. 9) from the final hidden states, for a frozen bias-free head; minimise.

    Equals `fused.nlg_svd_loss(hidden @ head_weight.T, labels, method="exact")` in value and in the gradient w.r.t.
    `hidden`, without forming the (M, V) logits. `hidden` is (B, T, d) with `labels` (B, T) (rows of
    `nlg_valid_mask`), or already-selected (M, d) with `labels=None`; it must be what the head multiplies (after the
    final norm: Hugging Face's `hidden_states[-1]` for Llama-style models). `head_weight` (V, d) is a constant here
    (frozen head; no bias, logit scaling or soft-capping); or pass `gram` = WᵀW (d, d) instead of the cached Gram.
    The math is float64 on (M, d) and (d, d) matrices: an (M, d) @ (d, d) product and a (d, d) eigh per call.
    `rows`: `rowblocks.valid_rows(labels)` when the caller has it already (computed once per training step).
    """
    if gram is None:
        if head_weight is None:
            raise ValueError("hidden_svd_loss needs head_weight (V, d) or gram = WᵀW (d, d)")
        if head_weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "hidden_svd_loss treats the head as frozen, but head_weight requires grad; freeze the head or use "
                "fused.nlg_svd_loss on the logits"
            )
        root = head_gram_root(head_weight)
    else:
        root = _gram_root(gram.detach())
    d = hidden.shape[-1]
    if root.shape[0] != d:
        raise ValueError(f"hidden size {d} does not match the head's Gram {tuple(root.shape)}")
    if labels is None:
        if hidden.dim() != 2:
            raise ValueError(f"with labels=None, hidden must be (M, d); got {tuple(hidden.shape)}")
        rows = torch.arange(hidden.shape[0], device=hidden.device)
    else:
        if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
            raise ValueError(
                f"expected hidden (B, T, d) and labels (B, T); got {tuple(hidden.shape)} and {tuple(labels.shape)}"
            )
        if rows is None:
            rows = valid_rows(labels, ignore_index=ignore_index)
    if rows.numel() == 0:
        return hidden.float().sum() * 0.0
    return _HiddenSVDLoss.apply(hidden, rows, root.to(hidden.device), top_k)
