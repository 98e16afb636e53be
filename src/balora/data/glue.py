"""GLUE tasks (Wang et al., 2019) and other sentence(-pair) classification or regression data.

The BA-LoRA paper (arXiv 2408.04556, Sec. 4) fine-tunes encoders on GLUE. Data comes from local files (jsonl, json,
csv, tsv, parquet) or the Hugging Face Hub (`nyu-mll/glue`). Local files are parsed here rather than by `datasets` so
that a bad row is reported with its file and line number; the result is a `datasets.DatasetDict` with the task's text
fields, `label` (int, or float for regression) and `idx` (the row's 0-based position in its source).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Features, Value
from transformers import PreTrainedTokenizerBase

from balora.data.records import DataError, RowStats, collect_rows, default_data_dir, iter_records, subsample
from balora.io import FILE_SUFFIXES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """A sentence or sentence-pair task: which columns hold the text and the label, and how it is scored."""

    name: str
    text_fields: tuple[str, ...]  # one field, or two for sentence pairs
    num_labels: int  # 1 for regression
    regression: bool = False
    label_field: str = "label"
    metrics: tuple[str, ...] = ()  # empty: accuracy, or pearson/spearmanr for regression
    validation_splits: tuple[str, ...] = ("validation",)
    hub: tuple[str, str] | None = None  # (path, config name) for datasets.load_dataset

    def __post_init__(self) -> None:
        if len(self.text_fields) not in (1, 2):
            raise ValueError(f"task {self.name!r}: text_fields must name 1 or 2 columns, got {list(self.text_fields)}")
        if self.regression and self.num_labels != 1:
            raise ValueError(f"task {self.name!r}: a regression task has num_labels=1, got {self.num_labels}")
        if not self.regression and self.num_labels < 2:
            raise ValueError(
                f"task {self.name!r}: classification needs num_labels >= 2, got {self.num_labels}; "
                "set regression=True for a real-valued label"
            )
        if not self.metrics:
            object.__setattr__(self, "metrics", ("pearson", "spearmanr") if self.regression else ("accuracy",))

    @property
    def problem_type(self) -> str:
        """The `problem_type` for `AutoModelForSequenceClassification`."""
        return "regression" if self.regression else "single_label_classification"


def _glue(name: str, fields: tuple[str, ...], num_labels: int = 2, **kw: Any) -> TaskSpec:
    return TaskSpec(name, fields, num_labels, hub=("nyu-mll/glue", name), **kw)


GLUE_TASKS: dict[str, TaskSpec] = {
    "cola": _glue("cola", ("sentence",), metrics=("matthews_correlation",)),
    "sst2": _glue("sst2", ("sentence",)),
    "mrpc": _glue("mrpc", ("sentence1", "sentence2"), metrics=("accuracy", "f1")),
    "qqp": _glue("qqp", ("question1", "question2"), metrics=("accuracy", "f1")),
    "stsb": _glue("stsb", ("sentence1", "sentence2"), 1, regression=True),
    "mnli": _glue(
        "mnli", ("premise", "hypothesis"), 3, validation_splits=("validation_matched", "validation_mismatched")
    ),
    "qnli": _glue("qnli", ("question", "sentence")),
    "rte": _glue("rte", ("sentence1", "sentence2")),
    "wnli": _glue("wnli", ("sentence1", "sentence2")),
}


def get_task_spec(task: str | TaskSpec) -> TaskSpec:
    """Return the spec of a GLUE task name, or `task` itself when it is already a `TaskSpec`."""
    if isinstance(task, TaskSpec):
        return task
    if task not in GLUE_TASKS:
        raise ValueError(
            f"unknown GLUE task {task!r}; choose one of {', '.join(GLUE_TASKS)}, or describe your data with "
            "TaskSpec(name, text_fields=..., num_labels=..., regression=...)"
        )
    return GLUE_TASKS[task]


def _text(rec: Mapping[str, Any], name: str) -> str:
    value = rec.get(name)
    if value is None:
        raise DataError(f"missing field {name!r} (fields present: {sorted(rec)})")
    if not isinstance(value, str):
        raise DataError(f"field {name!r} is {type(value).__name__} {value!r}, expected text")
    if not value.strip():
        raise DataError(f"field {name!r} is empty")
    return value


def _label(value: Any, spec: TaskSpec) -> int | float:
    if value is None:
        raise DataError(f"missing label field {spec.label_field!r}")
    if isinstance(value, str):  # csv/tsv cells are text; a numeric string is read as its number everywhere
        try:
            value = float(value) if spec.regression else int(value)
        except ValueError:
            kind = "a number" if spec.regression else "an integer class id"
            raise DataError(f"label {value!r} is not {kind}") from None
    if spec.regression:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise DataError(f"label {value!r} is not a finite number (task {spec.name!r} is a regression)")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"label {value!r} is {type(value).__name__}, expected an integer class id")
    if not 0 <= value < spec.num_labels:
        hint = " (-1 marks the unlabeled GLUE test split)" if value == -1 else ""
        raise DataError(f"label {value} is out of range 0..{spec.num_labels - 1}{hint}")
    return value


def _features(spec: TaskSpec) -> Features:
    cols = {f: Value("string") for f in spec.text_fields}
    return Features({**cols, "label": Value("float32" if spec.regression else "int64"), "idx": Value("int64")})


def _split_dataset(
    spec: TaskSpec, records: Iterator[tuple[str, Any]], source: str, skip_bad_rows: bool
) -> tuple[Dataset, RowStats]:
    def convert(rec: Mapping[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {f: _text(rec, f) for f in spec.text_fields}
        row["label"] = _label(rec.get(spec.label_field), spec)
        return row

    rows, stats = collect_rows(records, source, convert, skip_bad_rows=skip_bad_rows)
    return Dataset.from_list(rows, features=_features(spec)), stats


# ---------------------------------------------------------------- locating and loading splits


def _find_split_file(folder: Path, split: str) -> Path | None:
    found = [folder / f"{split}{s}" for s in FILE_SUFFIXES if (folder / f"{split}{s}").is_file()]
    if len(found) > 1:
        raise DataError(f"{folder} holds several files for split {split!r}: {[p.name for p in found]}; keep one")
    return found[0] if found else None


def _split_sources(
    spec: TaskSpec,
    train_file: str | Path | None,
    validation_file: str | Path | Mapping[str, str | Path] | None,
    data_dir: str | Path | None,
) -> dict[str, Path | None]:
    """Map each split to a local file, or None for the Hub."""
    sources: dict[str, Path | None] = {"train": Path(train_file) if train_file else None}
    if isinstance(validation_file, Mapping):
        unknown = set(validation_file) - set(spec.validation_splits)
        if unknown:
            raise DataError(
                f"validation_file names splits {sorted(unknown)}; task {spec.name!r} has "
                f"{list(spec.validation_splits)}"
            )
        sources.update({s: Path(validation_file[s]) if s in validation_file else None for s in spec.validation_splits})
    else:
        sources.update({s: None for s in spec.validation_splits})
        if validation_file:
            sources[spec.validation_splits[0]] = Path(validation_file)
    if data_dir is not None:
        folder = Path(data_dir)
        if not folder.is_dir():
            raise DataError(f"data_dir {folder} does not exist; point data.data_dir at a folder with train.jsonl etc.")
    else:
        repo_data = default_data_dir()
        folder = repo_data / "glue" / spec.name if repo_data is not None else None
    for split, path in sources.items():
        if path is None and folder is not None and folder.is_dir():
            sources[split] = _find_split_file(folder, split)
        if sources[split] is None and data_dir is not None:
            raise DataError(
                f"data_dir {data_dir} has no file for split {split!r} (looked for {split}.jsonl, "
                f"{split}.json, {split}.csv, {split}.tsv, {split}.parquet)"
            )
    return sources


def _hub_split(spec: TaskSpec, split: str) -> Dataset:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    if spec.hub is None:
        raise DataError(
            f"task {spec.name!r} has no file for split {split!r} and no Hub dataset; pass "
            "data.train_file and data.validation_file"
        )
    try:
        return datasets.load_dataset(*spec.hub, split=split)
    except (OSError, DatasetNotFoundError) as e:  # ConnectionError is an OSError
        raise DataError(
            f"could not load {spec.hub[0]}/{spec.hub[1]} split {split!r} from the Hugging Face Hub ({e}); offline, "
            f"pass local files with data.train_file / data.validation_file (jsonl, json, csv, tsv or parquet with "
            f"columns {list(spec.text_fields)} and {spec.label_field!r})"
        ) from e


def load_glue(
    task: str | TaskSpec,
    *,
    train_file: str | Path | None = None,
    validation_file: str | Path | Mapping[str, str | Path] | None = None,
    data_dir: str | Path | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    skip_bad_rows: bool = False,
    seed: int = 42,
    only: Sequence[str] | None = None,
) -> tuple[DatasetDict, dict[str, dict[str, Any]]]:
    """Load the train and validation splits of `task`; return `(splits, stats)` with per-split row counts.

    Where each split comes from, first match wins: `train_file` / `validation_file` (a path fills the task's first
    validation split; a mapping names splits, e.g. MNLI's `validation_mismatched`), then `data_dir/<split>.<ext>`,
    then the repository's `data/glue/<task>/`, then the Hub. Every row is validated; a bad row raises `DataError`
    naming the file and line, or is skipped and counted with `skip_bad_rows`. `max_train_samples` keeps a random
    subset drawn with `seed` (in file order); `max_eval_samples` keeps the first rows of each validation split.
    `only` names the splits to read (default: all); a split left out is never opened.
    """
    spec = get_task_spec(task)
    splits: dict[str, Dataset] = {}
    stats: dict[str, dict[str, Any]] = {}
    for split, path in _split_sources(spec, train_file, validation_file, data_dir).items():
        if only is not None and split not in only:
            continue
        if path is not None:
            source, records = str(path), iter_records(path)
        else:
            hub = _hub_split(spec, split)
            source = f"hub:{spec.hub[0]}/{spec.hub[1]}[{split}]" if spec.hub else split
            records = ((f"row {n}", rec) for n, rec in enumerate(hub, start=1))
        ds, row_stats = _split_dataset(spec, records, source, skip_bad_rows)
        if split == "train":
            ds = subsample(ds, max_train_samples, seed, "max_train_samples")
        else:
            ds = subsample(ds, max_eval_samples, None, "max_eval_samples")
        splits[split] = ds
        stats[split] = {**row_stats.as_dict(), "used": len(ds)}
        logger.info("%s %s: %d rows from %s", spec.name, split, len(ds), source)
    return DatasetDict(splits), stats


def tokenize_glue(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, task_spec: TaskSpec, max_length: int
) -> Dataset:
    """Tokenise the text field(s) (pairs as `[CLS] a [SEP] b [SEP]`), truncated to `max_length`, without padding.

    Returns `input_ids`, `attention_mask` (and `token_type_ids` when the tokenizer makes them) and `labels`
    (float for regression). Batch with `transformers.DataCollatorWithPadding(tokenizer)`.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    missing = [c for c in (*task_spec.text_fields, "label") if c not in dataset.column_names]
    if missing:
        raise DataError(f"dataset lacks columns {missing} (has {dataset.column_names}); load it with load_glue")

    def encode(batch: dict[str, Sequence[Any]]) -> dict[str, Any]:
        texts = [batch[f] for f in task_spec.text_fields]
        out = dict(tokenizer(*texts, truncation=True, max_length=max_length))
        out["labels"] = [float(x) for x in batch["label"]] if task_spec.regression else list(batch["label"])
        return out

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=f"tokenizing {task_spec.name}")
