"""The NLU teacher-logit cache: reused after the first epoch, same training as without it, never stale."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

from balora import BALoRAConfig, BALoRATrainer, get_balora_model
from balora.nlu import row_keys

from conftest import tiny_bert


def _dataset(rows=8, length=8):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 101, (rows, length), generator=g)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * length] * rows, "labels": [i % 3 for i in range(rows)]}
    )


def _model():
    model = tiny_bert(num_labels=3)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _train(tmp_path, cache: bool, calls: list[int]):
    calls.clear()
    torch.manual_seed(0)
    model = get_balora_model(_model(), BALoRAConfig(r=2, teacher_cache=cache))
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=3, learning_rate=1e-2,
        logging_steps=2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = BALoRATrainer(model=model, args=args, train_dataset=_dataset())
    trainer.train()
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return params, len(calls), trainer


def test_cache_skips_the_teacher_after_the_first_epoch_and_changes_nothing(tmp_path, teacher_calls):
    plain, plain_calls, _ = _train(tmp_path / "a", False, teacher_calls)
    cached, cached_calls, trainer = _train(tmp_path / "b", True, teacher_calls)
    assert plain_calls == 6  # 3 epochs × 2 batches
    assert cached_calls == 2  # the first epoch only
    assert trainer.state.log_history[-2]["teacher_cache_hit_rate"] == pytest.approx(1.0)
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_row_keys_ignore_padding_and_see_every_token_and_input():
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    keys = row_keys({"input_ids": ids, "attention_mask": mask})
    assert keys[0] != keys[1]
    shorter = row_keys({"input_ids": ids[:, :3], "attention_mask": mask[:, :3]})
    assert shorter[0] == keys[0], "padding length must not change the key"
    retokenised = row_keys({"input_ids": torch.tensor([[5, 6, 9]]), "attention_mask": torch.ones(1, 3)})
    assert retokenised[0] != keys[0]
    with_types = row_keys(
        {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.tensor([[0, 0, 1, 0, 0]] * 2)}
    )
    assert with_types[0] != keys[0], "every model input is part of the key"


def test_cache_is_refused_for_nlg():
    with pytest.raises(ValueError, match="teacher_cache is for NLU only"):
        BALoRAConfig(task="nlg", teacher_cache=True)
