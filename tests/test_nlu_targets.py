"""NLU consistency targets (initial_head, current_head, features) against float64 references; the regression guard;
the teacher cache with features; the head's own learning rate."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import TrainingArguments

from balora import BALoRAConfig, BALoRATrainer, get_balora_model
from balora.losses import nlu_feature_consistency

from conftest import tiny_bert, tiny_roberta

T = 2.0


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _args(tmp_path, **kw):
    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                  save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0)
    return TrainingArguments(**{**values, **kw})


def _batch(rows=4, length=6, num_labels=3, regression=False):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 101, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    labels = torch.rand(rows, generator=g) * 5 if regression else torch.arange(rows) % num_labels
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_feature_consistency_matches_a_float64_reference_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(5, 7, generator=g, requires_grad=True)
    teacher = torch.randn(5, 7, generator=g)
    teacher[2] = 0.0  # a zero row: cosine 0, finite gradient
    s64 = student.detach().double().requires_grad_(True)
    terms = []
    for n in range(5):
        a, b = s64[n], teacher[n].double()
        denom = torch.clamp(a.norm() * b.norm(), min=1e-8)
        terms.append(1 - (a @ b) / denom)
    reference = sum(terms) / 5
    reference.backward()
    value = nlu_feature_consistency(student, teacher)
    value.backward()
    torch.testing.assert_close(value.double(), reference.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(student.grad.double(), s64.grad, atol=1e-6, rtol=1e-5)
    assert torch.isfinite(student.grad).all()
    # identical features: 0 for every row but the zero row, which counts as cosine 0 (distance 1): mean 1/5
    assert nlu_feature_consistency(teacher, teacher).item() == pytest.approx(1 / 5, abs=1e-6)


def _moved(peft_model, shift: float = 0.3):
    """Move the trainable adapter and head away from their initial values (a model some steps into training)."""
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(shift * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("target", ["initial_head", "current_head", "features"])
def test_trainer_gradient_equals_a_float64_hand_reference(target, tmp_path):
    torch.manual_seed(0)
    original = _no_dropout(tiny_bert(num_labels=3)).eval()
    reference_base = copy.deepcopy(original).double()  # the untouched pre-trained model, float64
    config = BALoRAConfig(r=2, consistency_target=target, consistency_weight=1.0, diversity_weight=0.0,
                          svd_weight=0.0)
    model = get_balora_model(original, config)
    _moved(model)
    batch = _batch()
    trainer = BALoRATrainer(model=model, args=_args(tmp_path, max_steps=1),
                            train_dataset=Dataset.from_dict({"x": [0]}))
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    value = trainer._term_logs["train"]["consistency_loss"][-1]

    student = copy.deepcopy(model).double()
    for p in student.parameters():
        p.grad = None
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inner = student.base_model.model
    student_pooled = inner.bert(**inputs).pooler_output  # (N, H), the student's head input
    logits = inner.classifier(student_pooled)
    with torch.no_grad():
        teacher_pooled = reference_base.bert(**inputs).pooler_output
        teacher_logits = reference_base.classifier(teacher_pooled)
    ce = F.cross_entropy(logits, batch["labels"])
    if target == "features":
        cos = (student_pooled * teacher_pooled).sum(-1) / (student_pooled.norm(dim=-1) * teacher_pooled.norm(dim=-1))
        consistency = (1 - cos).mean()
    else:
        if target == "current_head":
            head = inner.classifier.modules_to_save["default"]
            teacher_logits = (teacher_pooled @ head.weight.T + head.bias).detach()
        p_t = F.softmax(teacher_logits / T, -1)
        log_ratio = F.log_softmax(teacher_logits / T, -1) - F.log_softmax(logits / T, -1)
        consistency = T**2 * (p_t * log_ratio).sum(-1).mean()
    (ce + consistency).backward()
    torch.testing.assert_close(value.double(), consistency.detach(), atol=1e-5, rtol=1e-5)
    grads = dict(student.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.double(), grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)
            checked += 1
    assert checked >= 4


def test_regression_consistency_never_pulls_toward_the_initial_head(tmp_path):
    torch.manual_seed(0)
    base = _no_dropout(tiny_bert(num_labels=1, problem_type="regression"))
    with pytest.raises(ValueError, match="initial_head.*regression.*current_head"):
        get_balora_model(copy.deepcopy(base), BALoRAConfig(r=2, consistency_target="initial_head"))
    batch = _batch(regression=True)
    for target in ("current_head", "features"):
        model = get_balora_model(copy.deepcopy(base), BALoRAConfig(r=2, consistency_target=target,
                                                                    consistency_weight=1.0))
        head = model.base_model.model.classifier.modules_to_save["default"]
        with torch.no_grad():
            head.bias.add_(5.0)  # the head has learned the targets' offset; the backbone has not moved
        trainer = BALoRATrainer(model=model, args=_args(tmp_path, max_steps=1),
                                train_dataset=Dataset.from_dict({"x": [0]}))
        model.train()
        trainer.compute_loss(model, batch)
        consistency = trainer._term_logs["train"]["consistency_loss"][-1]
        assert consistency.item() == pytest.approx(0.0, abs=1e-6), target  # initial_head would give 5² = 25
        # and its gradient is 0: the gradient with the term on equals the gradient with λ1 = 0
        grads = []
        for weight in (1.0, 0.0):
            cfg = BALoRAConfig(r=2, consistency_target=target, consistency_weight=weight, diversity_weight=0.0,
                               svd_weight=0.0).resolve("nlu")
            probe = BALoRATrainer(model=model, args=_args(tmp_path, max_steps=1), balora_config=cfg,
                                  train_dataset=Dataset.from_dict({"x": [0]}))
            model.zero_grad()
            probe.compute_loss(model, batch).backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        for with_term, without in zip(*grads, strict=True):
            torch.testing.assert_close(with_term, without, atol=1e-6, rtol=1e-5)


def _train(tmp_path, make_model, config, data, steps_per_epoch_rows=8, epochs=3):
    torch.manual_seed(0)
    model = get_balora_model(_no_dropout(make_model()), config)
    args = _args(tmp_path, num_train_epochs=epochs, logging_steps=2)
    trainer = BALoRATrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, trainer


@pytest.mark.parametrize("target", ["current_head", "features"])
@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_cache_stores_features_and_gives_the_same_training(target, arch, tmp_path, teacher_calls):
    g = torch.Generator().manual_seed(1)
    rows, length = 8, 7
    ids = torch.randint(3, 101, (rows, length), generator=g)
    lengths = [7, 5, 6, 7, 4, 7, 3, 6]  # padded batches: (T, H) features are stored without padding
    mask = [[1] * n + [0] * (length - n) for n in lengths]
    labels = [i % 2 for i in range(rows)]
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask, "labels": labels})
    make = (lambda: tiny_bert(num_labels=2)) if arch == "bert" else tiny_roberta
    results = []
    for cache in (False, True):
        teacher_calls.clear()
        config = BALoRAConfig(r=2, consistency_target=target, teacher_cache=cache, consistency_weight=1.0)
        params, trainer = _train(tmp_path / str(cache), make, config, data)
        results.append((params, len(teacher_calls), trainer))
    (plain, plain_calls, _), (cached, cached_calls, trainer) = results
    assert plain_calls == 6 and cached_calls == 2
    assert len(trainer._teacher_cache) == rows
    stored = next(iter(trainer._teacher_cache._rows.values()))[1]
    assert stored is not None  # the features are cached, not only the logits
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_head_learning_rate_gives_the_head_its_own_optimizer_group(tmp_path):
    model = get_balora_model(tiny_bert(num_labels=2), BALoRAConfig(r=2, head_learning_rate=5e-2))
    trainer = BALoRATrainer(model=model, args=_args(tmp_path, learning_rate=1e-3, max_steps=1),
                            train_dataset=Dataset.from_dict({"x": [0]}))
    optimizer = trainer.create_optimizer()
    head = {id(p) for n, p in model.named_parameters() if "classifier.modules_to_save.default" in n}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    by_lr: dict[float, set[int]] = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], set()).update(id(p) for p in group["params"])
    assert by_lr[5e-2] == head and len(head) == 2
    assert by_lr[1e-3] == trainable - head


def test_pooled_features_average_a_token_level_head_input_over_the_mask():
    from balora.nlu import pooled

    g = torch.Generator().manual_seed(4)
    per_token = torch.randn(2, 4, 3, generator=g)  # (B, T, H): RoBERTa's and decoders' heads take every token
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right and left padding
    expected = torch.stack([per_token[0, :3].double().mean(0), per_token[1, 1:].double().mean(0)])
    torch.testing.assert_close(pooled(per_token, mask).double(), expected)
    flat = torch.randn(2, 3, generator=g)
    assert pooled(flat, mask) is flat  # already (B, H): the head's own pooling is kept
