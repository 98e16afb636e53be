"""Reading evaluation data (JSONL, JSON, gzip) with errors that name file and line; atomic writing of results."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _open_text(path: Path):  # noqa: ANN202 - a text file object
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_rows(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a `.jsonl`/`.jsonl.gz` file (one JSON object a line) or a `.json` file (a list of objects).

    Returns (line, row) pairs: the 1-based line number for JSONL, the 1-based position in the list for JSON, so that
    later checks can name where a bad row is. Blank lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist (or is not a file); check the path")
    name = path.name.removesuffix(".gz")
    if name.endswith(".jsonl"):
        rows = []
        with _open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(
                        f"{path}:{line_no}: not valid JSON ({exc.msg} at column {exc.colno}); "
                        "a .jsonl file needs one JSON object per line"
                    ) from exc
                rows.append((line_no, _check_object(row, path, line_no)))
        return rows
    if name.endswith(".json"):
        with _open_text(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(data, list):
            raise ValueError(f"{path}: a .json data file must hold a list of objects, got {type(data).__name__}")
        return [(i, _check_object(row, path, i, what="item")) for i, row in enumerate(data, start=1)]
    raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use .jsonl, .jsonl.gz or .json")


def _check_object(row: Any, path: Path, position: int, what: str = "line") -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{position}: each {what} must be a JSON object, got {type(row).__name__}")
    return row


def require_fields(row: dict[str, Any], fields: Iterable[str], path: str | os.PathLike, line: int, task: str) -> None:
    """Raise a ValueError naming file, line and the missing fields when `row` lacks any of `fields`."""
    missing = [f for f in fields if f not in row]
    if missing:
        raise ValueError(
            f"{path}:{line}: {task} row has no field(s) {missing} (it has {sorted(row)}); "
            f"{task} rows need {list(fields)}"
        )


def _write_atomic(path: Path, write) -> None:  # noqa: ANN001 - write(file) callback
    """Write to a temporary file in the same directory, fsync, then rename over `path`: never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    _write_atomic(Path(path), lambda f: f.write(text))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    _write_atomic(Path(path), lambda f: f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n"))


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    def write(f) -> None:  # noqa: ANN001
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    _write_atomic(Path(path), write)
