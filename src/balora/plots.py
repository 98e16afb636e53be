"""PNG plots of training curves and method comparisons (matplotlib, headless)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from balora.losses import LOSS_TERMS


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)  # unique, beside the target
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return out


def plot_training_curves(
    histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike[str], *, title: str = ""
) -> Path:
    """One panel per loss term (task loss and each regularizer) against the step, one line per run."""
    plt = _pyplot()
    present = [t for t in LOSS_TERMS if any(t in entry for h in histories.values() for entry in h)]
    if not present:
        raise ValueError("no loss terms in the log history; was anything logged (training.logging_steps)?")
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.4), squeeze=False)
    for ax, term in zip(axes[0], present, strict=True):
        for index, (name, history) in enumerate(histories.items()):
            points = [(e["step"], e[term]) for e in history if term in e and "step" in e]
            if points:  # one colour per run in every panel, so a run without a term leaves its colour unused
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="o", markersize=2.5, label=name, color=f"C{index}")
        ax.legend(fontsize=8)
        ax.set_title(term.replace("_", " "))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_metric_bars(
    values: Mapping[str, float], path: str | os.PathLike[str], *, metric: str, title: str = ""
) -> Path:
    """A bar per method for one metric (e.g. validation accuracy)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(values), 3.4))
    names = list(values)
    bars = ax.bar(names, [values[n] for n in names], color=["#888888", "#1f77b4", "#d62728", "#2ca02c"][: len(names)])
    for bar, name in zip(bars, names, strict=True):
        ax.annotate(
            f"{values[name]:.3f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_ylabel(metric)
    low = min(values.values())
    ax.set_ylim(max(0.0, low - 0.1), max(values.values()) + 0.05)
    ax.set_title(title or metric)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
