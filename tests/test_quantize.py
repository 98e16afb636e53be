"""QPiSSA on the CPU (bitsandbytes NF4): the teacher is the pre-trained model up to the residual's quantization error,
which is smaller than QLoRA's (W quantized), and a BA-LoRA step trains on the 4-bit base."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import TrainingArguments

from balora import BALoRAConfig, BALoRATrainer, get_balora_model, pretrained_teacher

bnb = pytest.importorskip("bitsandbytes")
from balora.quantize import dequantized_weight, quantize_residual  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _pretrained_like_llama():
    """A tiny Llama whose projections have a decaying spectrum, as trained weights do (random ones are flat)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # Widths of at least 64: bitsandbytes' CPU path packs NF4 blocks of 64 along the input dimension.
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
                out_f, in_f = module.weight.shape
                u, _ = torch.linalg.qr(torch.randn(out_f, out_f))
                v, _ = torch.linalg.qr(torch.randn(in_f, in_f))
                k = min(out_f, in_f)
                s = 0.6 * 0.7 ** torch.arange(k, dtype=torch.float32)
                module.weight.copy_((u[:, :k] * s) @ v[:, :k].T)
    return model


def _batch():
    ids = torch.randint(3, 101, (4, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _ce(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def test_qpissa_teacher_is_pretrained_up_to_the_residual_quantization_error():
    original = _pretrained_like_llama()
    batch = _batch()
    with torch.no_grad():
        expected = original(**batch).logits

    qpissa = get_balora_model(copy.deepcopy(original), BALoRAConfig(r=4, target_modules=TARGETS))
    residuals = {n: m.get_base_layer().weight.detach().clone() for n, m in qpissa.named_modules()
                 if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert quantize_residual(qpissa) == len(residuals) == 14
    # Reference: every target weight replaced by dequant(NF4(W_res)) + s·B0·A0, in a plain float model.
    reference = copy.deepcopy(original)
    modules = dict(reference.named_modules())
    for name, layer in qpissa.named_modules():
        if name in residuals:
            assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
            w = dequantized_weight(layer.get_base_layer()).float()
            delta = layer.scaling["teacher"] * layer.lora_B["teacher"].weight @ layer.lora_A["teacher"].weight
            with torch.no_grad():
                modules[name.removeprefix("base_model.model.")].weight.copy_(w + delta)
    with torch.no_grad():
        want = reference(**batch).logits
    with pretrained_teacher(qpissa):
        teacher = qpissa(**batch).logits
    # bitsandbytes' CPU kernel computes the 4-bit product its own way: agreement to 1e-3, far below the error itself.
    torch.testing.assert_close(teacher, want, atol=1e-3, rtol=0)

    # QLoRA for comparison: W itself quantized, B = 0.
    qlora = get_balora_model(copy.deepcopy(original), BALoRAConfig(method="lora", r=4, target_modules=TARGETS))
    quantize_residual(qlora)
    with pretrained_teacher(qlora):
        qlora_logits = qlora(**batch).logits
    err_qpissa = (teacher - expected).abs().max().item()
    err_qlora = (qlora_logits - expected).abs().max().item()
    assert 1e-2 < err_qpissa < 0.5 * err_qlora, (err_qpissa, err_qlora)
    loss = _ce(expected, batch["input_ids"]).item()
    step0 = {"float": loss, "qpissa": _ce(teacher, batch["input_ids"]).item(),
             "qlora": _ce(qlora_logits, batch["input_ids"]).item()}
    assert abs(step0["qpissa"] - loss) < abs(step0["qlora"] - loss), step0


def test_a_balora_step_trains_the_adapter_on_the_4bit_base(tmp_path):
    model = get_balora_model(_pretrained_like_llama(), BALoRAConfig(r=4, target_modules=TARGETS,
                                                                     regularizer_schedule="constant"))
    quantize_residual(model)
    with pretrained_teacher(model):
        teacher_before = model(**_batch()).logits
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and ".teacher." in n}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = _batch()["input_ids"]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 12] * 4, "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
    trainer = BALoRATrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert all(torch.isfinite(torch.tensor(logged[k])) for k in ("loss", "task_loss", "svd_loss", "diversity_loss"))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"teacher tensor {n} moved"
    # The 4-bit base is repacked by bitsandbytes' CPU path, so compare what it computes: the teacher is unchanged.
    with pretrained_teacher(model):
        torch.testing.assert_close(model(**_batch()).logits, teacher_before, atol=1e-6, rtol=0)
    assert all(not torch.equal(p, trained[n]) for n, p in model.named_parameters() if n in trained and "lora_B" in n)


def test_quantizing_twice_is_refused():
    model = get_balora_model(_pretrained_like_llama(), BALoRAConfig(r=2, target_modules=["q_proj"]))
    assert quantize_residual(model) == 2
    with pytest.raises(ValueError, match="already quantized"):
        quantize_residual(model)
