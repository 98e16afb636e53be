"""BA-LoRA's three regularizers on output logits, as pure tensor functions (reference implementations).

Paper: Chang et al., "Bias-Alleviating Low-Rank Adaptation", ICLR 2026, arXiv 2408.04556, Section 3.2:
consistency (Eq. 4/7), diversity (Eq. 5/8) and SVD (Eq. 6/9) regularizers, for NLU (per-example logits) and NLG
(per-token logits).

Every function returns a 0-dim float32 tensor *to minimise*; the sign is stated in each docstring. All softmax, entropy
and SVD arithmetic runs in float32 whatever the dtype of the logits. Empty inputs (nothing supervised) give 0 with a
finite (zero) gradient, never NaN.

These are the plain, readable references. `balora.fused` holds the fast paths used by the trainer by default; its tests
compare against these.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # label of positions that are not supervised (prompt and padding); ignored by cross-entropy
# The terms of the objective, as the trainer logs them and run directories, plots and tables show them.
LOSS_TERMS = ("task_loss", "consistency_loss", "diversity_loss", "svd_loss")

__all__ = [
    "IGNORE_INDEX",
    "LOSS_TERMS",
    "nlg_consistency",
    "nlg_diversity",
    "nlg_svd",
    "nlg_valid_mask",
    "nlu_consistency",
    "nlu_diversity",
    "nlu_feature_consistency",
    "nlu_svd",
    "select_valid",
]

_warned_svd_constant: set[tuple[int, int]] = set()


def _zero(like: Tensor) -> Tensor:
    """A float32 zero that stays connected to `like`'s graph, so backward gives zeros instead of failing."""
    return like.float().sum() * 0.0


# --------------------------------------------------------------------------------------------------------------------
# NLU: logits (N, D), N examples, D classes (D = 1 for regression heads)
# --------------------------------------------------------------------------------------------------------------------


def nlu_consistency(logits: Tensor, teacher_logits: Tensor, *, temperature: float = 2.0) -> Tensor:
    """Consistency with the pre-trained model (paper Eq. 4), >= 0, minimise.

    L = T² · (1/N) Σ_n KL(softmax(Z_P[n]/T) ‖ softmax(Z_F[n]/T)), with Z_F = `logits` (N, D) and Z_P = `teacher_logits`
    (N, D), reduced as a mean over examples. For a regression head (D = 1) a softmax over one logit is constant, so the
    term is instead the mean squared difference (1/N) Σ_n (Z_F[n] − Z_P[n])² (no temperature).
    """
    if logits.shape != teacher_logits.shape or logits.dim() != 2:
        raise ValueError(
            f"nlu_consistency expects logits and teacher_logits of the same shape (N, D); got {tuple(logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if logits.shape[0] == 0:
        return _zero(logits)
    student = logits.float()
    teacher = teacher_logits.detach().float()
    if logits.shape[1] == 1:
        return (student - teacher).pow(2).mean()
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
    return kl / logits.shape[0] * temperature**2


def nlu_feature_consistency(features: Tensor, teacher_features: Tensor) -> Tensor:
    """Drift of the pooled features from the pre-trained model's, in [0, 2], minimise (balora's `features` target).

    L = (1/N) Σ_n (1 − cos(h_F[n], h_P[n])), with h_F = `features` (N, H) of the model being trained and h_P =
    `teacher_features` (N, H) of the pre-trained model (detached). Scale-free: it measures where the features point,
    not their norm, so it neither depends on the head nor pulls any prediction toward a fixed output. A zero feature
    row counts as cosine 0 (finite gradient). Not in the paper: its consistency term (Eq. 4) compares logits.
    """
    if features.shape != teacher_features.shape or features.dim() != 2:
        raise ValueError(
            "nlu_feature_consistency expects features and teacher_features of the same shape (N, H); got "
            f"{tuple(features.shape)} and {tuple(teacher_features.shape)}"
        )
    if features.shape[0] == 0:
        return _zero(features)
    cos = F.cosine_similarity(features.float(), teacher_features.detach().float(), dim=-1, eps=1e-8)
    return (1.0 - cos).mean()


def nlu_diversity(logits: Tensor) -> Tensor:
    """Diversity of the batch logits (paper Eq. 5), >= 0, minimise.

    C = Z_cᵀ Z_c / (N − 1) with Z_c = Z_F − mean over the batch (the (D, D) covariance of the class logits);
    L = (1/D) Σ_{i≠j} C_ij². Minimising it decorrelates the logit dimensions. 0 when N < 2 or D < 2.
    """
    if logits.dim() != 2:
        raise ValueError(f"nlu_diversity expects logits of shape (N, D); got {tuple(logits.shape)}")
    n, d = logits.shape
    if n < 2 or d < 2:
        return _zero(logits)
    z = logits.float()
    zc = z - z.mean(dim=0, keepdim=True)
    cov = zc.T @ zc / (n - 1)  # (D, D)
    off_diagonal = cov - torch.diag_embed(torch.diagonal(cov))
    return off_diagonal.pow(2).sum() / d


def _svd_ratio(top: Tensor, total: Tensor) -> Tensor:
    """−top/total, and 0 (with zero gradient) when total is 0, where the ratio is undefined."""
    eps = torch.finfo(torch.float32).tiny
    nonzero = (total > eps).to(total.dtype)
    return -(top / total.clamp_min(eps)) * nonzero


def nlu_svd(logits: Tensor, *, top_k: int = 5) -> Tensor:
    """Spectral concentration of the batch logits (paper Eq. 6), in [−1, 0], minimise.

    σ = singular values of Z_F (N, D), exact (`torch.linalg.svdvals`); L = −(Σ_{i≤k} σ_i) / (Σ_i σ_i).
    When k ≥ min(N, D) the ratio is identically 1, so the term is the constant −1 with no gradient. This happens with
    the paper's k = 5 on every 2- and 3-class GLUE task; a warning is emitted once per shape.
    """
    if logits.dim() != 2:
        raise ValueError(f"nlu_svd expects logits of shape (N, D); got {tuple(logits.shape)}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1; got {top_k}")
    n, d = logits.shape
    if n == 0:
        return _zero(logits)
    if top_k >= min(n, d):
        key = (top_k, min(n, d))
        if key not in _warned_svd_constant:
            _warned_svd_constant.add(key)
            warnings.warn(
                f"nlu_svd: svd_top_k={top_k} >= min(batch, classes)={min(n, d)}, so the SVD term is the constant -1 "
                "and has no gradient (the paper's k=5 on a 2- or 3-class task). Lower svd_top_k below the number of "
                "classes, or set svd_weight=0 to skip it.",
                stacklevel=2,
            )
        return _zero(logits) - 1.0
    sigma = torch.linalg.svdvals(logits.float())
    return _svd_ratio(sigma[:top_k].sum(), sigma.sum())


# --------------------------------------------------------------------------------------------------------------------
# NLG: logits (B, T, V) and labels (B, T) with IGNORE_INDEX on prompt and padding
# --------------------------------------------------------------------------------------------------------------------


def nlg_valid_mask(labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(B, T) bool mask of the positions whose logits predict a supervised token.

    Aligned with the causal-LM loss: position t is valid when labels[:, t + 1] != ignore_index; the last position
    predicts nothing. The paper's public code masks with the unshifted labels, which is one position off from its own
    cross-entropy; we align the regularizers with the tokens the task loss trains on.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape (B, T); got {tuple(labels.shape)}")
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != ignore_index
    return mask


def select_valid(logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Rows of `logits` (B, T, V) at the valid positions of `nlg_valid_mask`: (M, V), in the logits' dtype."""
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T); got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return logits[nlg_valid_mask(labels, ignore_index=ignore_index)]


def nlg_consistency(
    logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 2.0,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Consistency with the pre-trained model over the supervised tokens (paper Eq. 7), >= 0, minimise.

    L = T² · (1/M) Σ_valid KL(softmax(Z_P/T) ‖ softmax(Z_F/T)) over the full vocabulary, where the M valid positions
    are those of `nlg_valid_mask`. Shapes: logits and teacher_logits (B, T, V), labels (B, T).
    """
    if logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logits and teacher_logits must have the same shape; got {tuple(logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    z_f = select_valid(logits, labels, ignore_index=ignore_index)
    if z_f.shape[0] == 0:
        return _zero(logits)
    z_p = select_valid(teacher_logits.detach(), labels, ignore_index=ignore_index)
    log_p_student = F.log_softmax(z_f.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(z_p.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
    return kl / z_f.shape[0] * temperature**2


def nlg_diversity(logits: Tensor, labels: Tensor, *, top_k: int = 20, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Negative entropy among the top-K candidate tokens (paper Eq. 8), in [−log K, 0], minimise.

    For each valid position, take the K largest logits, renormalise them with a softmax (float32) and compute the
    entropy H; L = −(1/M) Σ_valid H. Minimising L maximises the entropy of the candidates. K is capped at V.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1; got {top_k}")
    z = select_valid(logits, labels, ignore_index=ignore_index)
    if z.shape[0] == 0:
        return _zero(logits)
    top = torch.topk(z.float(), k=min(top_k, z.shape[-1]), dim=-1).values  # (M, K)
    log_p = F.log_softmax(top, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)  # (M,)
    return -entropy.mean()


def nlg_svd(
    logits: Tensor,
    labels: Tensor,
    *,
    top_k: int = 10,
    oversample: int = 5,
    niter: int = 2,
    exact: bool | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Spectral concentration of the supervised-token logits (paper Eq. 9), in [−√k, 0], minimise.

    σ̃ = the top-k singular values of Z_valid (M, V) by randomized SVD (`torch.svd_lowrank` with q = k + oversample and
    `niter` power iterations); L = −(Σ_{i≤k} σ̃_i) / ‖Z_valid‖_F, which is −1 at rank 1 and reaches −√k (Cauchy–Schwarz)
    when the top k are equal. Unlike the paper's code, the sketch's basis is not differentiated: σ̃ are the exact
    singular values of Qᵀ Z_valid with Q fixed (same values, gradient Σ u_i v_iᵀ as in the exact path), because the
    QR backward inside the sketch divides by R and gives NaN on rank-deficient or all-zero logits. `exact=None` (auto)
    uses `torch.linalg.svdvals` when min(M, V) ≤ 2q, where the exact values cost no more than the sketch; `exact=True`
    forces it. The sketch draws from the global RNG.
    """
    if top_k < 1 or oversample < 0 or niter < 0:
        raise ValueError(f"need top_k >= 1, oversample >= 0, niter >= 0; got {top_k}, {oversample}, {niter}")
    z = select_valid(logits, labels, ignore_index=ignore_index).float()
    if z.shape[0] == 0:
        return _zero(logits)
    q = top_k + oversample
    if exact or (exact is None and min(z.shape) <= 2 * q) or q > min(z.shape):
        sigma = torch.linalg.svdvals(z)
    else:
        with torch.no_grad():
            basis = torch.svd_lowrank(z, q=q, niter=niter)[0]  # (M, q), orthonormal columns
        sigma = torch.linalg.svdvals(basis.T @ z)  # (q,)
    return _svd_ratio(sigma[:top_k].sum(), torch.linalg.vector_norm(z))
