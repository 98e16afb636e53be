"""Files, in one place: the repository root, reading data rows, and writing results atomically.

Readers name the file and the row of every problem (`DataError`, a user error: `balora` exits 2 with its message).
Writers never leave a half-written file or folder: they write beside the target under a unique temporary name and
rename it into place.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[2]  # the source checkout (src/balora/io.py -> the repository)
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")  # each also as .gz but parquet


class DataError(ValueError):
    """A data file or row is unusable; the message names the file, the row and the fix."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file that does not exist, or is not a file."""


def data_dir() -> Path | None:
    """The repository's `data/` folder when balora runs from a source checkout, else None."""
    data = REPO_ROOT / "data"
    return data if (REPO_ROOT / "pyproject.toml").is_file() and data.is_dir() else None


def check_file(path: str | os.PathLike, what: str = "data file", hint: str = "check the path") -> Path:
    """`path` as a Path if it is an existing file; otherwise a DataError that says what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise DataFileNotFoundError(f"{what} {str(path)!r} is a directory, not a file; give the file inside it")
    if not path.is_file():
        raise DataFileNotFoundError(f"{what} {str(path)!r} does not exist (or is not a file); {hint}")
    return path


def _open_text(path: Path, **kwargs: Any) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", **kwargs)
    return path.open(encoding="utf-8-sig", **kwargs)


def read_text(path: str | os.PathLike, what: str = "data file", hint: str = "check the path") -> str:
    """The whole text of a UTF-8 file (a byte-order mark is dropped); DataError if it is missing or not UTF-8."""
    path = check_file(path, what, hint)
    try:
        with _open_text(path) as f:
            return f.read()
    except UnicodeDecodeError as error:
        raise _not_utf8(path, what, error) from None


def _not_utf8(path: Path, what: str, error: UnicodeDecodeError) -> DataError:
    return DataError(f"{what} {path} is not UTF-8 text (byte {error.object[error.start:error.start + 1]!r} at "
                     f"position {error.start}); save it as UTF-8")


# ---------------------------------------------------------------------------------------------------- reading rows


def iter_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """Yield `(where, record)` for each row of a jsonl, json, csv, tsv (each optionally .gz) or parquet file.

    `where` is "line N" (1-based, jsonl/csv/tsv), "record N" (1-based position in a JSON list) or "row N" (parquet).
    A row that cannot be parsed is yielded as a `DataError`, so that callers can skip and count it; a file that is
    missing, of an unknown type or not UTF-8 raises `DataError`.
    """
    path = check_file(path, hint="check data.train_file / data.validation_file")
    try:
        yield from _records(path)
    except UnicodeDecodeError as error:
        raise _not_utf8(path, "data file", error) from None


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = Path(path.name.removesuffix(".gz")).suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and not _is_json_document(path)):
        with _open_text(path) as f:
            for n, line in enumerate(f, start=1):
                if line.strip():  # blank lines (e.g. a trailing newline) are not rows
                    try:
                        yield f"line {n}", json.loads(line)
                    except json.JSONDecodeError as e:
                        yield f"line {n}", DataError(f"not valid JSON ({e.msg} at column {e.colno})")
    elif suffix == ".json":
        with _open_text(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}; "
                            "write a list, or one object per line in a .jsonl file")
        yield from ((f"record {n}", rec) for n, rec in enumerate(data, start=1))
    elif suffix in (".csv", ".tsv"):
        with _open_text(path, newline="") as f:
            # GLUE's TSVs contain bare double quotes, so tab files are read without quoting.
            quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",", quoting=quoting)
            for rec in reader:
                if None in rec:
                    yield f"line {reader.line_num}", DataError(f"more fields than the header's {reader.fieldnames}")
                else:
                    yield f"line {reader.line_num}", rec
    elif suffix == ".parquet" and path.suffix != ".gz":
        import pyarrow.parquet as pq

        yield from ((f"row {n}", rec) for n, rec in enumerate(pq.read_table(path).to_pylist(), start=1))
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def _is_json_document(path: Path) -> bool:
    """A `.json` file holding one document (a list), as opposed to JSON lines saved with a `.json` name."""
    with _open_text(path) as f:
        head = f.read(4096).lstrip()
    return head.startswith("[")


def read_rows(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    """Every row of a data file as (position, object) pairs, strictly: the first bad row raises `DataError`.

    The position is the 1-based line (jsonl, csv, tsv), list position (json) or row (parquet), so that later checks
    can name `path:position`.
    """
    rows = []
    for where, record in iter_records(path):
        position = int(where.split()[-1])
        if isinstance(record, DataError):
            raise DataError(f"{path}:{position}: {record}; a .jsonl file needs one JSON object per line")
        if not isinstance(record, dict):
            kind = where.split()[0]
            raise DataError(f"{path}:{position}: each {kind} must be a JSON object, got {type(record).__name__}")
        rows.append((position, record))
    return rows


def require_fields(row: dict[str, Any], fields: Iterable[str], path: str | os.PathLike, line: int, task: str) -> None:
    """Raise a DataError naming file, line and the missing fields when `row` lacks any of `fields`."""
    missing = [f for f in fields if f not in row]
    if missing:
        raise DataError(f"{path}:{line}: {task} row has no field(s) {missing} (it has {sorted(row)}); "
                        f"{task} rows need {list(fields)}")


# ---------------------------------------------------------------------------------------------------- writing


def _write_atomic(path: Path, write: Any) -> None:
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
    def write(f: IO[str]) -> None:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    _write_atomic(Path(path), write)


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary folder beside `target`, renamed to `target` when the block ends without an error.

    The folder's name is unique (never an existing sibling such as `OUT.tmp`); on an error it is removed and
    `target` is left as it was. `target` must not exist, or be an empty folder (it is replaced).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.is_dir():
            target.rmdir()  # empty (checked by the caller); rmdir refuses anything else
        tmp.replace(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_empty_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder with nothing in it."""
    path = Path(path)
    return path.is_dir() and next(path.iterdir(), None) is None
