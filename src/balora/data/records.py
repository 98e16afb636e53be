"""Reading data files row by row: every bad row reported with its file and position, or skipped and counted.

Shared by the GLUE/classification loader (`balora.data.glue`) and the instruction loader (`balora.data.instruct`).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

logger = logging.getLogger(__name__)

SKIP_HINT = "fix the row, or set data.skip_bad_rows: true to skip bad rows (they are counted and reported)"
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
_MAX_REPORTED = 20  # bad rows listed one by one in the stats; all of them are counted

class DataError(ValueError):
    """A data file or row is unusable; the message names the file, the row and the fix."""

def default_data_dir() -> Path | None:
    """The repository's `data/` folder when balora runs from a source checkout, else None."""
    root = Path(__file__).resolve().parents[3]
    return root / "data" if (root / "pyproject.toml").is_file() and (root / "data").is_dir() else None


# ---------------------------------------------------------------- reading files


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield `(where, record)` for each row of a jsonl, json, csv, tsv or parquet file.

    `where` is "line N" (1-based, jsonl/csv/tsv), "record N" (1-based position in a JSON list) or "row N" (parquet).
    A record that cannot be parsed is yielded as a `DataError` so callers can skip and count it.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check data.train_file / data.validation_file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and not _is_json_document(path)):
        with path.open(encoding="utf-8-sig") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():  # blank lines (e.g. a trailing newline) are not rows
                    try:
                        yield f"line {n}", json.loads(line)
                    except json.JSONDecodeError as e:
                        yield f"line {n}", DataError(f"invalid JSON ({e.msg} at column {e.colno})")
    elif suffix == ".json":
        with path.open(encoding="utf-8-sig") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise DataError(
                f"{path}: expected a JSON list of objects, got {type(data).__name__}; "
                "write a list, or one object per line in a .jsonl file"
            )
        yield from ((f"record {n}", rec) for n, rec in enumerate(data, start=1))
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8-sig", newline="") as f:
            # GLUE's TSVs contain bare double quotes, so tab files are read without quoting.
            quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",", quoting=quoting)
            for rec in reader:
                if None in rec:
                    yield f"line {reader.line_num}", DataError(f"more fields than the header's {reader.fieldnames}")
                else:
                    yield f"line {reader.line_num}", rec
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from ((f"row {n}", rec) for n, rec in enumerate(pq.read_table(path).to_pylist(), start=1))
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def _is_json_document(path: Path) -> bool:
    """A `.json` file holding one document (a list), as opposed to JSON lines saved with a `.json` name."""
    with path.open(encoding="utf-8-sig") as f:
        head = f.read(4096).lstrip()
    return head.startswith("[")


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
