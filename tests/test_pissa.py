"""PiSSA factorisation and `get_balora_model`: the model is unchanged at init; impossible requests fail early."""

from __future__ import annotations

import copy

import pytest
import torch
from peft.tuners.lora import LoraLayer

from balora import BALoRAConfig, get_balora_model
from balora.pissa import pissa_factors

from conftest import MODEL_FACTORIES, tiny_bert, tiny_llama


def _inputs(model, batch=2, length=9):
    ids = torch.randint(3, model.config.vocab_size, (batch, length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _reference_top_r(weight: torch.Tensor, r: int) -> torch.Tensor:
    """The best rank-r approximation of `weight`, from a float64 SVD written out here."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (16, 16)])
@pytest.mark.parametrize("scaling", [1.0, 2.0, 0.25])
def test_exact_factors_reconstruct_and_hold_the_principal_part(shape, scaling):
    weight = torch.randn(*shape)
    r = 3
    f = pissa_factors(weight, r, scaling)
    assert f.lora_a.shape == (r, shape[1]) and f.lora_b.shape == (shape[0], r)
    rebuilt = f.residual + scaling * f.lora_b @ f.lora_a
    assert (rebuilt - weight).abs().max() <= 1e-5 * weight.abs().max()
    principal = (scaling * f.lora_b @ f.lora_a).double()
    torch.testing.assert_close(principal, _reference_top_r(weight, r), atol=1e-5, rtol=1e-5)
    # A and B share the singular values evenly: ‖B[:, i]‖ = ‖A[i]‖ = sqrt(σ_i / scaling)
    torch.testing.assert_close(f.lora_a.norm(dim=1), f.lora_b.norm(dim=0), atol=1e-5, rtol=1e-5)


def test_randomized_factors_are_seeded_and_close_on_a_decaying_spectrum():
    u, _ = torch.linalg.qr(torch.randn(64, 64))
    v, _ = torch.linalg.qr(torch.randn(48, 48))
    s = 0.5 ** torch.arange(48, dtype=torch.float32)
    weight = (u[:, :48] * s) @ v.T
    state = torch.random.get_rng_state()
    a = pissa_factors(weight, 4, 1.0, niter=4, seed=7)
    b = pissa_factors(weight, 4, 1.0, niter=4, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state), "the seeded init must not consume the global RNG"
    assert torch.equal(a.lora_a, b.lora_a) and torch.equal(a.lora_b, b.lora_b)
    torch.testing.assert_close((a.lora_b @ a.lora_a).double(), _reference_top_r(weight, 4), atol=1e-4, rtol=1e-4)
    assert ((a.residual + a.lora_b @ a.lora_a) - weight).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "bert", "deberta-v2", "gpt2", "roberta"])
@pytest.mark.parametrize("niter", [None, 3])
def test_model_outputs_unchanged_after_pissa_init(arch, niter):
    model = MODEL_FACTORIES[arch]().eval()
    original = copy.deepcopy(model)
    weights = {n: m.weight.detach().clone() for n, m in original.named_modules() if hasattr(m, "weight")}
    inputs = _inputs(model)
    with torch.no_grad():
        expected = original(**inputs).logits
    peft_model = get_balora_model(model, BALoRAConfig(r=4, alpha=8, init_niter=niter)).eval()
    with torch.no_grad():
        got = peft_model(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    layers = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    assert layers
    for name, layer in layers:
        base = layer.get_base_layer()
        residual = base.weight.T if layer.fan_in_fan_out else base.weight
        delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        key = name.removeprefix("base_model.model.")
        w = weights[key].T if layer.fan_in_fan_out else weights[key]
        assert ((residual + delta) - w).abs().max() <= 1e-5 * w.abs().max(), name
        assert not torch.equal(residual, w), f"{name}: base weight should hold W_res, not W"


def test_lora_init_leaves_base_weights_and_starts_from_zero_b():
    model = tiny_llama()
    original = copy.deepcopy(model)
    peft_model = get_balora_model(model, BALoRAConfig(method="lora", r=4))
    for layer in (m for m in peft_model.modules() if isinstance(m, LoraLayer)):
        assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    wrapped = {
        n.replace(".base_layer", ""): p for n, p in peft_model.base_model.model.named_parameters() if "lora_" not in n
    }
    for name, param in original.named_parameters():
        assert torch.equal(param, wrapped[name]), name
    assert peft_model.balora_config.init == "lora" and peft_model.balora_config.consistency_weight == 0.0


def test_only_the_default_adapter_and_head_train():
    peft_model = get_balora_model(tiny_bert(num_labels=3), BALoRAConfig(r=2))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    assert any("classifier" in n for n in trainable), "the new classification head must train"
    assert not any(".teacher." in n for n in trainable)


def _untouched(model, snapshot):
    return all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (BALoRAConfig(r=33), r"rank r=33 is larger than min\(out, in\)=32"),
        (BALoRAConfig(r=2, target_modules=["nonexistent_proj"]), "matches no module"),
        (BALoRAConfig(r=2, target_modules=["layers"]), "balora adapts torch.nn.Linear"),
    ],
)
def test_impossible_requests_fail_before_any_weight_is_touched(config, message):
    model = tiny_llama()
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        get_balora_model(model, config)
    assert _untouched(model, snapshot)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_non_float_weight_is_refused():
    model = tiny_llama()
    layer = model.model.layers[0].self_attn.q_proj
    layer.weight = torch.nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="float, unquantized weight"):
        get_balora_model(model, BALoRAConfig(r=2, target_modules=["q_proj"]))


def test_unknown_model_kind_is_refused():
    from transformers import BertConfig, BertModel

    with pytest.raises(ValueError, match="cannot tell the task"):
        get_balora_model(
            BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32)),
            BALoRAConfig(r=2),
        )
