"""Synthetic class imbalance and a seeded dev split, for the evidence studies (docs/results.md).

BA-LoRA's diversity term targets representation collapse: outputs drifting toward the dominant class when the training
data is imbalanced (arXiv 2408.04556, Sec. 1). `apply_class_imbalance` makes a training set imbalanced on purpose: the
minority class keeps only enough rows to be a share P of the training rows; validation data is never touched.

`carve_dev` holds rows out of the training rows for choosing a learning rate, so that the choice never sees the
reported validation set.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from datasets import Dataset

_DEV_STREAM = 1  # separate random streams per seed: the dev rows do not depend on the subset's draw
_IMBALANCE_STREAM = 2


def carve_dev(dataset: Dataset, rows: int, seed: int) -> tuple[Dataset, Dataset]:
    """(train, dev): `rows` training rows drawn with `seed` become the dev set; both keep file order."""
    n = len(dataset)
    if not 1 <= rows < n:
        raise ValueError(f"data.dev_rows = {rows} must leave training rows: choose 1 <= dev_rows < {n} (the "
                         "training rows after max_train_samples)")
    dev = np.sort(np.random.default_rng([seed, _DEV_STREAM]).choice(n, size=rows, replace=False))
    keep = np.setdiff1d(np.arange(n), dev)
    return dataset.select(keep.tolist()), dataset.select(dev.tolist())


def apply_class_imbalance(dataset: Dataset, share: float, num_labels: int, seed: int, *,
                          label_field: str = "label") -> tuple[Dataset, dict[str, Any]]:
    """Subsample the least frequent class (ties: the lowest id) so that it makes up `share` of the rows.

    With m rows of the other classes, the minority class keeps k = round(share · m / (1 − share)) of its rows, drawn
    with `seed`; the other classes are untouched and the file order is kept. Fails if the class has fewer than k rows
    (the share asked for is above its natural share) or if k would be 0. Returns the dataset and a record of what was
    done (minority class, its rows before and after, the share reached).
    """
    if num_labels < 2:
        raise ValueError(f"class imbalance needs a classification task (num_labels >= 2); got {num_labels}")
    if not 0.0 < share < 1.0 / num_labels:
        raise ValueError(f"data.class_imbalance = {share} must lie in (0, 1/{num_labels}) for {num_labels} classes: "
                         "the minority class's share of the training rows")
    labels = np.asarray(dataset[label_field])
    if labels.dtype.kind not in "iu":
        raise ValueError(f"class imbalance needs integer class labels; column {label_field!r} has {labels.dtype}")
    counts = np.bincount(labels, minlength=num_labels)
    minority = int(np.argmin(counts))
    others = int(len(labels) - counts[minority])
    keep_count = round(share * others / (1.0 - share))
    if keep_count < 1:
        raise ValueError(f"data.class_imbalance = {share} keeps no row of class {minority} out of {len(labels)} "
                         "training rows; raise the share or data.max_train_samples")
    if keep_count > counts[minority]:
        raise ValueError(f"data.class_imbalance = {share} needs {keep_count} rows of class {minority}, which has only "
                         f"{counts[minority]} (natural share {counts[minority] / len(labels):.3f}); choose a share "
                         "below the natural one")
    rows = np.flatnonzero(labels == minority)
    kept = np.random.default_rng([seed, _IMBALANCE_STREAM]).choice(rows, size=keep_count, replace=False)
    keep = np.sort(np.concatenate([np.flatnonzero(labels != minority), kept]))
    info = {"minority_class": minority, "minority_rows_before": int(counts[minority]),
            "minority_rows": keep_count, "rows": int(keep.size), "minority_share": keep_count / int(keep.size)}
    return dataset.select(keep.tolist()), info
