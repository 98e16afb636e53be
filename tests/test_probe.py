"""The linear-probe baseline: the frozen model's head-input features, and a probe fit on the training rows only."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset

from balora.data.glue import get_task_spec
from balora.heads import MeanPooledForSequenceClassification
from balora.probe import frozen_features, linear_probe

from conftest import tiny_bert


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=g).tolist()
    ids = [torch.randint(3, 101, (k,), generator=g).tolist() for k in lengths]
    labels = [int(row[0] % 2) for row in ids]  # learnable from the first token
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * k for k in lengths], "labels": labels})


def _collator():
    """Right padding with id 0, as DataCollatorWithPadding does for BERT."""

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for r in rows:
            pad = width - len(r["input_ids"])
            out["input_ids"].append(r["input_ids"] + [0] * pad)
            out["attention_mask"].append(r["attention_mask"] + [0] * pad)
            out["labels"].append(r["labels"])
        return {k: torch.tensor(v) for k, v in out.items()}

    return collate


def test_frozen_features_are_the_masked_mean_of_the_last_hidden_states():
    backbone = tiny_bert(num_labels=2).bert.eval()
    model = MeanPooledForSequenceClassification(backbone.config, backbone=backbone)
    data = _data(10, 0)
    features, labels = frozen_features(model, data, _collator(), batch_size=4)
    assert features.shape == (10, 32) and labels.tolist() == data["labels"]
    with torch.no_grad():
        for i in range(10):
            ids = torch.tensor([data[i]["input_ids"]])
            hidden = backbone(input_ids=ids).last_hidden_state[0].double()
            np.testing.assert_allclose(features[i], hidden.mean(0).numpy(), atol=1e-5)


def test_the_probe_never_sees_the_validation_labels():
    backbone = tiny_bert(num_labels=2).bert.eval()
    model = MeanPooledForSequenceClassification(backbone.config, backbone=backbone)
    train, validation = _data(60, 1), _data(30, 2)
    spec = get_task_spec("sst2")
    first = linear_probe(model, train, validation, _collator(), spec)
    flipped = validation.map(lambda r: {"labels": 1 - r["labels"]})
    second = linear_probe(model, train, flipped, _collator(), spec)
    assert first["C"] == second["C"] and first["train_rows"] == 60
    # the same predictions scored against flipped labels: accuracy a becomes 1 - a
    assert abs(first["metrics"]["eval_accuracy"] + second["metrics"]["eval_accuracy"] - 1.0) < 1e-9
