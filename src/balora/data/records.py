"""Reading data files row by row: every bad row reported with its file and position, or skipped and counted.

Shared by the GLUE/classification loader (`balora.data.glue`) and the instruction loader (`balora.data.instruct`);
the file reader itself is `balora.io.iter_records`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset

from balora.io import DataError, iter_records
from balora.io import data_dir as default_data_dir

__all__ = ["DataError", "RowStats", "collect_rows", "default_data_dir", "iter_records", "subsample"]

logger = logging.getLogger(__name__)

SKIP_HINT = "fix the row, or set data.skip_bad_rows: true to skip bad rows (they are counted and reported)"
_MAX_REPORTED = 20  # bad rows listed one by one in the stats; all of them are counted


@dataclass
class RowStats:
    """What happened to the rows of one split; `problems` lists the first bad rows."""

    source: str
    rows: int = 0
    kept: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect_rows(
    records: Iterator[tuple[str, Any]], source: str, convert: Any, *, skip_bad_rows: bool
) -> tuple[list[dict[str, Any]], RowStats]:
    """Run `convert(record) -> row` on each record; a `DataError` from it aborts, or skips the row when asked."""
    rows: list[dict[str, Any]] = []
    stats = RowStats(source)
    for where, rec in records:
        stats.rows += 1
        try:
            if isinstance(rec, DataError):
                raise rec
            if not isinstance(rec, dict):
                raise DataError(f"expected an object with named fields, got {type(rec).__name__}")
            row = convert(rec)
        except DataError as e:
            if not skip_bad_rows:
                raise DataError(f"{source}, {where}: {e}; {SKIP_HINT}") from None
            stats.skipped += 1
            if len(stats.problems) < _MAX_REPORTED:
                stats.problems.append(f"{where}: {e}")
            continue
        row["idx"] = stats.rows - 1
        rows.append(row)
    stats.kept = len(rows)
    if stats.skipped:
        logger.warning("%s: skipped %d of %d rows (first: %s)", source, stats.skipped, stats.rows, stats.problems[0])
    if not rows:
        raise DataError(f"{source}: no usable rows ({stats.rows} read, {stats.skipped} bad: {stats.problems[:3]})")
    return rows, stats

def subsample(ds: Dataset, n: int | None, seed: int | None, what: str) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    if n <= 0:
        raise ValueError(f"{what} must be a positive number of rows or None, got {n}")
    if seed is None:
        return ds.select(range(n))
    # A seeded random subset in file order: the first n rows of a file sorted by label would hold one class.
    keep = np.sort(np.random.default_rng(seed).choice(len(ds), size=n, replace=False))
    return ds.select(keep.tolist())
