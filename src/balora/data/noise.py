"""Synthetic label noise for the bias/noise-robustness experiments.

BA-LoRA targets "catastrophic inheritance": noise and imbalance in the data a model learns from (arXiv 2408.04556,
Sec. 1). To test robustness to noisy labels, a fraction `p` of the training labels is flipped uniformly to another
class (symmetric label noise); the flipped rows are recorded so that an analysis can tell them apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from balora.io import write_json_atomic


def apply_label_noise(
    dataset: Dataset, p: float, num_labels: int, seed: int, *, label_field: str = "label"
) -> tuple[Dataset, list[int]]:
    """Flip exactly `round(p * n)` labels, chosen with `seed`, each to a uniformly drawn *different* class.

    Returns the new dataset (other columns and the label feature unchanged) and the sorted 0-based positions of the
    flipped rows. Python's `round` rounds halves to even (`round(2.5) == 2`). Classification only.
    """
    if num_labels < 2:
        raise ValueError(
            f"label noise flips classes and needs num_labels >= 2, got {num_labels}; it does not apply to regression "
            "tasks (e.g. stsb): set data.label_noise to 0"
        )
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label noise rate p must be in [0, 1], got {p}")
    if label_field not in dataset.column_names:
        raise ValueError(f"dataset has no column {label_field!r} (columns: {dataset.column_names})")
    labels = np.asarray(dataset[label_field])
    if labels.dtype.kind not in "iu":
        raise ValueError(
            f"label noise needs integer class labels, column {label_field!r} has dtype {labels.dtype}; "
            "it does not apply to regression tasks"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(f"labels must lie in 0..{num_labels - 1}, found {labels.min()}..{labels.max()}")
    n_flip = round(p * len(labels))
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(len(labels), size=n_flip, replace=False))
    noisy = labels.copy()
    # Adding 1..C-1 modulo C gives each other class with probability 1/(C-1) and never the original one.
    noisy[flipped] = (labels[flipped] + rng.integers(1, num_labels, size=n_flip)) % num_labels
    feature = dataset.features[label_field]
    out = dataset.remove_columns(label_field).add_column(label_field, noisy.tolist(), feature=feature)
    out = out.select_columns(dataset.column_names)  # keep the original column order
    return out, flipped.tolist()


def save_flipped(path: str | Path, indices: Sequence[int], *, meta: Mapping[str, Any] | None = None) -> Path:
    """Write `{"count": k, "flipped_indices": [...], **meta}` as JSON, atomically (temp file, then rename)."""
    path = Path(path)
    write_json_atomic(path, {**(meta or {}), "count": len(indices), "flipped_indices": [int(i) for i in indices]})
    return path
