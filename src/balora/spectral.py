"""The NLG SVD regularizer (paper Eq. 9) with an explicit gradient, and its exact hidden-space form for a frozen head.

L = −S / ‖Z‖_F with S = Σ_{i≤k} σ_i(Z), Z (M, V) the logits at the M valid positions (`losses.nlg_valid_mask`).
Where σ_k > σ_{k+1}, ∂S/∂Z = U_k V_kᵀ, hence

    ∂L/∂Z = −U_k V_kᵀ / ‖Z‖_F + (S / ‖Z‖_F³) · Z.

Autograd through `torch.svd_lowrank` (what the paper's code and `losses.nlg_svd` do) differentiates the random sketch
too, costs 2-3× more and gives a gradient whose cosine to the exact one is 0.5-0.9 (pytorch#69531). Here the top-k
factors are computed without autograd and the formula above is applied in backward, one row chunk at a time, so no
float32 (M, V) copy of the logits is made. Zero singular values (k ≥ rank, identical rows, Z = 0) contribute nothing to S
and are dropped from U_k V_kᵀ: at such points L is not differentiable and this picks the minimum-norm element of the
superdifferential; Z = 0 gives L = 0 with a zero gradient.

`hidden_svd_loss`: with a frozen, bias-free head W (V, d), Z = H Wᵀ and Z Zᵀ = H (WᵀW) Hᵀ = (H R)(H R)ᵀ for any
R Rᵀ = WᵀW (R (d, d) from the eigendecomposition of the d × d Gram, computed once per head). So σ(Z) = σ(H R) and
‖Z‖_F = ‖H R‖_F: the exact top-k values come from an (M, d) SVD, the gradient flows into H as ∂L/∂(HR) · Rᵀ, and no
(M, V) matrix exists at all.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from balora.losses import IGNORE_INDEX, nlg_valid_mask

__all__ = [
    "SVDMethod",
    "TopSingular",
    "clear_head_cache",
    "head_gram_root",
    "hidden_svd_loss",
    "nlg_svd_loss",
    "top_singular",
]

SVDMethod = Literal["randomized", "exact"]

_CHUNK_BYTES = 2 << 20  # default row-block scratch: 2 MiB of float32 (10 rows at V = 49,152), cache-sized


def default_chunk_rows(n_cols: int) -> int:
    """Rows per chunk so that one float32 (chunk, n_cols) buffer takes about 8 MiB."""
    return max(1, _CHUNK_BYTES // (4 * max(n_cols, 1)))


def valid_rows(labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(M,) int64 indices into the flattened (B·T) positions of `nlg_valid_mask(labels)`, ascending."""
    return nlg_valid_mask(labels, ignore_index=ignore_index).reshape(-1).nonzero().squeeze(1)


Segments = list[tuple[int, int, int]]


def row_segments(rows: Tensor) -> Segments:
    """Split ascending row indices (M,) into maximal runs of consecutive rows: [(start, stop, first row), ...].

    Valid positions come in runs (each sequence's answer), so every block of a run is a plain slice of the (N, V)
    logits: no gather, no copy for float32 logits, and gradients are written into slices too.
    """
    r = rows.cpu()
    if r.numel() == 0:
        return []
    breaks = ((r[1:] - r[:-1]) != 1).nonzero().squeeze(1).add(1).tolist()
    starts, stops = [0, *breaks], [*breaks, r.numel()]
    return [(a, b, int(r[a])) for a, b in zip(starts, stops, strict=True)]


def row_blocks(flat: Tensor, segments: Segments, chunk: int) -> Iterator[tuple[int, int, slice, Tensor]]:
    """Yield (start, stop, flat-row slice, float32 (stop − start, V) block) over `segments`, `chunk` rows at a time.

    The block is a view of `flat` when it is float32 (read it, never write it), else a float32 copy in one reused
    scratch buffer. start/stop index the M valid rows; the slice indexes `flat`'s rows.
    """
    buf = None
    for a, b, first in segments:
        for start in range(a, b, chunk):
            stop = min(start + chunk, b)
            where = slice(first + start - a, first + stop - a)
            block = flat[where]
            if block.dtype != torch.float32:
                if buf is None:
                    buf = torch.empty(min(chunk, max(y - x for x, y, _ in segments)), flat.shape[1], device=flat.device)
                block = buf[: stop - start].copy_(block)
            yield start, stop, where, block


def empty_grad_like(x: Tensor, segments: Segments) -> Tensor:
    """A contiguous buffer shaped like `x` (..., C) whose rows (of the (N, C) view) outside `segments` are zero."""
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    flat, prev = grad.view(-1, x.shape[-1]), 0
    for a, b, first in segments:
        flat[prev:first].zero_()
        prev = first + b - a
    flat[prev:].zero_()
    return grad


@dataclass(frozen=True)
class TopSingular:
    """Top singular triplets of Z (M, V), float32, with the zero ones dropped (r ≤ k columns).

    u (M, r), s (r,), vh (r, V): Z ≈ u diag(s) vh on the top-k subspace; fro () = ‖Z‖_F (exact, not estimated).
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
        """(u_scaled (M, r), c ()) with ∂L/∂Z = u_scaled @ vh + c · Z, i.e. u_scaled = −u/‖Z‖_F, c = S/‖Z‖_F³."""
        tiny = torch.finfo(torch.float32).tiny
        nonzero = (self.fro > tiny).float()
        inv = nonzero / self.fro.clamp_min(tiny)
        return -self.u * inv, self.s.sum() * inv * inv * inv


def _drop_zero(u: Tensor, s: Tensor, vh: Tensor, k: int, fro: Tensor, shape: tuple[int, int]) -> TopSingular:
    """Keep the top k triplets whose σ exceeds the float32 rank tolerance σ_max · max(M, V) · eps."""
    s, u, vh = s[:k], u[:, :k], vh[:k]
    tol = (s[:1].max() if s.numel() else s.new_zeros(())) * max(shape) * torch.finfo(torch.float32).eps
    keep = s > tol
    if not bool(keep.all()):
        s, u, vh = s[keep], u[:, keep], vh[keep]
    return TopSingular(u=u.contiguous(), s=s, vh=vh.contiguous(), fro=fro.float())


def _times(flat: Tensor, segs: Segments, right: Tensor, chunk: int) -> Tensor:
    """Z @ right: (M, q) for right (V, q), one row block at a time."""
    out = right.new_empty(sum(b - a for a, b, _ in segs), right.shape[1])
    for a, b, _, z in row_blocks(flat, segs, chunk):
        torch.mm(z, right, out=out[a:b])
    return out


def _t_times(flat: Tensor, segs: Segments, left: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """(Zᵀ @ left (V, q) for left (M, q), ‖Z‖_F² in float64), one row block at a time."""
    out = left.new_zeros(flat.shape[1], left.shape[1])
    sq = torch.zeros((), dtype=torch.float64, device=flat.device)
    for a, b, _, z in row_blocks(flat, segs, chunk):
        out.addmm_(z.T, left[a:b])
        sq += torch.linalg.vector_norm(z).double().square()
    return out, sq


def _ritz_row_basis(flat: Tensor, segs: Segments, basis: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of Z projected on the orthonormal row-space basis (V, q): Z basis = U S Pᵀ, so vh = Pᵀ basisᵀ."""
    u, s, ph = torch.linalg.svd(_times(flat, segs, basis, chunk), full_matrices=False)
    return u, s, ph @ basis.T


def _power_pass(flat: Tensor, segs: Segments, basis: Tensor, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(Y = Z basis (M, q), X = Zᵀ Y (V, q), ‖Z‖_F² float64) in one read of Z: each block is used twice in cache."""
    y = basis.new_empty(sum(b - a for a, b, _ in segs), basis.shape[1])
    x = basis.new_zeros(basis.shape)
    sq = torch.zeros((), dtype=torch.float64, device=flat.device)
    for a, b, _, z in row_blocks(flat, segs, chunk):
        x.addmm_(z.T, torch.mm(z, basis, out=y[a:b]))
        sq += torch.linalg.vector_norm(z).double().square()
    return y, x, sq


def _randomized(flat: Tensor, segs: Segments, q: int, niter: int, seed: int | None, chunk: int):
    """Randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4 and 5.1) in niter + 1 reads of Z.

    Each pass applies ZᵀZ to the current (V, q) basis, block by block (Y = Z Q, X = Zᵀ Y), then re-orthonormalises
    X. The last pass's Y spans Z (ZᵀZ)^niter Ω, the same subspace `torch.svd_lowrank(Z, q, niter)` reaches with
    2·niter + 2 reads, and the Rayleigh–Ritz step is done on it from (Y, X) alone: with Y = P S Wᵀ, Pᵀ Z = S⁻¹ Wᵀ Xᵀ
    (in float64; directions with S below the float32 rank tolerance are dropped).
    """
    generator = None
    if seed is not None:
        generator = torch.Generator(device=flat.device)
        generator.manual_seed(seed)
    basis = torch.randn(flat.shape[1], q, generator=generator, device=flat.device, dtype=torch.float32)  # Ω (V, q)
    for i in range(niter + 1):
        y, x, sq = _power_pass(flat, segs, basis, chunk)
        if i < niter:
            basis = torch.linalg.qr(x).Q
    p, s_y, wh = torch.linalg.svd(y.double(), full_matrices=False)  # Y = P diag(S) Wᵀ
    keep = s_y > s_y[0] * max(y.shape) * torch.finfo(torch.float32).eps
    p, s_y, wh = p[:, keep], s_y[keep], wh[keep]
    projected = (wh @ x.double().T) / s_y[:, None]  # Pᵀ Z (r, V)
    ub, s, vh = torch.linalg.svd(projected, full_matrices=False)
    return (p @ ub).float(), s.float(), vh.float(), sq


def _exact(flat: Tensor, segs: Segments, rows: Tensor, k: int, chunk: int):
    """Top-k subspace from the float64 eigendecomposition of the smaller Gram, then Rayleigh–Ritz on Z itself.

    The Ritz step (an SVD of Z projected on the k eigenvectors) gives σ to float32 accuracy and orthonormal vectors,
    where σ and V_k read off the Gram alone would lose half the digits for small σ.
    """
    m, v = rows.numel(), flat.shape[1]
    if m <= v:  # Z Zᵀ (M, M), accumulated over column blocks of Z
        gram = torch.zeros(m, m, dtype=torch.float64, device=flat.device)
        width = max(1, chunk * v // max(m, 1))
        for c in range(0, v, width):
            block = flat[rows, c : c + width].float()  # (M, width)
            gram += (block @ block.T).double()
        left = torch.linalg.eigh(gram).eigenvectors[:, -k:].flip(1).float()  # (M, k), column-space basis
        bt, sq = _t_times(flat, segs, left, chunk)  # (Zᵀ left) = (leftᵀ Z)ᵀ, (V, k)
        ub, s, vh = torch.linalg.svd(bt.T, full_matrices=False)
        return left @ ub, s, vh, sq
    gram = torch.zeros(v, v, dtype=torch.float64, device=flat.device)  # Zᵀ Z (V, V)
    for _, _, _, z in row_blocks(flat, segs, chunk):
        gram += (z.T @ z).double()
    basis = torch.linalg.eigh(gram).eigenvectors[:, -k:].flip(1).float()  # (V, k), row-space basis
    return (*_ritz_row_basis(flat, segs, basis, chunk), gram.diagonal().sum())


@torch.no_grad()
def top_singular(
    flat: Tensor,
    rows: Tensor,
    *,
    top_k: int = 10,
    method: SVDMethod = "randomized",
    oversample: int = 20,
    niter: int = 2,
    seed: int | None = None,
    chunk_size: int | None = None,
) -> TopSingular:
    """Top-k singular triplets of Z = flat[rows].float() (M, V) without materialising Z in float32.

    `flat` (N, V) any float dtype, `rows` (M,) int64. "randomized": q = top_k + oversample sketch columns, `niter`
    power iterations, the random matrix drawn from a generator seeded with `seed` (else from the global RNG, as
    `torch.svd_lowrank` does); like `losses.nlg_svd`, it falls back to "exact" when min(M, V) ≤ 2q, where the
    sketch would cost as much. "exact": deterministic, O(min(M, V)² · max(M, V)) work, for small problems and references.
    """
    if top_k < 1 or oversample < 0 or niter < 0:
        raise ValueError(f"need top_k >= 1, oversample >= 0, niter >= 0; got {top_k}, {oversample}, {niter}")
    if method not in ("randomized", "exact"):
        raise ValueError(f"method must be 'randomized' or 'exact'; got {method!r}")
    m, v = rows.numel(), flat.shape[1]
    chunk = chunk_size or default_chunk_rows(v)
    segs = row_segments(rows)
    k = min(top_k, m, v)
    if k == 0:  # nothing supervised
        empty = torch.zeros(0, device=flat.device)
        return TopSingular(empty.new_zeros(m, 0), empty, empty.new_zeros(0, v), empty.new_zeros(()))
    q = top_k + oversample
    if method == "exact" or min(m, v) <= 2 * q:
        u, s, vh, sq = _exact(flat, segs, rows, k, chunk)
    else:
        u, s, vh, sq = _randomized(flat, segs, q, niter, seed, chunk)
    return _drop_zero(u, s, vh, k, sq.sqrt(), (m, v))


def svd_grad_rows(z: Tensor, u_scaled: Tensor, vh: Tensor, c: Tensor, out: Tensor) -> Tensor:
    """out = ∂L/∂Z for one row chunk: c · z + u_scaled @ vh, with z (n, V), u_scaled (n, r), vh (r, V)."""
    torch.mul(z, c, out=out)
    return out.addmm_(u_scaled, vh)


class _SVDLoss(torch.autograd.Function):
    """L = top.loss(); backward writes ∂L/∂Z block by block into one logits-shaped buffer (allocated in backward)."""

    @staticmethod
    def forward(ctx, logits: Tensor, segs: Segments, top: TopSingular, chunk: int) -> Tensor:
        ctx.save_for_backward(logits)
        ctx.segs, ctx.top, ctx.chunk = segs, top, chunk
        return top.loss()

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (logits,) = ctx.saved_tensors
        top, v = ctx.top, logits.shape[-1]
        u_scaled, c = top.grad_terms()
        u_scaled, c = u_scaled * grad_output, c * grad_output
        grad = empty_grad_like(logits, ctx.segs)
        grad_flat = grad.view(-1, v)
        scratch = None
        for a, b, where, z in row_blocks(logits.reshape(-1, v), ctx.segs, ctx.chunk):
            if grad.dtype == torch.float32:
                svd_grad_rows(z, u_scaled[a:b], top.vh, c, out=grad_flat[where])
            else:
                scratch = torch.empty_like(z) if scratch is None or scratch.shape[0] < b - a else scratch
                grad_flat[where] = svd_grad_rows(z, u_scaled[a:b], top.vh, c, scratch[: b - a])
        return grad, None, None, None


def nlg_svd_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    top_k: int = 10,
    oversample: int = 20,
    niter: int = 2,
    method: SVDMethod = "randomized",
    seed: int | None = None,
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Spectral concentration of the supervised-token logits (paper Eq. 9), in [−√k, 0], minimise; explicit backward.

    L = −(Σ_{i≤k} σ_i) / ‖Z‖_F with Z (M, V) the rows of `logits` (B, T, V) at `nlg_valid_mask(labels)` (B, T).
    Same value as `losses.nlg_svd` (exactly for "exact", up to the sketch's error for "randomized"; see
    `top_singular`), but the gradient is the closed form of the module docstring, so with "exact" it is the true gradient
    and with "randomized" it is the true gradient at the estimated factors (cosine ≥ 0.99 on decaying spectra).
    Extra memory: forward one 8 MiB row chunk + (M + V)·q floats; backward one logits-shaped gradient buffer.
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T); got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    v = logits.shape[-1]
    rows = valid_rows(labels, ignore_index=ignore_index)
    chunk = chunk_size or default_chunk_rows(v)
    top = top_singular(
        logits.detach().reshape(-1, v), rows, top_k=top_k, method=method, oversample=oversample, niter=niter,
        seed=seed, chunk_size=chunk,
    )
    return _SVDLoss.apply(logits, row_segments(rows), top, chunk)


# --------------------------------------------------------------------------------------------------------------------
# Hidden space, frozen head: Z = H Wᵀ
# --------------------------------------------------------------------------------------------------------------------

_ROOT_CACHE: dict[int, tuple[weakref.ref, int, Tensor]] = {}


def clear_head_cache() -> None:
    """Forget every cached Gram root (they are also dropped when their weight is freed or modified in place)."""
    _ROOT_CACHE.clear()


def _gram_root(gram: Tensor) -> Tensor:
    """R (d, r) float32 with R Rᵀ = gram (d, d) PSD, from its float64 eigendecomposition; null directions dropped."""
    evals, evecs = torch.linalg.eigh(gram.double())
    keep = evals > evals[-1].clamp_min(0) * gram.shape[0] * torch.finfo(torch.float64).eps
    return (evecs[:, keep] * evals[keep].sqrt()).float()


@torch.no_grad()
def head_gram_root(head_weight: Tensor) -> Tensor:
    """R (d, r) float32 with R Rᵀ = WᵀW for a head weight W (V, d); cached per tensor and in-place version.

    WᵀW is accumulated in float64 over row blocks of W (no float64 copy of W), once per frozen head.
    """
    key = id(head_weight)
    hit = _ROOT_CACHE.get(key)
    if hit is not None and hit[0]() is head_weight and hit[1] == head_weight._version:
        return hit[2]
    for stale in [k for k, (ref, _, _) in _ROOT_CACHE.items() if ref() is None]:
        del _ROOT_CACHE[stale]
    d = head_weight.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64, device=head_weight.device)
    for a in range(0, head_weight.shape[0], 4096):
        block = head_weight[a : a + 4096].double()
        gram.addmm_(block.T, block)
    root = _gram_root(gram)
    _ROOT_CACHE[key] = (weakref.ref(head_weight), head_weight._version, root)
    return root


class _HiddenSVDLoss(torch.autograd.Function):
    """Forward computes L and ∂L/∂H at the valid rows (both (M, d)-sized); backward scatters the gradient."""

    @staticmethod
    def forward(ctx, hidden: Tensor, rows: Tensor, root: Tensor, top_k: int) -> Tensor:
        d = hidden.shape[-1]
        h = hidden.reshape(-1, d)[rows].float()  # (M, d)
        a = h @ root  # (M, r): A Aᵀ = Z Zᵀ
        fro = torch.linalg.vector_norm(a)
        u, s, ph = torch.linalg.svd(a, full_matrices=False)
        top = _drop_zero(u, s, ph, min(top_k, *a.shape), fro, (rows.numel(), a.shape[1]))
        u_scaled, c = top.grad_terms()
        ctx.grad_h = u_scaled @ (top.vh @ root.T) + c * (a @ root.T)  # ∂L/∂H = (−U_k P_kᵀ/F + c A) Rᵀ, (M, d)
        ctx.rows, ctx.shape, ctx.dtype = rows, hidden.shape, hidden.dtype
        return top.loss()

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
) -> Tensor:
    """Exact NLG SVD term (paper Eq. 9) from the final hidden states, for a frozen bias-free head; minimise.

    Equals `nlg_svd_loss(hidden @ head_weight.T, labels, method="exact")` in value and in the gradient w.r.t. `hidden`,
    without forming the (M, V) logits. `hidden` is (B, T, d) with `labels` (B, T) (positions of `nlg_valid_mask`) or
    already-selected (M, d) with `labels=None`; it must be what the head multiplies (after the final norm: Hugging
    Face's `hidden_states[-1]` for Llama-style models). `head_weight` (V, d) is treated as a constant (frozen head, no
    bias, no logit scaling or soft-capping); pass `gram` = WᵀW (d, d) instead to skip the cached per-head Gram. Cost per
    call: an (M, d) @ (d, d) product and an (M, d) SVD.
    """
    if gram is None:
        if head_weight is None:
            raise ValueError("hidden_svd_loss needs head_weight (V, d) or gram = WᵀW (d, d)")
        if head_weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "hidden_svd_loss treats the head as frozen, but head_weight requires grad; freeze the head or use "
                "nlg_svd_loss on the logits"
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
        rows = valid_rows(labels, ignore_index=ignore_index)
    if rows.numel() == 0:
        return hidden.float().sum() * 0.0
    return _HiddenSVDLoss.apply(hidden, rows, root.to(hidden.device), top_k)
