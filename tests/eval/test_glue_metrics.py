"""GLUE metrics against float64 references written from their definitions (no scikit-learn/scipy here)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from transformers import EvalPrediction

from balora.data.glue import GLUE_TASKS, TaskSpec
from balora.eval.glue_metrics import compute_metrics_fn, glue_metrics


def ref_accuracy(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(p == y))


def ref_f1_positive(p: np.ndarray, y: np.ndarray) -> float:
    tp = float(np.sum((p == 1) & (y == 1)))
    fp = float(np.sum((p == 1) & (y == 0)))
    fn = float(np.sum((p == 0) & (y == 1)))
    return 2 * tp / (2 * tp + fp + fn)


def ref_matthews(p: np.ndarray, y: np.ndarray) -> float:
    tp = float(np.sum((p == 1) & (y == 1)))
    tn = float(np.sum((p == 0) & (y == 0)))
    fp = float(np.sum((p == 1) & (y == 0)))
    fn = float(np.sum((p == 0) & (y == 1)))
    return (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))


def ref_pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    da, db = a - a.mean(), b - b.mean()
    return float(np.sum(da * db) / math.sqrt(np.sum(da * da) * np.sum(db * db)))


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 1-based."""
    out = np.empty(len(x))
    for v in np.unique(x):
        where = np.flatnonzero(x == v)
        below = np.sum(x < v)
        out[where] = below + (len(where) + 1) / 2
    return out


@pytest.fixture
def binary() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 501)
    p = np.where(rng.random(501) < 0.7, y, 1 - y)  # ~70 % right
    return p, y


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "wnli"])
def test_accuracy_tasks(task: str, binary: tuple[np.ndarray, np.ndarray]) -> None:
    p, y = binary
    assert glue_metrics(task, p, y) == pytest.approx({"accuracy": ref_accuracy(p, y)}, abs=1e-12)


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_f1_tasks(task: str, binary: tuple[np.ndarray, np.ndarray]) -> None:
    p, y = binary
    out = glue_metrics(task, p, y)
    assert out == pytest.approx({"accuracy": ref_accuracy(p, y), "f1": ref_f1_positive(p, y)}, abs=1e-12)
    # F1 is of class 1: swapping the classes changes it.
    assert glue_metrics(task, 1 - p, 1 - y)["f1"] == pytest.approx(ref_f1_positive(1 - p, 1 - y), abs=1e-12)


def test_cola_matthews(binary: tuple[np.ndarray, np.ndarray]) -> None:
    p, y = binary
    assert glue_metrics("cola", p, y) == pytest.approx({"matthews_correlation": ref_matthews(p, y)}, abs=1e-12)
    assert glue_metrics("cola", y, y)["matthews_correlation"] == pytest.approx(1.0)
    assert glue_metrics("cola", 1 - y, y)["matthews_correlation"] == pytest.approx(-1.0)


def test_mnli_three_classes() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 300)
    p = rng.integers(0, 3, 300)
    assert glue_metrics("mnli", p, y) == pytest.approx({"accuracy": ref_accuracy(p, y)}, abs=1e-12)


def test_stsb_correlations() -> None:
    rng = np.random.default_rng(2)
    y = np.round(rng.uniform(0, 5, 400) * 5) / 5  # many ties, as in STS-B
    p = (y + rng.normal(0, 1, 400)).astype(np.float32)
    out = glue_metrics("stsb", p, y)
    assert out["pearson"] == pytest.approx(ref_pearson(p, y), abs=1e-9)
    assert out["spearmanr"] == pytest.approx(ref_pearson(ranks(p), ranks(y)), abs=1e-9)


def test_constant_regression_output_is_nan(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        out = glue_metrics("stsb", np.full(5, 2.0), np.arange(5.0))
    assert math.isnan(out["pearson"]) and math.isnan(out["spearmanr"])
    assert "undefined" in caplog.text


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="same length"):
        glue_metrics("sst2", [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="argmax"):
        glue_metrics("sst2", np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="integer class ids"):
        glue_metrics("sst2", [0.2, 0.9], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        glue_metrics("sst2", [], [])


def test_compute_metrics_fn_classification_and_regression() -> None:
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [-1.0, 1.0], [0.5, 0.4]], dtype=np.float32)
    labels = np.array([0, 1, 0, 1])
    out = compute_metrics_fn("mrpc")(EvalPrediction(predictions=(logits, np.zeros(4)), label_ids=labels))
    p = np.array([0, 1, 1, 0])
    assert out == pytest.approx({"accuracy": 0.5, "f1": ref_f1_positive(p, labels)})
    scores = np.array([[0.5], [1.5], [4.0], [3.0]], dtype=np.float32)
    gold = np.array([0.0, 2.0, 5.0, 2.5])
    out = compute_metrics_fn("stsb")(EvalPrediction(predictions=scores, label_ids=gold))
    assert out["pearson"] == pytest.approx(ref_pearson(scores[:, 0], gold), abs=1e-6)
    assert out["spearmanr"] == pytest.approx(1.0)


def test_custom_task_spec_metrics() -> None:
    spec = TaskSpec("reviews", ("text",), num_labels=5)
    assert spec.metrics == ("accuracy",)
    assert glue_metrics(spec, [0, 4, 3], [0, 4, 4]) == pytest.approx({"accuracy": 2 / 3})
    assert set(glue_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 2.5, 2.9])) == set(GLUE_TASKS["stsb"].metrics)
