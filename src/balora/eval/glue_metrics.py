"""GLUE metrics as the benchmark defines them (Wang et al., 2019, Table 1), for BA-LoRA's NLU results.

CoLA: Matthews correlation; SST-2, MNLI (matched and mismatched, scored per split), QNLI, RTE, WNLI: accuracy; MRPC,
QQP: accuracy and F1 of the positive class (1); STS-B: Pearson and Spearman correlations. The names of the returned
keys follow the `glue` metric of Hugging Face `evaluate`: `accuracy`, `f1`, `matthews_correlation`, `pearson`,
`spearmanr`. Values are Python floats.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from balora.data.glue import TaskSpec, get_task_spec

logger = logging.getLogger(__name__)


def _correlation(fn: Callable[..., Any], name: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        # Undefined for a constant input: report NaN (not 0) so a collapsed regressor is not mistaken for a weak one.
        logger.warning("%s is undefined when predictions or labels are constant; reporting NaN", name)
        return float("nan")
    return float(fn(predictions, labels).statistic)


_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda p, y: float(accuracy_score(y, p)),
    "f1": lambda p, y: float(f1_score(y, p, pos_label=1, average="binary", zero_division=0.0)),
    "matthews_correlation": lambda p, y: float(matthews_corrcoef(y, p)),
    "pearson": lambda p, y: _correlation(stats.pearsonr, "Pearson correlation", p, y),
    "spearmanr": lambda p, y: _correlation(stats.spearmanr, "Spearman correlation", p, y),
}


def glue_metrics(task: str | TaskSpec, predictions: Any, labels: Any) -> dict[str, float]:
    """Score `predictions` against `labels` with the task's GLUE metrics.

    Classification: `predictions` are class ids (take the argmax of the logits first). Regression (STS-B):
    real-valued scores. For MNLI call once per validation split and prefix the keys with the split name.
    """
    spec = get_task_spec(task)
    p = np.asarray(predictions)
    y = np.asarray(labels)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(
            f"predictions and labels must be 1-D and of the same length, got shapes {p.shape} and {y.shape}; "
            "for logits use compute_metrics_fn, which takes the argmax"
        )
    if p.size == 0:
        raise ValueError("no predictions to score; the evaluation set is empty")
    if spec.regression:
        p, y = p.astype(np.float64), y.astype(np.float64)
    elif p.dtype.kind not in "iu" or y.dtype.kind not in "iu":
        raise ValueError(
            f"task {spec.name!r} is a classification: predictions and labels must be integer class ids, got "
            f"{p.dtype} and {y.dtype}; take the argmax of the logits first"
        )
    unknown = [m for m in spec.metrics if m not in _METRICS]
    if unknown:
        raise ValueError(f"task {spec.name!r} asks for unknown metrics {unknown}; known: {', '.join(_METRICS)}")
    return {name: _METRICS[name](p, y) for name in spec.metrics}


def class_metrics(predictions: Any, labels: Any, num_labels: int) -> dict[str, float]:
    """Macro-averaged F1 over all `num_labels` classes and each class's recall (`recall_<c>`; NaN for a class absent
    from `labels`): how a model treats a minority class, which accuracy hides."""
    p, y = np.asarray(predictions), np.asarray(labels)
    classes = list(range(num_labels))
    out = {"macro_f1": float(f1_score(y, p, labels=classes, average="macro", zero_division=0.0))}
    for c in classes:
        support = int(np.sum(y == c))
        out[f"recall_{c}"] = float(np.sum((p == c) & (y == c)) / support) if support else float("nan")
    return out


def compute_metrics_fn(task: str | TaskSpec, *, per_class: bool = False) -> Callable[[Any], dict[str, float]]:
    """A `compute_metrics` for `transformers.Trainer`: argmax of the logits (classification) or the squeezed
    `(N, 1)` output (regression), then `glue_metrics`; with `per_class`, classification also gets `class_metrics`."""
    spec = get_task_spec(task)

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(logits, tuple):  # models may return extra outputs after the logits
            logits = logits[0]
        logits = np.asarray(logits)
        if spec.regression:
            predictions = logits.reshape(-1) if logits.ndim == 2 and logits.shape[1] == 1 else logits
        else:
            predictions = logits.argmax(axis=-1)
        labels = np.asarray(labels).reshape(-1)
        metrics = glue_metrics(spec, predictions, labels)
        if per_class and not spec.regression:
            metrics.update(class_metrics(predictions, labels, spec.num_labels))
        return metrics

    return compute_metrics
