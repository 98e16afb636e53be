"""svd_input="features": the NLU SVD term on the classifier's input (pooled features) instead of the logits."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from balora import BALoRAConfig, BALoRATrainer, get_balora_model
from balora.nlu import capture_classifier_input, classifier_layers

from conftest import tiny_bert, tiny_deberta, tiny_llama, tiny_roberta


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _batch(rows=8, length=7, num_labels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, 101, (rows, length), generator=g),
        "attention_mask": torch.ones(rows, length, dtype=torch.long),
        "labels": torch.arange(rows) % num_labels,
    }


def _trainer(model, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    return BALoRATrainer(model=model, args=args)


def _config(**overrides):
    values = dict(method="balora", r=2, consistency_weight=0.0, diversity_weight=0.0, svd_weight=0.5, svd_top_k=3,
                  svd_input="features")
    values.update(overrides)
    return BALoRAConfig(**values)


def test_feature_svd_term_equals_a_float64_reference_on_bert_pooled_output(tmp_path):
    model = get_balora_model(_no_dropout(tiny_bert(num_labels=2)), _config())
    trainer = _trainer(model, tmp_path)
    batch = _batch()
    model.train()
    loss = trainer.compute_loss(model, batch)
    svd_logged = trainer._term_logs["train"]["svd_loss"][-1]
    task_logged = trainer._term_logs["train"]["task_loss"][-1]

    # Independent path: BERT's pooled output (tanh(dense(h_CLS))) is what its classifier reads.
    bert = model.base_model.model.bert
    with torch.no_grad():
        pooled = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output.double()
    sigma = torch.linalg.svdvals(pooled)
    expected = -(sigma[:3].sum() / sigma.sum())
    assert abs(svd_logged.item() - expected.item()) < 1e-5
    assert abs(loss.item() - (task_logged.item() + 0.5 * expected.item())) < 1e-5
    assert -1.0 < expected.item() < -3 / 8  # k = 3 of 8 directions: a real, non-constant ratio


@pytest.mark.parametrize("factory", [tiny_bert, tiny_roberta, tiny_deberta])
def test_captured_features_are_what_the_logits_are_computed_from(factory):
    model = get_balora_model(_no_dropout(factory(num_labels=2)), _config())
    batch = _batch()
    layers = classifier_layers(model)
    model.eval()
    with torch.no_grad(), capture_classifier_input(layers) as captured:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    features = captured[-1]
    assert features.shape == (8, model.config.hidden_size)
    with torch.no_grad():
        reproduced = [layer(features) for layer in layers]
    assert any(torch.allclose(out, logits, atol=1e-6) for out in reproduced)
    # the hooks are gone after the block
    assert all(not layer._forward_pre_hooks for layer in layers)


def _adapter_grads(svd_input, svd_weight, tmp_path):
    torch.manual_seed(0)
    model = get_balora_model(
        _no_dropout(tiny_bert(num_labels=2)), _config(svd_input=svd_input, svd_weight=svd_weight, svd_top_k=5)
    )
    trainer = _trainer(model, tmp_path)
    model.train()
    model.zero_grad()
    trainer.compute_loss(model, _batch()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


@pytest.mark.filterwarnings("ignore:nlu_svd")
def test_feature_svd_gives_a_gradient_where_the_logit_term_is_constant(tmp_path):
    # 2 classes, k = 5: on the logits the SVD term is the constant -1, so λ3 changes nothing; on the 32-dim
    # features (batch 8) it is a real ratio and moves the adapter.
    task_only = _adapter_grads("logits", 0.0, tmp_path / "a")
    on_logits = _adapter_grads("logits", 1.0, tmp_path / "b")
    on_features = _adapter_grads("features", 1.0, tmp_path / "c")
    for name in task_only:
        torch.testing.assert_close(on_logits[name], task_only[name], msg=name)
    changed = max((on_features[n] - task_only[n]).abs().max().item() for n in task_only)
    scale = max(task_only[n].abs().max().item() for n in task_only)
    assert changed > 1e-3 * scale


def test_svd_input_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"svd_input must be one of \['logits', 'features'\]"):
        BALoRAConfig(svd_input="pooled")
    with pytest.raises(ValueError, match="svd_input='features' is for NLU"):
        BALoRAConfig(task="nlg", svd_input="features")
    with pytest.raises(ValueError, match="svd_input='features' is for NLU"):
        BALoRAConfig(svd_input="features").resolve("nlg")
    with pytest.raises(ValueError, match="svd_input='features' is for NLU"):
        get_balora_model(tiny_llama(), BALoRAConfig(r=2, svd_input="features"))


def test_classifier_layers_refuses_a_model_without_a_classification_head():
    base = tiny_llama()
    with pytest.raises(ValueError, match="needs a sequence-classification head"):
        classifier_layers(base)
