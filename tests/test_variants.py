"""PEFT's other adapters under balora: DoRA, rsLoRA, OLoRA, CorDA. Each one really is on, the teacher stays the exact
pre-trained model after the trainable weights move, and the exported plain-PEFT adapter reproduces the trained model
on the original weights."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from balora import BALoRAConfig, get_balora_model, pretrained_teacher
from balora.adapter import save_adapter
from balora.compare import METHODS
from balora.experiment import load_experiment
from balora.methods import PRESETS, overrides

from cli_fixtures import REPO_ROOT
from conftest import tiny_bert, tiny_gpt2, tiny_llama, train_a_few_steps

ATOL = 1e-4
VARIANT_PRESETS = ["dora", "balora+dora", "rslora", "balora+rslora", "olora", "balora+olora", "corda", "balora+corda"]


def _config(preset: str) -> BALoRAConfig:
    return BALoRAConfig(r=4, alpha=8.0, **PRESETS[preset])


def _inputs(vocab=101):
    ids = torch.randint(3, vocab, (3, 9))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _calibration(model):
    generator = torch.Generator().manual_seed(1)
    for _ in range(8):  # one row per pass, as PEFT's CorDA hook wants
        ids = torch.randint(3, 101, (1, 9), generator=generator)
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def _check_variant_is_on(peft_model, config):
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    layer = layers[0]
    if config.use_dora:
        assert layer.use_dora["default"] and layer.use_dora["teacher"]
        magnitude = layer.lora_magnitude_vector["default"].weight
        assert magnitude.requires_grad
        assert not layer.lora_magnitude_vector["teacher"].weight.requires_grad
    else:
        assert not layer.use_dora["default"]
    want = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    assert layer.scaling["default"] == pytest.approx(want) == pytest.approx(layer.scaling["teacher"])
    b = layer.lora_B["default"].weight
    if config.init == "corda":  # W_res = W − s·B0·A0 with B0, A0 from the covariance-weighted SVD: B0 ≠ 0
        assert b.abs().max() > 1e-3
    elif config.init == "lora":
        assert torch.equal(b, torch.zeros_like(b))
    elif config.init == "olora":  # B0 = the first r columns of Q in W = QR: orthonormal columns
        torch.testing.assert_close(b.T @ b, torch.eye(b.shape[1]), atol=1e-5, rtol=0)
    else:  # PiSSA: B0 = U_r sqrt(S_r / s): orthogonal, not orthonormal, columns
        gram = b.T @ b
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-5, rtol=0)


CASES = [(preset, tiny_llama) for preset in VARIANT_PRESETS] + [
    ("balora+dora", tiny_bert), ("olora", tiny_bert), ("corda", tiny_gpt2)]


@pytest.mark.parametrize(("preset", "factory"), CASES, ids=[f"{p}-{f.__name__}" for p, f in CASES])
def test_teacher_exact_and_export_reproduces_the_trained_model(preset, factory, tmp_path):
    torch.manual_seed(0)
    model = factory().eval()
    original = copy.deepcopy(model)
    inputs = _inputs()
    with torch.no_grad():
        expected = original(**inputs).logits
    config = _config(preset)
    peft_model = get_balora_model(model, config, calibration=_calibration if config.init == "corda" else None)
    _check_variant_is_on(peft_model, peft_model.balora_config)
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, expected, atol=ATOL, rtol=0)  # unchanged at init

    trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    train_a_few_steps(peft_model, inputs)
    peft_model.eval()
    moved = [n for n, p in peft_model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    if config.use_dora:
        assert any("lora_magnitude_vector" in n for n in moved), "DoRA's magnitude must train"
    with torch.no_grad():
        trained = peft_model(**inputs).logits
    assert (trained - expected).abs().max() > 1e-2, "training should have moved the student"
    with pretrained_teacher(peft_model):
        torch.testing.assert_close(peft_model(**inputs).logits, expected, atol=ATOL, rtol=0)

    out = save_adapter(peft_model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(copy.deepcopy(original), str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, trained, atol=ATOL, rtol=0)
    saved = loaded.peft_config["default"]
    assert saved.use_dora == config.use_dora and saved.use_rslora == config.use_rslora


def test_presets_reach_compare_and_the_config():
    assert all(name in METHODS for name in VARIANT_PRESETS)
    assert overrides("balora+dora") == ["--balora.method", "balora", "--balora.use_dora", "true"]
    assert PRESETS["dora"]["method"] == "lora" and PRESETS["dora"]["svd_weight"] == 0.0
    resolved = BALoRAConfig(**PRESETS["balora+olora"]).resolve("nlg")
    assert resolved.init == "olora" and resolved.consistency_weight > 0
    assert BALoRAConfig(**PRESETS["dora"]).resolve("nlu").init == "lora"
    with pytest.raises(ValueError, match="unknown method preset"):
        overrides("qlora")
    for name in ("balora+dora", "rslora", "olora"):  # the overrides parse as an experiment, as `compare` runs them
        experiment, _ = load_experiment(REPO_ROOT / "configs/compare/sst2-minilm.yaml", METHODS[name])
        for key, value in PRESETS[name].items():
            assert getattr(experiment.balora, key) == value, (name, key)


def test_olora_refuses_conv1d():
    with pytest.raises(ValueError, match="Conv1D"):
        get_balora_model(tiny_gpt2(), BALoRAConfig(r=2, init="olora"))


def test_corda_calibrates_on_the_data_it_is_given():
    """The CorDA adapter depends on its calibration inputs, cannot be built without them, and kpm differs."""

    def build(calibration, method="ipm"):
        torch.manual_seed(0)
        model = tiny_llama().eval()
        config = BALoRAConfig(r=4, alpha=8.0, init="corda", corda_method=method)
        peft_model = get_balora_model(model, config, calibration=calibration)
        return next(m for m in peft_model.modules() if isinstance(m, LoraLayer)).lora_A["default"].weight.detach()

    def other(model):
        for token in range(3, 11):
            ids = torch.full((1, 9), token)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))

    a = build(_calibration)
    torch.testing.assert_close(build(_calibration), a)  # deterministic
    assert (build(other) - a).abs().max() > 1e-3
    assert (build(_calibration, "kpm") - a).abs().max() > 1e-3
    with pytest.raises(ValueError, match="'bert.pooler.dense' received an input of shape"):
        get_balora_model(tiny_bert(), BALoRAConfig(r=2, init="corda"), calibration=_calibration)
    torch.manual_seed(0)
    bert = tiny_bert().eval()
    inputs = _inputs()
    with torch.no_grad():
        expected = bert(**inputs).logits
    peft_model = get_balora_model(bert, BALoRAConfig(r=2, init="corda", target_modules=["query", "value"],
                                                     modules_to_save=None), calibration=_calibration)
    train_a_few_steps(peft_model, inputs)
    peft_model.eval()
    with torch.no_grad(), pretrained_teacher(peft_model):
        torch.testing.assert_close(peft_model(**inputs).logits, expected, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="calibrates on training rows"):
        get_balora_model(tiny_llama(), BALoRAConfig(r=2, init="corda"))
    with pytest.raises(ValueError, match="corda_method must be one of"):
        BALoRAConfig(init="corda", corda_method="xyz")


def test_balora_train_calibrates_corda_on_its_training_rows(tmp_path):
    """`balora train` with init corda: the calibration pass runs the first corda_samples training rows; the run
    trains and saves a plain-PEFT adapter on the original weights."""
    import sys

    from balora.prepare import prepare
    from balora.train import calibration_pass, train_experiment

    sys.path.insert(0, str(REPO_ROOT / "tests" / "eval"))
    from tiny_lm import tiny_instruct_setup

    config = tiny_instruct_setup(tmp_path)
    experiment, _ = load_experiment(config, ["--balora.init", "corda", "--balora.corda_samples", "3",
                                             "--training.learning_rate", "0.01"])
    prepared = prepare(experiment)
    seen = []
    handle = prepared.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"]),
                                                      with_kwargs=True)
    calibration_pass(prepared, 3)(prepared.model)
    handle.remove()
    assert [ids.tolist()[0] for ids in seen] == [row for row in prepared.train["input_ids"][:3]]
    result = train_experiment(experiment)
    saved = (tmp_path / "run" / "adapter" / "adapter_config.json").read_text()
    assert '"r": 4' in saved and result.metrics["train_seconds"] > 0  # rank 2r = 4: the export on the original W
