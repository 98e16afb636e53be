"""BALoRATrainer: the objective, gradient accumulation, logging, and saving."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from torch.utils.data import SequentialSampler
from transformers import DataCollatorWithPadding, TrainingArguments

from balora import BALoRAConfig, BALoRATrainer, get_balora_model, losses
from balora.adapter import save_adapter

from conftest import tiny_bert, tiny_llama


class SequentialTrainer(BALoRATrainer):
    """Same batches in the same order whatever the batch size, so runs can be compared step by step."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def _args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def _nlg_dataset(rows=4, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (rows, length), generator=g)
    labels = ids.clone()
    for i in range(rows):  # prompts of different lengths: micro-batches hold different token counts
        labels[i, : 2 + 2 * i] = -100
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * length] * rows, "labels": labels.tolist()}
    )


def _nlu_dataset(rows=4, length=8, num_labels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (rows, length), generator=g)
    return Dataset.from_dict(
        {
            "input_ids": ids.tolist(),
            "attention_mask": [[1] * length] * rows,
            "labels": [i % num_labels for i in range(rows)],
        }
    )


def _no_dropout_bert():
    model = tiny_bert(num_labels=3)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _update(model_factory, config, dataset, tmp_path, **args):
    torch.manual_seed(0)
    model = get_balora_model(model_factory(), config)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = SequentialTrainer(model=model, args=_args(tmp_path, **args), train_dataset=dataset)
    trainer.train()
    return {n: before[n] - p.detach() for n, p in model.named_parameters() if n in before}, trainer


@pytest.mark.parametrize(("factory", "dataset"), [(tiny_llama, _nlg_dataset), (_no_dropout_bert, _nlu_dataset)])
def test_accumulation_gives_the_gradient_of_one_large_batch(tmp_path, factory, dataset):
    config = BALoRAConfig(method="pissa", r=2)
    one, _ = _update(factory, config, dataset(), tmp_path / "a", per_device_train_batch_size=4)
    two, _ = _update(
        factory, config, dataset(), tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2
    )
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=1e-4, msg=name)


LAMBDA = 1e4


def test_regularizers_are_averaged_not_multiplied_over_accumulation_steps(tmp_path):
    """The step's gradient is ∇[Σ CE / N_total + λ · mean over micro-batches of the diversity term]."""
    config = BALoRAConfig(r=2, consistency_weight=0.0, diversity_weight=LAMBDA, svd_weight=0.0)
    dataset = _nlu_dataset()
    delta, trainer = _update(
        _no_dropout_bert, config, dataset, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2
    )
    torch.manual_seed(0)
    reference = get_balora_model(_no_dropout_bert(), config)
    reference.train()
    ids = torch.tensor(dataset["input_ids"])
    labels = torch.tensor(dataset["labels"])
    total, regularizer = 0.0, 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        logits = reference(input_ids=ids[rows]).logits
        ce = torch.nn.functional.cross_entropy(logits, labels[rows], reduction="sum") / 4
        regularizer = regularizer + LAMBDA * losses.nlu_diversity(logits) / 2
        total = total + ce
    trainable = [p for p in reference.parameters() if p.requires_grad]
    # The regularizer's own share of the gradient must be far above the tolerance, or the test could not tell
    # λ from 2λ (a small random model has tiny logit covariances, hence the large λ).
    share = torch.autograd.grad(regularizer, trainable, retain_graph=True)
    assert max(g.abs().max() for g in share) > 1e-3
    (total + regularizer).backward()
    for name, param in reference.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(delta[name], param.grad, atol=1e-6, rtol=1e-4, msg=name)
    logged = trainer.state.log_history[0]
    assert logged["lambda_diversity"] == pytest.approx(LAMBDA)
    assert "consistency_loss" not in logged and "svd_loss" not in logged, "terms with λ = 0 must not be computed"


def test_task_loss_matches_the_models_own_loss():
    model = get_balora_model(tiny_llama(), BALoRAConfig(method="pissa", r=2))
    dataset = _nlg_dataset()
    trainer = BALoRATrainer(model=model, args=_args("/tmp/unused-balora"), train_dataset=dataset)
    batch = {k: torch.tensor(v) for k, v in dataset[:4].items()}
    model.eval()
    with torch.no_grad():
        own = model(**batch).loss
        ours = trainer.compute_loss(model, batch)
    torch.testing.assert_close(ours, own, atol=1e-6, rtol=1e-5)


def _train_end_to_end(model, dataset, tmp_path, collator=None, steps=12):
    args = _args(
        tmp_path,
        max_steps=steps,
        learning_rate=2e-2,
        optim="adamw_torch",
        per_device_train_batch_size=4,
        logging_steps=4,
        max_grad_norm=1.0,
    )
    trainer = BALoRATrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("task", ["nlu", "nlg"])
def test_tiny_end_to_end_with_all_three_terms(tmp_path, task):
    if task == "nlg":
        model, dataset = tiny_llama(), _nlg_dataset(rows=8)
        config = BALoRAConfig(r=4, svd_top_k=3, consistency_schedule="constant", regularizer_schedule="constant")
    else:
        model, dataset = tiny_bert(num_labels=3), _nlu_dataset(rows=8)
        config = BALoRAConfig(r=4, svd_top_k=2)
    peft_model = get_balora_model(model, config)
    logs = _train_end_to_end(peft_model, dataset, tmp_path)
    assert len(logs) == 3
    for entry in logs:
        for key in (
            "task_loss",
            "consistency_loss",
            "diversity_loss",
            "svd_loss",
            "lambda_consistency",
            "lambda_diversity",
            "lambda_svd",
        ):
            assert key in entry and math.isfinite(entry[key]), (key, entry)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert logs[-1]["task_loss"] < logs[0]["task_loss"]


def test_evaluation_reports_the_row_mean_task_loss_only(tmp_path):
    """eval_loss is the mean over rows even when the last batch is short (5 rows, batches of 2), no per-batch
    eval_task_loss appears beside it."""
    model = get_balora_model(_no_dropout_bert(), BALoRAConfig(r=2, svd_top_k=2, consistency_schedule="constant",
                                                             regularizer_schedule="constant"))
    train, held = _nlu_dataset(rows=8), _nlu_dataset(rows=5, seed=1)
    trainer = SequentialTrainer(model=model, args=_args(tmp_path, per_device_eval_batch_size=2, max_steps=2,
                                                         logging_steps=2, learning_rate=0.1),
                                train_dataset=train, eval_dataset=held)
    trainer.train()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(held["input_ids"]),
                       attention_mask=torch.tensor(held["attention_mask"])).logits.double()
    labels = torch.tensor(held["labels"])
    expected = -logits.log_softmax(-1)[torch.arange(5), labels].mean().item()  # float64, over the 5 rows
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert not [k for k in metrics if k.startswith("eval_") and k.removeprefix("eval_") in losses.LOSS_TERMS], metrics


def test_teacher_forward_is_skipped_when_consistency_weight_is_zero(tmp_path, teacher_calls):
    calls = teacher_calls
    model = get_balora_model(tiny_llama(), BALoRAConfig(r=2, consistency_weight=0.0))
    _train_end_to_end(model, _nlg_dataset(rows=8), tmp_path, steps=2)
    assert calls == []
    model = get_balora_model(tiny_llama(), BALoRAConfig(r=2, consistency_weight=0.1, consistency_schedule="constant"))
    _train_end_to_end(model, _nlg_dataset(rows=8), tmp_path, steps=2)
    assert len(calls) == 2


@pytest.mark.parametrize("factory", [tiny_llama, lambda: tiny_bert(num_labels=3)])
@pytest.mark.parametrize("form", ["lora", "pissa"])
def test_saved_adapter_loads_back_with_peft(tmp_path, factory, form):
    torch.manual_seed(0)
    base = factory().eval()
    original = copy.deepcopy(base)
    model = get_balora_model(base, BALoRAConfig(r=2))
    dataset = _nlg_dataset(rows=8) if model.balora_config.task == "nlg" else _nlu_dataset(rows=8)
    _train_end_to_end(model, dataset, tmp_path / "run", steps=4)
    model.eval()
    ids = torch.randint(3, 101, (2, 9))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter", form=form)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert BALoRAConfig.load(tmp_path / "adapter") == model.balora_config
    if form == "lora":
        target = original  # the converted adapter applies to the untouched pre-trained weights
    else:  # the PiSSA-form adapter applies to W_res: rebuild it with the same init
        target = _strip_adapters(get_balora_model(copy.deepcopy(original), BALoRAConfig(r=2)).base_model.model)
    loaded = PeftModel.from_pretrained(target, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, trained, atol=1e-4, rtol=0)


def _strip_adapters(model):
    """A plain transformers model holding the PiSSA residual weights (adapters removed without merging)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    for name, module in list(model.named_modules()):
        if type(module).__name__ == "ModulesToSaveWrapper":
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], module.original_module)
    return model


def test_collator_padding_and_nlu_regression(tmp_path):
    """A regression head (D = 1) trains with MSE and the MSE consistency; variable lengths pad through a collator."""
    from transformers import BertTokenizerFast

    model = tiny_bert(num_labels=1, problem_type="regression")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(96)]))
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    texts = [" ".join(f"w{(i * j) % 96}" for j in range(3 + i)) for i in range(8)]
    encoded = tokenizer(texts)
    dataset = Dataset.from_dict({**encoded, "labels": [float(i % 5) for i in range(8)]})
    peft_model = get_balora_model(model, BALoRAConfig(r=2, svd_weight=0.0))
    logs = _train_end_to_end(peft_model, dataset, tmp_path, collator=DataCollatorWithPadding(tokenizer), steps=8)
    assert all(math.isfinite(e["consistency_loss"]) for e in logs)
    assert logs[-1]["task_loss"] < logs[0]["task_loss"]


@pytest.mark.parametrize("svd_method", ["exact", "hidden"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_fused_nlg_objective_equals_the_reference_one(tmp_path, svd_method, accumulation):
    """The default fused path gives the loss and the gradients of the plain functions of balora.losses."""
    dataset = _nlg_dataset(rows=4)
    batch = {k: torch.tensor(v) for k, v in dataset[:4].items()}
    grads, values = {}, {}
    for impl in ("fused", "reference"):
        torch.manual_seed(0)
        config = BALoRAConfig(
            r=2,
            svd_top_k=3,
            svd_method=svd_method,
            loss_impl=impl,
            consistency_weight=0.5,
            diversity_weight=0.3,
            svd_weight=0.2,
            consistency_schedule="constant",
            regularizer_schedule="constant",
        )
        model = get_balora_model(tiny_llama(), config)
        with torch.no_grad():  # move the student away from the teacher so the consistency term is not 0
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.05 * torch.randn_like(param))
        trainer = BALoRATrainer(model=model, args=_args(tmp_path / impl), train_dataset=dataset)
        trainer.state.max_steps = 10
        trainer.current_gradient_accumulation_steps = accumulation
        model.train()
        loss = trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(21))
        loss.backward()
        values[impl] = loss.detach()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        logged = {k: v[-1] for k, v in trainer._term_logs["train"].items()}
        for key in ("task_loss", "consistency_loss", "diversity_loss", "svd_loss"):
            assert key in logged and torch.isfinite(logged[key]), key
        assert logged["consistency_loss"] > 1e-6
    torch.testing.assert_close(values["fused"], values["reference"], atol=1e-5, rtol=1e-5)
    for name, grad in grads["reference"].items():
        torch.testing.assert_close(grads["fused"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_svd_method_auto_uses_the_hidden_states_only_where_the_head_allows_it(tmp_path):
    from balora.trainer import resolve_svd_method

    model = get_balora_model(tiny_llama(), BALoRAConfig(r=2))
    assert resolve_svd_method(model.balora_config, model) == "hidden"
    model.get_output_embeddings().weight.requires_grad_(True)
    assert resolve_svd_method(model.balora_config, model) == "randomized"
    with pytest.raises(ValueError, match="the output head is trained"):
        resolve_svd_method(BALoRAConfig(r=2, svd_method="hidden").resolve("nlg"), model)


def test_full_fine_tuning_trains_every_weight_on_the_task_loss(tmp_path):
    model = _no_dropout_bert()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    dataset = _nlu_dataset()
    trainer = BALoRATrainer(model=model, args=_args(tmp_path), train_dataset=dataset,
                            balora_config=BALoRAConfig(method="full"))
    assert trainer.balora_config.task == "nlu" and trainer.balora_config.init is None
    assert trainer.balora_config.weights_at(0.5) == (0.0, 0.0, 0.0)
    batch = {k: torch.tensor(v) for k, v in dataset[:4].items()}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(model, batch), model(**batch).loss, atol=1e-6, rtol=1e-5)
    trainer.train()
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.detach(), initial[n])]
    assert unchanged == []


def test_full_method_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="no adapter to initialise"):
        BALoRAConfig(method="full", init="pissa")
    with pytest.raises(ValueError, match="trains without regularizers"):
        BALoRAConfig(method="full", consistency_weight=0.1)
    with pytest.raises(ValueError, match="has no adapter to build"):
        get_balora_model(tiny_bert(), BALoRAConfig(method="full"))
    peft_model = get_balora_model(tiny_bert(), BALoRAConfig(method="pissa", r=2))
    with pytest.raises(TypeError, match="method='full' trains a plain transformers model"):
        BALoRATrainer(model=peft_model, args=_args(tmp_path), balora_config=BALoRAConfig(method="full"))
    with pytest.raises(TypeError, match="needs the PeftModel from get_balora_model"):
        BALoRATrainer(model=tiny_bert(), args=_args(tmp_path), balora_config=BALoRAConfig(method="balora"))
