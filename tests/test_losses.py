"""Tests for `balora.losses`: the six BA-LoRA regularizers (paper Section 3.2, Eq. 4-9).

Each function is compared, on values and gradients over odd shapes, with a naive float64 reference written below from
the definitions (explicit loops over rows, classes and positions; gradients by float64 autograd through those loops).
Then properties: signs and ranges, masking, the shifted NLG mask, degenerate batches, empty masks, shape errors.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from balora import losses
from balora.losses import (
    nlg_consistency,
    nlg_diversity,
    nlg_svd,
    nlg_valid_mask,
    nlu_consistency,
    nlu_diversity,
    nlu_svd,
)

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16]
# The functions upcast to float32 and the references run on the same (rounded) inputs in float64, so values agree to
# float32 accuracy for every dtype; gradients come back in the input dtype, hence the looser bf16 gradient tolerance.
VALUE_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=1e-4, atol=1e-5)}
GRAD_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


# --------------------------------------------------------------------------------------------------------------------
# Naive float64 references, from the definitions; nothing shared with losses.py
# --------------------------------------------------------------------------------------------------------------------


def ref_log_softmax(row: Tensor) -> list[Tensor]:
    """log softmax of a 1-D float64 tensor, one scalar per class, with the usual max shift."""
    shift = row.detach().max()
    log_norm = shift + torch.log(sum(torch.exp(row[c] - shift) for c in range(row.numel())))
    return [row[c] - log_norm for c in range(row.numel())]


def ref_kl(teacher_row: Tensor, student_row: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) = Σ_c p_c (log p_c − log q_c)."""
    log_p = ref_log_softmax(teacher_row / temperature)
    log_q = ref_log_softmax(student_row / temperature)
    return sum(torch.exp(lp) * (lp - lq) for lp, lq in zip(log_p, log_q, strict=True))


def ref_nlu_consistency(z_f: Tensor, z_p: Tensor, temperature: float) -> Tensor:
    n, d = z_f.shape
    if d == 1:
        return sum((z_f[i, 0] - z_p[i, 0]) ** 2 for i in range(n)) / n
    return temperature**2 * sum(ref_kl(z_p[i], z_f[i], temperature) for i in range(n)) / n


def ref_nlu_diversity(z: Tensor) -> Tensor:
    n, d = z.shape
    if n < 2 or d < 2:
        return torch.zeros((), dtype=torch.float64)
    means = [sum(z[r, c] for r in range(n)) / n for c in range(d)]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(d):
        for j in range(d):
            if i != j:
                cov_ij = sum((z[r, i] - means[i]) * (z[r, j] - means[j]) for r in range(n)) / (n - 1)
                total = total + cov_ij**2
    return total / d


def ref_nlu_svd(z: Tensor, top_k: int) -> Tensor:
    sigma = torch.linalg.svdvals(z)  # float64, descending
    return -sum(sigma[i] for i in range(top_k)) / sum(sigma[i] for i in range(sigma.numel()))


def ref_valid_positions(labels: Tensor) -> list[tuple[int, int]]:
    """(b, t) whose logits predict a supervised token, labels[b, t + 1] != IGNORE; the last one predicts nothing."""
    batch, length = labels.shape
    return [(b, t) for b in range(batch) for t in range(length - 1) if int(labels[b, t + 1]) != IGNORE]


def ref_nlg_consistency(z_f: Tensor, z_p: Tensor, labels: Tensor, temperature: float) -> Tensor:
    positions = ref_valid_positions(labels)
    total = sum(ref_kl(z_p[b, t], z_f[b, t], temperature) for b, t in positions)
    return temperature**2 * total / len(positions)


def ref_nlg_diversity(z: Tensor, labels: Tensor, top_k: int) -> Tensor:
    positions = ref_valid_positions(labels)
    total = torch.zeros((), dtype=torch.float64)
    for b, t in positions:
        row = z[b, t]
        order = sorted(range(row.numel()), key=lambda c: float(row[c].detach()), reverse=True)[:top_k]
        log_p = ref_log_softmax(torch.stack([row[c] for c in order]))
        total = total - sum(torch.exp(lp) * lp for lp in log_p)  # + entropy
    return -total / len(positions)


def ref_nlg_svd(z: Tensor, labels: Tensor, top_k: int) -> Tensor:
    rows = torch.stack([z[b, t] for b, t in ref_valid_positions(labels)])  # (M, V)
    sigma = torch.linalg.svdvals(rows)
    frobenius = torch.sqrt(sum(rows[m] @ rows[m] for m in range(rows.shape[0])))
    return -sum(sigma[i] for i in range(min(top_k, sigma.numel()))) / frobenius


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def value_and_grad(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out.backward()
    return out.detach(), x.grad


def assert_matches_reference(
    fn: Callable[[Tensor], Tensor], ref: Callable[[Tensor], Tensor], x: Tensor, dtype: torch.dtype
) -> None:
    """fn(x in dtype) against ref(the same rounded x in float64), on the value and on d/dx."""
    x = x.to(dtype)
    value, grad = value_and_grad(fn, x)
    ref_value, ref_grad = value_and_grad(ref, x.double())
    assert value.dtype == torch.float32
    assert grad.dtype == dtype
    torch.testing.assert_close(value.double(), ref_value, **VALUE_TOL[dtype])
    scale = ref_grad.abs().max().item()
    assert scale > 0, "reference gradient is zero: the comparison would be vacuous"
    torch.testing.assert_close(grad.double(), ref_grad, rtol=GRAD_RTOL[dtype], atol=GRAD_RTOL[dtype] * scale)


def make_labels(batch: int, length: int, vocab: int, generator: torch.Generator) -> Tensor:
    """Random token ids with an IGNORE prompt prefix and padding suffix of different lengths per row."""
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    for b in range(batch):
        prompt = int(torch.randint(0, length // 2, (1,), generator=generator))
        pad = int(torch.randint(0, length // 3, (1,), generator=generator))
        labels[b, :prompt] = IGNORE
        labels[b, length - pad :] = IGNORE
    labels[0, 1:3] = torch.tensor([1, 2])  # at least one valid position
    return labels


def decaying_logits(rows: int, cols: int, ratio: float, generator: torch.Generator) -> Tensor:
    """Z = U diag(s) Vᵀ with s_i = 10 · ratio^i, so the top-k singular values are well separated from the rest."""
    r = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, r, dtype=torch.float64, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, r, dtype=torch.float64, generator=generator))
    s = 10.0 * ratio ** torch.arange(r, dtype=torch.float64)
    return ((u * s) @ v.T).float()


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# --------------------------------------------------------------------------------------------------------------------
# Values and gradients against the references
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "temperature"), [((7, 5), 2.0), ((13, 3), 1.0), ((1, 11), 0.7), ((3, 2), 3.0)])
def test_nlu_consistency_matches_reference(gen, dtype, shape, temperature):
    teacher = (2 * torch.randn(shape, generator=gen)).to(dtype)
    student = 2 * torch.randn(shape, generator=gen)
    assert_matches_reference(
        lambda z: nlu_consistency(z, teacher, temperature=temperature),
        lambda z: ref_nlu_consistency(z, teacher.double(), temperature),
        student,
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 5), (13, 3), (2, 6), (9, 2)])
def test_nlu_diversity_matches_reference(gen, dtype, shape):
    assert_matches_reference(nlu_diversity, ref_nlu_diversity, torch.randn(shape, generator=gen) + 3.0, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "top_k"), [((7, 5), 2), ((13, 3), 1), ((3, 11), 2), ((9, 6), 4)])
def test_nlu_svd_matches_reference(gen, dtype, shape, top_k):
    assert_matches_reference(
        lambda z: nlu_svd(z, top_k=top_k), lambda z: ref_nlu_svd(z, top_k), torch.randn(shape, generator=gen), dtype
    )


NLG_SHAPES = [(2, 9, 13), (3, 5, 7), (1, 8, 31)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NLG_SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_nlg_consistency_matches_reference(gen, dtype, shape, temperature):
    labels = make_labels(shape[0], shape[1], shape[2], gen)
    teacher = (3 * torch.randn(shape, generator=gen)).to(dtype)
    assert_matches_reference(
        lambda z: nlg_consistency(z, teacher, labels, temperature=temperature),
        lambda z: ref_nlg_consistency(z, teacher.double(), labels, temperature),
        3 * torch.randn(shape, generator=gen),
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NLG_SHAPES)
@pytest.mark.parametrize("top_k", [1, 4, 50])  # 1: entropy 0; 50 > V: capped at V
def test_nlg_diversity_matches_reference(gen, dtype, shape, top_k):
    labels = make_labels(shape[0], shape[1], shape[2], gen)
    logits = 3 * torch.randn(shape, generator=gen)
    fn, ref = (lambda z: nlg_diversity(z, labels, top_k=top_k)), (lambda z: ref_nlg_diversity(z, labels, top_k))
    if top_k == 1:  # a one-candidate softmax has entropy 0 and no gradient
        value, grad = value_and_grad(fn, logits.to(dtype))
        assert value.item() == 0.0 and ref(logits.double()).item() == 0.0
        assert torch.all(grad == 0)
        return
    assert_matches_reference(fn, ref, logits, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NLG_SHAPES)
@pytest.mark.parametrize("top_k", [1, 3])
def test_nlg_svd_exact_matches_reference(gen, dtype, shape, top_k):
    labels = make_labels(shape[0], shape[1], shape[2], gen)
    assert_matches_reference(
        lambda z: nlg_svd(z, labels, top_k=top_k, exact=True),
        lambda z: ref_nlg_svd(z, labels, top_k),
        torch.randn(shape, generator=gen),
        dtype,
    )


def test_nlg_svd_randomized_close_to_exact_on_decaying_spectrum(gen, monkeypatch):
    batch, length, vocab, top_k = 2, 21, 48, 3  # M = 40 valid rows > 2q = 14: the auto path sketches
    logits = decaying_logits(batch * length, vocab, ratio=0.5, generator=gen).reshape(batch, length, vocab)
    labels = torch.zeros(batch, length, dtype=torch.long)
    calls = []
    real_svd_lowrank = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", lambda *a, **k: calls.append(1) or real_svd_lowrank(*a, **k))

    torch.manual_seed(0)
    value, grad = value_and_grad(lambda z: nlg_svd(z, labels, top_k=top_k, oversample=4, niter=2), logits)
    assert len(calls) == 1, "the randomized path was not taken"
    ref_value, ref_grad = value_and_grad(lambda z: ref_nlg_svd(z, labels, top_k), logits.double())
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-3, atol=0)
    assert ((grad.double() - ref_grad).norm() / ref_grad.norm()).item() < 1e-2


@pytest.mark.parametrize(
    ("rows", "exact", "expected_sketches"),
    [(40, None, 1), (40, True, 0), (14, None, 0), (6, False, 0)],  # q = 7: auto sketches only when min(M, V) > 14
)
def test_nlg_svd_path_selection(gen, monkeypatch, rows, exact, expected_sketches):
    calls = []
    real_svd_lowrank = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", lambda *a, **k: calls.append(1) or real_svd_lowrank(*a, **k))
    logits = torch.randn(1, rows + 1, 48, generator=gen)  # rows + 1 positions, the last one never valid
    nlg_svd(logits, torch.zeros(1, rows + 1, dtype=torch.long), top_k=3, oversample=4, exact=exact)
    assert len(calls) == expected_sketches  # (6, False): q = 7 > M = 6, so even exact=False falls back to exact


# --------------------------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------------------------


def test_consistency_is_zero_when_student_equals_teacher(gen):
    z = 4 * torch.randn(6, 5, generator=gen)
    value, grad = value_and_grad(lambda x: nlu_consistency(x, z, temperature=2.0), z)
    assert value.item() == pytest.approx(0.0, abs=1e-7) and grad.abs().max().item() < 1e-7
    zz = 4 * torch.randn(2, 7, 9, generator=gen)
    labels = make_labels(2, 7, 9, gen)
    value, grad = value_and_grad(lambda x: nlg_consistency(x, zz, labels, temperature=2.0), zz)
    assert value.item() == pytest.approx(0.0, abs=1e-7) and grad.abs().max().item() < 1e-7


@pytest.mark.parametrize("scale", [0.1, 1.0, 10.0, 100.0])
def test_consistency_is_nonnegative_and_teacher_gets_no_gradient(gen, scale):
    for _ in range(5):
        student = (scale * torch.randn(8, 6, generator=gen)).requires_grad_(True)
        teacher = (scale * torch.randn(8, 6, generator=gen)).requires_grad_(True)
        value = nlu_consistency(student, teacher, temperature=1.5)
        assert value.item() > 0
        value.backward()
        assert teacher.grad is None
        student3, teacher3 = student.detach().reshape(2, 4, 6), teacher.detach().reshape(2, 4, 6)
        teacher3.requires_grad_(True)
        value = nlg_consistency(student3.requires_grad_(True), teacher3, torch.zeros(2, 4, dtype=torch.long))
        assert value.item() > 0
        value.backward()
        assert teacher3.grad is None


def test_nlu_consistency_regression_head_is_mse(gen):
    student, teacher = torch.randn(9, 1, generator=gen), torch.randn(9, 1, generator=gen)
    expected = sum((float(student[i, 0]) - float(teacher[i, 0])) ** 2 for i in range(9)) / 9
    for temperature in (0.5, 2.0):  # the temperature does not apply to a regression head
        value, grad = value_and_grad(lambda z, t=temperature: nlu_consistency(z, teacher, temperature=t), student)
        assert value.item() == pytest.approx(expected, rel=1e-5)
        torch.testing.assert_close(grad, 2 * (student - teacher) / 9)


def test_nlu_diversity_properties(gen):
    z = torch.randn(10, 4, generator=gen)
    shifted = z + torch.tensor([100.0, -3.0, 7.0, 0.5])  # a per-class offset is centred away
    assert nlu_diversity(z).item() > 0
    assert nlu_diversity(shifted).item() == pytest.approx(nlu_diversity(z).item(), rel=1e-3)
    # Uncorrelated columns (orthogonal after centring) give 0; scaling a column changes only the diagonal.
    centred = torch.randn(10, 4, dtype=torch.float64, generator=gen)
    q, _ = torch.linalg.qr(centred - centred.mean(dim=0))  # orthonormal columns, still centred
    assert abs(nlu_diversity(q.float() * torch.tensor([1.0, 2.0, 3.0, 4.0])).item()) < 1e-10
    for shape in [(1, 5), (6, 1), (0, 3)]:  # nothing to correlate
        value, grad = value_and_grad(nlu_diversity, torch.randn(shape, generator=gen))
        assert value.item() == 0.0 and torch.all(grad == 0)


def test_nlu_svd_range_and_rank_one(gen):
    for shape, top_k in [((8, 6), 2), ((5, 9), 3)]:
        value = nlu_svd(torch.randn(shape, generator=gen), top_k=top_k).item()
        assert -1.0 < value < 0.0
    rank_one = torch.randn(8, 1, generator=gen) @ torch.randn(1, 6, generator=gen)
    assert nlu_svd(rank_one, top_k=1).item() == pytest.approx(-1.0, abs=1e-5)


@pytest.mark.parametrize(("shape", "top_k"), [((6, 2), 5), ((5, 3), 3), ((2, 8), 2)])
def test_nlu_svd_constant_when_top_k_covers_the_spectrum(gen, monkeypatch, shape, top_k):
    monkeypatch.setattr(losses, "_warned_svd_constant", set())
    z = torch.randn(shape, generator=gen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value, grad = value_and_grad(lambda x: nlu_svd(x, top_k=top_k), z)
        value_again, _ = value_and_grad(lambda x: nlu_svd(x, top_k=top_k), 2 * z)
    assert value.item() == -1.0 and value_again.item() == -1.0 and value.dtype == torch.float32
    assert torch.all(grad == 0)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages  # once per shape, not once per step
    assert f"svd_top_k={top_k}" in messages[0] and "svd_weight=0" in messages[0]


def test_nlg_valid_mask_is_shifted_by_one():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE, 7], [1, 2, 3, IGNORE, IGNORE, IGNORE]])
    expected = torch.tensor([[False, True, True, False, True, False], [True, True, False, False, False, False]])
    assert torch.equal(nlg_valid_mask(labels), expected)
    # The last position predicts nothing, even when every label (the first one included) is supervised: no wrap-around.
    assert nlg_valid_mask(torch.ones(3, 4, dtype=torch.long))[:, -1].any().item() is False
    other_ignore = torch.tensor([[True, False, True, True, True, False], [True] * 5 + [False]])  # labels[0, 2] == 5
    assert torch.equal(nlg_valid_mask(labels, ignore_index=5), other_ignore)


NLG_FUNCTIONS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "consistency": lambda z, teacher, labels: nlg_consistency(z, teacher, labels, temperature=1.5),
    "diversity": lambda z, teacher, labels: nlg_diversity(z, labels, top_k=4),
    "svd_exact": lambda z, teacher, labels: nlg_svd(z, labels, top_k=2, exact=True),
    "svd_randomized": lambda z, teacher, labels: nlg_svd(z, labels, top_k=2, oversample=3, niter=2, exact=False),
}


@pytest.mark.parametrize("name", NLG_FUNCTIONS)
def test_nlg_masked_positions_are_removed(gen, name):
    fn = NLG_FUNCTIONS[name]
    batch, length, vocab = 3, 10, 12
    labels = make_labels(batch, length, vocab, gen)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    for b, t in ref_valid_positions(labels):
        valid[b, t] = True
    assert 5 <= valid.sum() < valid.numel()  # q = 5 rows at least, so that exact=False really sketches
    logits, teacher = 2 * torch.randn(batch, length, vocab, generator=gen), torch.randn(batch, length, vocab)
    other_logits, other_teacher = logits.clone(), teacher.clone()
    other_logits[~valid] = 50 * torch.randn(int((~valid).sum()), vocab, generator=gen)
    other_teacher[~valid] = 50 * torch.randn(int((~valid).sum()), vocab, generator=gen)

    torch.manual_seed(0)  # the randomized SVD draws from the global RNG
    value, grad = value_and_grad(lambda z: fn(z, teacher, labels), logits)
    torch.manual_seed(0)
    other_value, other_grad = value_and_grad(lambda z: fn(z, other_teacher, labels), other_logits)
    torch.testing.assert_close(other_value, value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(other_grad[valid], grad[valid], rtol=1e-5, atol=1e-7)
    assert torch.all(grad[~valid] == 0) and torch.all(other_grad[~valid] == 0)
    assert grad[valid].abs().max() > 0


@pytest.mark.parametrize("top_k", [2, 5, 20])
def test_nlg_diversity_sign_and_range(gen, top_k):
    vocab = 12
    labels = torch.zeros(2, 6, dtype=torch.long)
    log_k = math.log(min(top_k, vocab))
    for scale in (0.01, 1.0, 5.0, 1e3):
        value = nlg_diversity(scale * torch.randn(2, 6, vocab, generator=gen), labels, top_k=top_k).item()
        assert -log_k - 1e-6 <= value <= 0.0
    # Equal candidates: uniform, the minimum −log K (K capped at V); one dominant candidate: entropy ≈ 0.
    assert nlg_diversity(torch.zeros(2, 6, vocab), labels, top_k=top_k).item() == pytest.approx(-log_k, rel=1e-6)
    peaked = torch.zeros(2, 6, vocab)
    peaked[..., 3] = 40.0
    assert 0.0 <= -nlg_diversity(peaked, labels, top_k=top_k).item() < 1e-12
    # The minimiser raises the entropy: a gradient step from random logits lowers the loss.
    z = torch.randn(2, 6, vocab, generator=gen)
    value, grad = value_and_grad(lambda x: nlg_diversity(x, labels, top_k=top_k), z)
    assert nlg_diversity(z - 0.1 * grad, labels, top_k=top_k).item() < value.item()


def test_nlg_svd_range(gen):
    labels = torch.zeros(2, 8, dtype=torch.long)
    for top_k in (1, 3):
        value = nlg_svd(torch.randn(2, 8, 10, generator=gen), labels, top_k=top_k, exact=True).item()
        assert -math.sqrt(top_k) <= value < 0.0
    rank_one = (torch.randn(16, 1, generator=gen) @ torch.randn(1, 10, generator=gen)).reshape(2, 8, 10)
    assert nlg_svd(rank_one, labels, top_k=3, exact=True).item() == pytest.approx(-1.0, abs=1e-5)
    # k equal singular values: Cauchy-Schwarz bound −√k is reached.
    equal = torch.zeros(2, 8, 10)
    equal[0, 0, 0] = equal[0, 1, 1] = equal[0, 2, 2] = 3.0
    assert nlg_svd(equal, labels, top_k=3, exact=True).item() == pytest.approx(-math.sqrt(3), rel=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Degenerate batches, empty masks, shape errors
# --------------------------------------------------------------------------------------------------------------------


def _degenerate(case: str, rows: int, cols: int, gen: torch.Generator) -> Tensor:
    if case == "one_row":
        return torch.randn(1, cols, generator=gen)
    if case == "identical_rows":
        return torch.randn(1, cols, generator=gen).expand(rows, cols).clone()
    if case == "all_zero":
        return torch.zeros(rows, cols)
    if case == "rank_deficient":
        return torch.randn(rows, 2, generator=gen) @ torch.randn(2, cols, generator=gen)
    if case == "huge":
        return 1e4 * torch.randn(rows, cols, generator=gen)
    if case == "bf16":
        return torch.randn(rows, cols, generator=gen).bfloat16()
    raise AssertionError(case)


DEGENERATE = ["one_row", "identical_rows", "all_zero", "rank_deficient", "huge", "bf16"]
NLU_FUNCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "consistency": lambda z, teacher: nlu_consistency(z, teacher, temperature=2.0),
    "consistency_regression": lambda z, teacher: nlu_consistency(z[:, :1], teacher[:, :1]),
    "diversity": lambda z, teacher: nlu_diversity(z),
    "svd": lambda z, teacher: nlu_svd(z, top_k=2),
}


@pytest.mark.filterwarnings("ignore:nlu_svd")
@pytest.mark.parametrize("case", DEGENERATE)
@pytest.mark.parametrize("name", NLU_FUNCTIONS)
def test_nlu_finite_on_degenerate_batches(gen, name, case):
    z = _degenerate(case, 9, 6, gen)
    teacher = z.roll(1, dims=-1)
    value, grad = value_and_grad(lambda x: NLU_FUNCTIONS[name](x, teacher), z)
    assert value.dtype == torch.float32 and value.dim() == 0
    assert torch.isfinite(value) and torch.isfinite(grad).all()


@pytest.mark.parametrize("case", DEGENERATE)
@pytest.mark.parametrize("name", NLG_FUNCTIONS)
def test_nlg_finite_on_degenerate_batches(gen, name, case):
    batch, length, vocab = 2, 12, 16  # M = 22 valid rows: nlg_svd(exact=False) really sketches
    z = _degenerate(case, batch * length, vocab, gen)
    labels = torch.zeros(batch, length, dtype=torch.long)
    if case == "one_row":  # a single sequence whose only valid position is t = 0
        z = torch.cat([z, torch.randn(length - 1, vocab, generator=gen)])
        labels = torch.full((1, length), IGNORE)
        labels[0, 1] = 5
    z = z.reshape(-1, length, vocab)
    teacher = z.roll(1, dims=-1)
    torch.manual_seed(0)
    value, grad = value_and_grad(lambda x: NLG_FUNCTIONS[name](x, teacher, labels), z)
    assert value.dtype == torch.float32 and value.dim() == 0
    assert torch.isfinite(value) and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NLG_FUNCTIONS)
def test_nlg_empty_mask_gives_exact_zero(gen, name, dtype):
    logits = torch.randn(2, 5, 7, generator=gen).to(dtype)
    for labels in (torch.full((2, 5), IGNORE), torch.tensor([[3] + [IGNORE] * 4] * 2)):  # only label 0: no target
        value, grad = value_and_grad(lambda z, y=labels: NLG_FUNCTIONS[name](z, logits.roll(1, -1), y), logits)
        assert value.dtype == torch.float32 and value.item() == 0.0
        assert grad is not None and torch.all(grad == 0)


@pytest.mark.parametrize("name", ["consistency", "diversity", "svd"])
def test_nlu_empty_batch_gives_exact_zero(name):
    value, grad = value_and_grad(lambda z: NLU_FUNCTIONS[name](z, torch.zeros(0, 4)), torch.zeros(0, 4))
    assert value.dtype == torch.float32 and value.item() == 0.0 and grad.shape == (0, 4)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        pytest.param(
            lambda: nlu_consistency(torch.zeros(4, 3), torch.zeros(4, 2)), r"\(4, 3\) and \(4, 2\)", id="nlu-mismatch"
        ),
        pytest.param(lambda: nlu_consistency(torch.zeros(4), torch.zeros(4)), r"\(N, D\).*\(4,\)", id="nlu-1d"),
        pytest.param(lambda: nlu_diversity(torch.zeros(2, 3, 4)), r"\(N, D\).*\(2, 3, 4\)", id="diversity-3d"),
        pytest.param(lambda: nlu_svd(torch.zeros(5)), r"\(N, D\).*\(5,\)", id="svd-1d"),
        pytest.param(lambda: nlu_svd(torch.zeros(5, 4), top_k=0), r"top_k must be >= 1; got 0", id="svd-top_k"),
        pytest.param(
            lambda: nlg_consistency(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.zeros(2, 3)),
            r"\(2, 3, 4\) and \(2, 3, 5\)",
            id="nlg-teacher-mismatch",
        ),
        pytest.param(
            lambda: nlg_consistency(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), torch.zeros(2, 4)),
            r"\(B, T\).*\(2, 4\)",
            id="nlg-labels-mismatch",
        ),
        pytest.param(
            lambda: nlg_diversity(torch.zeros(2, 3, 4), torch.zeros(3, 2)), r"\(B, T\).*\(3, 2\)", id="entropy-labels"
        ),
        pytest.param(
            lambda: nlg_diversity(torch.zeros(2, 3, 4), torch.zeros(2, 3), top_k=0),
            r"top_k must be >= 1; got 0",
            id="entropy-top_k",
        ),
        pytest.param(lambda: nlg_svd(torch.zeros(6, 4), torch.zeros(6, 4)), r"\(B, T, V\).*\(6, 4\)", id="nlg-svd-2d"),
        pytest.param(
            lambda: nlg_svd(torch.zeros(2, 3, 4), torch.zeros(2, 3), oversample=-1),
            r"oversample >= 0.*-1",
            id="nlg-svd-oversample",
        ),
        pytest.param(lambda: nlg_valid_mask(torch.zeros(6)), r"\(B, T\).*\(6,\)", id="mask-1d"),
    ],
)
def test_shape_and_argument_errors_are_explained(call, match):
    with pytest.raises(ValueError, match=match):
        call()
