"""The teacher adapter computes the exact pre-trained model, before and after training, without a second model."""

from __future__ import annotations

import copy

import pytest
import torch

from balora import BALoRAConfig, get_balora_model, pretrained_teacher

from conftest import tiny_bert, tiny_llama, train_a_few_steps


def _teacher_params(model):
    return {n: p for n, p in model.named_parameters() if ".teacher." in n}


@pytest.mark.parametrize("factory", [tiny_llama, tiny_bert])
def test_teacher_equals_untouched_original_before_and_after_training(factory):
    model = factory().eval()
    original = copy.deepcopy(model)
    ids = torch.randint(3, 101, (3, 10))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        expected = original(**inputs).logits
    peft_model = get_balora_model(model, BALoRAConfig(r=4, dropout=0.3))
    snapshot = {n: p.detach().clone() for n, p in _teacher_params(peft_model).items()}
    assert snapshot

    with pretrained_teacher(peft_model):
        before = peft_model(**inputs).logits
    torch.testing.assert_close(before, expected, atol=1e-4, rtol=0)

    train_a_few_steps(peft_model, inputs)
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(**inputs).logits
    assert (trained - expected).abs().max() > 1e-3, "training should have moved the student"
    peft_model.train()  # the teacher must switch dropout off by itself
    with pretrained_teacher(peft_model):
        after = peft_model(**inputs).logits
    torch.testing.assert_close(after, expected, atol=1e-4, rtol=0)

    for name, param in _teacher_params(peft_model).items():
        assert torch.equal(param, snapshot[name]), f"teacher tensor {name} changed"
        assert param.grad is None and not param.requires_grad, name

    # The trap the teacher adapter avoids: with adapters disabled, PiSSA's base computes W_res, not W.
    with peft_model.disable_adapter(), torch.no_grad():
        peft_model.eval()
        residual_only = peft_model(**inputs).logits
    assert (residual_only - expected).abs().max() > 1e-3


def test_context_restores_adapter_grad_flags_and_mode():
    peft_model = get_balora_model(tiny_llama(), BALoRAConfig(r=2))
    peft_model.train()
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    with pretrained_teacher(peft_model) as inside:
        assert inside is peft_model
        assert not torch.is_grad_enabled()
        assert not peft_model.training
        assert peft_model.active_adapter == "teacher"
    assert torch.is_grad_enabled() and peft_model.training
    assert peft_model.active_adapter == "default"
    assert flags == {n: p.requires_grad for n, p in peft_model.named_parameters()}


def test_context_restores_state_when_the_forward_raises():
    peft_model = get_balora_model(tiny_llama(), BALoRAConfig(r=2))
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"), pretrained_teacher(peft_model):
        raise RuntimeError("boom")
    assert peft_model.active_adapter == "default"
    assert flags == {n: p.requires_grad for n, p in peft_model.named_parameters()}


def test_memory_is_base_plus_two_adapters_and_two_heads_not_two_models():
    model = tiny_bert(num_labels=3)
    base_count = sum(p.numel() for p in model.parameters())
    head_count = sum(p.numel() for p in model.classifier.parameters())
    peft_model = get_balora_model(model, BALoRAConfig(r=2))
    params = dict(peft_model.named_parameters())
    adapter = sum(p.numel() for n, p in params.items() if ".default." in n and "lora_" in n)
    teacher = sum(p.numel() for n, p in params.items() if ".teacher." in n and "lora_" in n)
    assert adapter == teacher > 0
    total = sum(p.numel() for p in peft_model.parameters())
    assert total == base_count + 2 * adapter + 2 * head_count
    assert total < 2 * base_count


def test_plain_peft_model_is_refused():
    from peft import LoraConfig, get_peft_model

    plain = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no 'teacher' adapter"), pretrained_teacher(plain):
        pass
