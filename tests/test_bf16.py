"""bfloat16, the path every GPU user runs: PiSSA init, the teacher, the hidden-space SVD term and training steps.

Tolerances are per dtype: bf16 keeps 8 significant bits (unit round-off u = 2⁻⁸), so an init rounded to bf16 is
exact up to a few u relative to the weights, and values computed from bf16 inputs in float32 match a float64 reference
on the same (rounded) inputs up to float32 round-off.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from peft.tuners.lora import LoraLayer
from transformers import TrainingArguments

from balora import BALoRAConfig, BALoRATrainer, get_balora_model, pretrained_teacher
from balora.losses import IGNORE_INDEX
from balora.spectral import hidden_svd_loss

from conftest import tiny_llama

U = 2.0**-8  # bf16 unit round-off


def _inputs(n=3, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (n, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("niter", [None, 4])
def test_pissa_init_in_bf16_is_exact_up_to_rounding(niter):
    model = tiny_llama().to(torch.bfloat16)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_balora_model(model, BALoRAConfig(r=4, init_niter=niter))
    layers = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    assert layers
    for name, layer in layers:
        base = layer.get_base_layer().weight
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        # PEFT keeps adapter weights in float32 on a bf16 base (autocast_adapter_dtype): only W_res is rounded.
        assert base.dtype == torch.bfloat16 and a.dtype == b.dtype == torch.float32
        w = original[name.removeprefix("base_model.model.") + ".weight"].float()
        principal = layer.scaling["default"] * (b.float() @ a.float())
        rebuilt = base.float() + principal
        # W_res is rounded once to bf16 from its float32 value: at most u·|W_res|, plus float32 round-off.
        bound = U * base.float().abs() + 1e-6 * (principal.abs() + w.abs())
        assert ((rebuilt - w).abs() <= bound + 1e-7).all(), name
        assert principal.abs().max() > 10 * U * w.abs().max(), "the adapter must hold a real part of W"


def test_teacher_in_bf16_matches_the_original_and_stays_exact_through_training():
    model = tiny_llama().to(torch.bfloat16).eval()
    original = copy.deepcopy(model)
    inputs = _inputs()
    with torch.no_grad():
        expected = original(**inputs).logits.float()
    peft_model = get_balora_model(model, BALoRAConfig(r=4))
    with pretrained_teacher(peft_model):
        before = peft_model(**inputs).logits
    assert before.dtype == torch.bfloat16
    # W_res + B0·A0 differs from W only by bf16 rounding: the logits agree to bf16 accuracy.
    torch.testing.assert_close(before.float(), expected, atol=4 * U * expected.abs().max().item(), rtol=0)

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    peft_model.train()
    for _ in range(3):
        peft_model(**inputs).logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        moved = peft_model(**inputs).logits.float()
    assert (moved - expected).abs().max() > 0.05, "training should have moved the student"
    with pretrained_teacher(peft_model):
        after = peft_model(**inputs).logits
    assert torch.equal(after, before), "the teacher must be bitwise unchanged by training"


@pytest.mark.parametrize("shape", [(2, 9, 16, 60, 4), (1, 30, 24, 50, 10)])
def test_hidden_svd_loss_in_bf16_against_float64_on_the_same_values(shape):
    b, t, d, v, k = shape
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(b, t, d, generator=g).bfloat16()
    head = (torch.randn(v, d, generator=g) / d**0.5).bfloat16()
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = IGNORE_INDEX
    h = hidden.clone().requires_grad_()
    value = hidden_svd_loss(h, labels, head, top_k=k)
    value.backward()
    assert value.dtype == torch.float32 and h.grad.dtype == torch.bfloat16

    h64 = hidden.double().requires_grad_()
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    z = (h64 @ head.double().T)[mask]
    s = torch.linalg.svdvals(z)
    want = -(s[:k].sum() / z.norm())  # the SVD term: − Σ_{i≤k} σ_i / ‖Z‖_F (losses.nlg_svd)
    want.backward()
    torch.testing.assert_close(value.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=2e-2, atol=4 * U * h64.grad.abs().max().item())


def _nlg_rows(n=8, t=12):
    ids = _inputs(n, t)["input_ids"]
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * t] * n, "labels": labels.tolist()})


CONFIG = dict(r=4, consistency_weight=0.5, diversity_weight=0.1, svd_weight=0.1, consistency_schedule="constant",
              regularizer_schedule="constant")


def _train(run, folder):
    """Two BALoRATrainer steps; checks the teacher stays and the adapter moves; returns the logged steps."""
    torch.manual_seed(0)
    model = tiny_llama()
    if run == "bf16 weights":
        model = model.to(torch.bfloat16)
    peft_model = get_balora_model(model, BALoRAConfig(**CONFIG))
    teacher = {n: p.detach().clone() for n, p in peft_model.named_parameters() if ".teacher." in n}
    trained = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(folder), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             seed=0, bf16=run == "bf16 autocast")
    trainer = BALoRATrainer(model=peft_model, args=args, train_dataset=_nlg_rows())
    trainer.train()
    for n, p in peft_model.named_parameters():
        if n in teacher:
            assert torch.equal(p, teacher[n]), f"teacher tensor {n} moved"
    assert any(not torch.equal(p, trained[n]) for n, p in peft_model.named_parameters() if n in trained)
    logs = [e for e in trainer.state.log_history if "task_loss" in e]
    assert len(logs) == 2
    return logs


@pytest.fixture(scope="module")
def float32_logs(tmp_path_factory):
    return _train("float32", tmp_path_factory.mktemp("float32"))


@pytest.mark.parametrize("mode", ["bf16 weights", "bf16 autocast"])
def test_training_steps_in_bf16_track_float32(mode, float32_logs, tmp_path):
    logs = _train(mode, tmp_path)
    for step_float, step_bf16 in zip(float32_logs, logs, strict=True):
        for key in ("loss", "task_loss", "diversity_loss", "svd_loss"):
            assert step_bf16[key] == pytest.approx(step_float[key], rel=2e-2, abs=2e-2), (key, step_bf16, step_float)
    # Step 1 runs on the initial (pre-trained) weights: the consistency KL is 0 up to rounding.
    assert abs(logs[0]["consistency_loss"]) < 1e-3
