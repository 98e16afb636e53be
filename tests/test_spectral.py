"""Tests for `balora.spectral`: the SVD term with an explicit gradient (randomized, exact) and its hidden-space form.

References: float64 `torch.linalg.svd` + autograd written here, and `losses.nlg_svd`. Randomized paths are tested on
matrices with a geometrically decaying spectrum (a flat spectrum has no well-defined top-k), against the exact top-k.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from balora import spectral
from balora.fused import nlg_svd_loss
from balora.losses import nlg_svd, nlg_valid_mask
from balora.spectral import clear_head_cache, head_gram_root, hidden_svd_loss, top_singular

IGNORE = -100


def decaying(m: int, v: int, *, rank: int = 40, ratio: float = 0.7, scale: float = 30.0) -> Tensor:
    """(m, v) float32 U diag(s) Vᵀ with s_i = scale · ratio^i: a spectrum whose top-k is well separated."""
    rank = min(rank, m, v)
    u = torch.linalg.qr(torch.randn(m, rank, dtype=torch.float64)).Q
    w = torch.linalg.qr(torch.randn(v, rank, dtype=torch.float64)).Q
    s = scale * ratio ** torch.arange(rank, dtype=torch.float64)
    return ((u * s) @ w.T).float()


def ref_svd_loss(z: Tensor, k: int) -> Tensor:
    """Float64 −Σ_{i≤k} σ_i / ‖Z‖_F on (M, V); differentiable (autograd through torch.linalg.svdvals)."""
    z = z.double()
    return -torch.linalg.svdvals(z)[:k].sum() / torch.linalg.norm(z)


def ref_min_norm_grad(z: Tensor, k: int) -> Tensor:
    """Float64 closed form −U_k V_kᵀ/‖Z‖ + (S/‖Z‖³) Z over the nonzero σ only (the minimum-norm choice at rank < k)."""
    z = z.double()
    u, s, vh = torch.linalg.svd(z, full_matrices=False)
    keep = s[:k] > s[0] * max(z.shape) * 1e-6
    u, s, vh = u[:, :k][:, keep], s[:k][keep], vh[:k][keep]
    f = torch.linalg.norm(z)
    return -(u @ vh) / f + s.sum() / f**3 * z


def grad_of(fn, x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.detach().clone().requires_grad_()
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


def cosine(a: Tensor, b: Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def masked_labels(b: int, t: int, v: int) -> Tensor:
    labels = torch.randint(0, v, (b, t))
    labels[0, : t // 3] = IGNORE
    labels[-1, -2:] = IGNORE
    return labels


@pytest.mark.parametrize("shape", [(2, 9, 37, 4, 3), (1, 30, 12, 5, 4), (3, 4, 50, 10, 100), (1, 2, 20, 3, None)])
def test_exact_matches_float64_and_plain_reference(shape):
    b, t, v, k, chunk = shape  # V < M, M < V, k ≥ M (= rank), one valid row
    logits, labels = torch.randn(b, t, v) * 2, masked_labels(b, t, v)
    if b * t == 2:
        labels = torch.tensor([[0, 5]])
    mask = nlg_valid_mask(labels)
    value, grad = grad_of(lambda x: nlg_svd_loss(x, labels, top_k=k, method="exact", chunk_size=chunk), logits)
    want, want_grad = grad_of(lambda x: ref_svd_loss(x[mask], k), logits.double())
    torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-6)
    if k < min(int(mask.sum()), v):  # else rank < k: not differentiable, see the next test
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-3, atol=1e-6)
    else:
        torch.testing.assert_close(grad[mask].double(), ref_min_norm_grad(logits[mask], k), rtol=1e-3, atol=1e-6)
    assert grad[~mask].abs().max() == 0
    plain, plain_grad = grad_of(lambda x: nlg_svd(x, labels, top_k=k, exact=True), logits)
    torch.testing.assert_close(value, plain, rtol=1e-5, atol=1e-6)
    if k < min(int(mask.sum()), v):
        torch.testing.assert_close(grad, plain_grad, rtol=1e-3, atol=1e-6)


def test_rank_deficient_identical_rows_and_zero_logits():
    row = torch.randn(23)
    logits = row.expand(1, 8, 23).clone()  # rank 1: L ≡ −1, the minimum-norm gradient is exactly 0
    labels = torch.ones(1, 8, dtype=torch.long)
    for method in ("exact", "randomized"):
        value, grad = grad_of(lambda x, m=method: nlg_svd_loss(x, labels, top_k=3, method=m), logits)
        torch.testing.assert_close(value, torch.tensor(-1.0))
        assert grad.abs().max() < 1e-6
    rank3 = decaying(30, 40, rank=3)[None]  # k = 10 > rank 3: finite, the min-norm closed form
    labels = torch.ones(1, 30, dtype=torch.long)
    value, grad = grad_of(lambda x: nlg_svd_loss(x, labels, top_k=10, method="exact"), rank3)
    mask = nlg_valid_mask(labels)
    torch.testing.assert_close(value.double(), ref_svd_loss(rank3[0, :-1], 10), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[mask].double(), ref_min_norm_grad(rank3[mask], 10), rtol=1e-3, atol=1e-6)
    zeros = torch.zeros(2, 5, 9)
    value, grad = grad_of(lambda x: nlg_svd_loss(x, torch.ones(2, 5, dtype=torch.long)), zeros)
    assert value.item() == 0.0 and torch.equal(grad, zeros)
    value, grad = grad_of(lambda x: nlg_svd_loss(x, torch.full((2, 5), IGNORE)), torch.randn(2, 5, 9))
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros(2, 5, 9))


@pytest.mark.parametrize("m, v", [(300, 500), (500, 200)])
def test_randomized_on_a_decaying_spectrum_is_close_to_exact(m, v):
    z = decaying(m, v)  # σ_i = 30 · 0.7^i
    labels = torch.ones(1, m + 1, dtype=torch.long)
    logits = torch.cat([z, torch.zeros(1, v)])[None]  # the last position predicts nothing
    exact, exact_grad = grad_of(lambda x: nlg_svd_loss(x, labels, method="exact"), logits)
    want, want_grad = grad_of(lambda x: ref_svd_loss(x[0, :-1], 10), logits.double())
    torch.testing.assert_close(exact.double(), want, rtol=1e-5, atol=1e-6)
    assert cosine(exact_grad, want_grad) > 0.99999
    for seed in range(3):
        value, grad = grad_of(lambda x, s=seed: nlg_svd_loss(x, labels, method="randomized", seed=s), logits)
        torch.testing.assert_close(value.double(), want, rtol=1e-4, atol=1e-6)
        assert cosine(grad, want_grad) >= 0.99
    plain = nlg_svd(logits, labels)  # the paper's estimate through torch.svd_lowrank
    torch.testing.assert_close(plain.double(), want, rtol=1e-4, atol=1e-6)


def test_randomized_seed_is_reproducible_and_leaves_global_rng_alone():
    logits = decaying(120, 200)[None]
    labels = torch.ones(1, 120, dtype=torch.long)
    state = torch.random.get_rng_state()
    a = top_singular(logits[0], torch.arange(119), top_k=5, niter=0, seed=7)
    b = top_singular(logits[0], torch.arange(119), top_k=5, niter=0, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.s, b.s) and torch.equal(a.vh, b.vh)
    value = nlg_svd_loss(logits, labels, top_k=5, niter=0, seed=7)
    torch.testing.assert_close(value, a.loss())


@pytest.mark.parametrize("spectrum", ["geometric 0.97", "power -0.5"])
def test_default_randomized_gradient_on_slowly_decaying_spectra(spectrum):
    """σ_10/σ_11 close to 1: the paper's q = k + 5 is not enough here (cosine 0.8-0.99); the default q = k + 20 is."""
    s = 0.97 ** torch.arange(200.0) if spectrum.startswith("geometric") else (1 + torch.arange(400.0)) ** -0.5
    u, w = torch.linalg.qr(torch.randn(400, s.numel())).Q, torch.linalg.qr(torch.randn(900, s.numel())).Q
    logits = torch.cat([(u * s * 100) @ w.T, torch.zeros(1, 900)])[None]
    labels = torch.ones(1, 401, dtype=torch.long)
    want, want_grad = grad_of(lambda x: ref_svd_loss(x[0, :-1], 10), logits.double())
    for seed in range(3):
        value, grad = grad_of(lambda x, s=seed: nlg_svd_loss(x, labels, seed=s), logits)
        assert cosine(grad, want_grad) >= 0.99
        torch.testing.assert_close(value.double(), want, rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_logits_and_backward_scale(dtype):
    logits = decaying(60, 70)[None].to(dtype)
    labels = torch.ones(1, 60, dtype=torch.long)
    x = logits.clone().requires_grad_()
    (2.5 * nlg_svd_loss(x, labels, top_k=4, method="exact")).backward()
    assert x.grad.dtype == dtype
    _, want_grad = grad_of(lambda y: ref_svd_loss(y[0, :-1], 4), logits.double())
    tol = dict(rtol=1e-3, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(x.grad[0, :-1].double(), 2.5 * want_grad[0, :-1], **tol)


# --------------------------------------------------------------------------------------------------------------------
# Hidden space
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 7, 16, 60, 5), (1, 30, 8, 50, 10), (3, 3, 12, 9, 3)])
def test_hidden_space_equals_logits_space_exact(shape):
    b, t, d, v, k = shape  # includes V < d (rank-deficient Gram) and k ≥ rank
    hidden = torch.randn(b, t, d)
    head = torch.randn(v, d) / d**0.5
    labels = masked_labels(b, t, v)
    mask = nlg_valid_mask(labels)
    value, grad = grad_of(lambda h: hidden_svd_loss(h, labels, head, top_k=k), hidden)
    logits_value = nlg_svd_loss(hidden @ head.T, labels, top_k=k, method="exact")
    torch.testing.assert_close(value, logits_value, rtol=1e-5, atol=1e-6)
    # float64 reference: autograd through Z = H Wᵀ (or the min-norm closed form at rank < k)
    if k < min(int(mask.sum()), v, d):
        want, want_grad = grad_of(lambda h: ref_svd_loss((h @ head.double().T)[mask], k), hidden.double())
    else:
        h64 = hidden.double()
        want = ref_svd_loss((h64 @ head.double().T)[mask], k)
        want_grad = torch.zeros_like(h64)
        want_grad[mask] = ref_min_norm_grad((h64 @ head.double().T)[mask], k) @ head.double()
    torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-3, atol=1e-6)
    flat_value = hidden_svd_loss(hidden[mask], None, head, top_k=k)  # already-selected (M, d)
    torch.testing.assert_close(flat_value, value)


def test_hidden_space_bf16_gram_argument_and_empty_mask():
    hidden, head = torch.randn(2, 6, 16), torch.randn(40, 16)
    labels = torch.randint(0, 40, (2, 6))
    value = hidden_svd_loss(hidden, labels, head)
    torch.testing.assert_close(hidden_svd_loss(hidden, labels, None, gram=head.double().T @ head.double()), value)
    h16 = hidden.bfloat16().requires_grad_()
    hidden_svd_loss(h16, labels, head).backward()
    assert h16.grad.dtype == torch.bfloat16 and torch.isfinite(h16.grad.float()).all()
    empty = hidden.clone().requires_grad_()
    out = hidden_svd_loss(empty, torch.full((2, 6), IGNORE), head)
    out.backward()
    assert out.item() == 0.0 and torch.equal(empty.grad, torch.zeros_like(hidden))


def test_head_gram_cache_follows_the_weight():
    clear_head_cache()
    head = torch.randn(30, 8)
    root = head_gram_root(head)
    assert head_gram_root(head) is root  # cached
    torch.testing.assert_close((root @ root.T).double(), head.double().T @ head.double(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        head.mul_(2.0)  # an in-place update bumps the version: recomputed
    assert head_gram_root(head) is not root
    torch.testing.assert_close(head_gram_root(head) @ head_gram_root(head).T, 4 * (root @ root.T))
    del head
    head_gram_root(torch.randn(5, 8))
    assert len(spectral._ROOT_CACHE) == 1  # the freed head's entry is dropped
    trainable = torch.randn(30, 8, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        hidden_svd_loss(torch.randn(4, 8), None, trainable)
