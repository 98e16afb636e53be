"""Symmetric label noise: exact count, never the same class, uniform over the others, seeded; the record file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Value

from balora.data.noise import apply_label_noise, save_flipped


def make(labels: list[int], num_labels: int) -> Dataset:
    features = Features({"text": Value("string"), "label": ClassLabel(num_classes=num_labels), "idx": Value("int64")})
    return Dataset.from_dict(
        {"text": [f"t{i}" for i in labels], "label": labels, "idx": list(range(len(labels)))}, features=features
    )


@pytest.mark.parametrize(
    ("p", "n", "expected"), [(0.1, 1000, 100), (0.25, 10, 2), (0.35, 10, 4), (0.0, 50, 0), (1.0, 7, 7), (0.3, 1, 0)]
)
def test_flips_exactly_round_p_n_to_another_class(p: float, n: int, expected: int) -> None:
    labels = (np.arange(n) % 3).tolist()
    noisy, flipped = apply_label_noise(make(labels, 3), p, num_labels=3, seed=0)
    assert len(flipped) == expected == round(p * n)
    assert flipped == sorted(set(flipped))
    new = noisy["label"]
    changed = [i for i in range(n) if new[i] != labels[i]]
    assert changed == flipped  # every flipped row changed class, no other row did
    assert noisy.column_names == ["text", "label", "idx"] and noisy.features["label"] == ClassLabel(num_classes=3)
    assert noisy["text"] == [f"t{i}" for i in labels]


def test_seeded_and_reproducible() -> None:
    ds = make((np.arange(200) % 2).tolist(), 2)
    a = apply_label_noise(ds, 0.2, 2, seed=3)
    b = apply_label_noise(ds, 0.2, 2, seed=3)
    c = apply_label_noise(ds, 0.2, 2, seed=4)
    assert a[1] == b[1] and a[0]["label"] == b[0]["label"]
    assert a[1] != c[1]


def test_new_class_is_uniform_over_the_others() -> None:
    n = 12_000
    labels = np.zeros(n, dtype=int).tolist()  # all class 0: flips must land on 1, 2, 3 equally often
    noisy, flipped = apply_label_noise(make(labels, 4), 1.0, 4, seed=0)
    counts = Counter(noisy["label"])
    assert counts[0] == 0 and len(flipped) == n
    for cls in (1, 2, 3):  # each ~n/3; 5 standard deviations is about 2.4 %
        assert abs(counts[cls] - n / 3) < 0.025 * n


def test_errors() -> None:
    with pytest.raises(ValueError, match="does not apply to regression"):
        apply_label_noise(Dataset.from_dict({"label": [0.5, 1.2]}), 0.5, num_labels=1, seed=0)
    with pytest.raises(ValueError, match="integer class labels"):
        apply_label_noise(Dataset.from_dict({"label": [0.5, 1.2]}), 0.5, num_labels=2, seed=0)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        apply_label_noise(make([0, 1], 2), 1.5, 2, seed=0)
    with pytest.raises(ValueError, match=r"labels must lie in 0..1"):
        apply_label_noise(Dataset.from_dict({"label": [0, 2]}), 0.5, 2, seed=0)


def test_save_flipped_is_atomic_json(tmp_path: Path) -> None:
    out = save_flipped(tmp_path / "run" / "flipped.json", [3, 7], meta={"p": 0.2, "seed": 1})
    assert json.loads(out.read_text()) == {"p": 0.2, "seed": 1, "count": 2, "flipped_indices": [3, 7]}
    assert [p.name for p in out.parent.iterdir()] == ["flipped.json"]  # no temp file left behind
