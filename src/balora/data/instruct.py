"""Instruction-tuning data for causal LMs: loading, prompt rendering, response-only labels, padding.

BA-LoRA's NLG experiments (arXiv 2408.04556, Sec. 4) follow PiSSA: MetaMathQA / Code-Feedback / WizardLM-style data in
the Alpaca prompt, the loss taken on response tokens only. Three row formats are read and normalised to
`instruction`, `input`, `output`:

- `alpaca`: `instruction`, optional `input`, `output`;
- `query_response` (MetaMathQA): `query`, `response`;
- `gsm8k`: `question`, `answer` (the answer ends with a `#### <number>` line).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from balora.data.records import DataError, collect_rows, iter_records, subsample
from balora.data.templates import TemplateName, render_prompt, response_prefix
from balora.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)

InstructFormat = Literal["auto", "alpaca", "query_response", "gsm8k"]
GSM8KAnswer = Literal["keep", "the_answer_is"]

# format -> (prompt field, response field); alpaca also has an optional `input`.
FORMAT_FIELDS: dict[str, tuple[str, str]] = {
    "alpaca": ("instruction", "output"),
    "query_response": ("query", "response"),
    "gsm8k": ("question", "answer"),
}
_GSM8K_FINAL = re.compile(r"\n?####\s*(?P<answer>[^\n]*?)\s*\Z")


def detect_format(columns: Sequence[str]) -> str:
    """Name the format whose two fields are among `columns`; error when none or several match."""
    matches = [name for name, (prompt, response) in FORMAT_FIELDS.items() if prompt in columns and response in columns]
    if len(matches) != 1:
        found = "none" if not matches else f"several ({', '.join(matches)})"
        raise DataError(
            f"cannot tell the instruction format from the columns {sorted(columns)}: {found} of alpaca "
            "(instruction, output), query_response (query, response), gsm8k (question, answer) match; set data.format"
        )
    return matches[0]


def gsm8k_answer_is(answer: str) -> str:
    """Rewrite GSM8K's final `#### 1,080` line as `The answer is: 1080` (MetaMathQA's convention, commas dropped)."""
    match = _GSM8K_FINAL.search(answer)
    if match is None or not match.group("answer"):
        raise DataError("the GSM8K answer has no final '#### <number>' line to rewrite; use gsm8k_answer: keep")
    final = match.group("answer").replace(",", "")
    body = answer[: match.start()].rstrip()
    return f"{body}\nThe answer is: {final}" if body else f"The answer is: {final}"


def _field(rec: Mapping[str, Any], name: str, *, required: bool = True) -> str:
    value = rec.get(name)
    if value is None:
        if required:
            raise DataError(f"missing field {name!r} (fields present: {sorted(rec)})")
        return ""
    if not isinstance(value, str):
        raise DataError(f"field {name!r} is {type(value).__name__} {value!r}, expected text")
    if required and not value.strip():
        raise DataError(f"field {name!r} is empty")
    return value


def _converter(fmt: str, gsm8k_answer: GSM8KAnswer) -> Any:
    prompt_field, response_field = FORMAT_FIELDS[fmt]

    def convert(rec: Mapping[str, Any]) -> dict[str, Any]:
        output = _field(rec, response_field)
        if fmt == "gsm8k" and gsm8k_answer == "the_answer_is":
            output = gsm8k_answer_is(output)
        extra = _field(rec, "input", required=False) if fmt == "alpaca" else ""
        return {"instruction": _field(rec, prompt_field), "input": extra, "output": output}

    return convert


def load_instruct(
    source: str | Path | Dataset,
    *,
    format: InstructFormat = "auto",
    max_train_samples: int | None = None,
    skip_bad_rows: bool = False,
    seed: int = 42,
    gsm8k_answer: GSM8KAnswer = "keep",
) -> tuple[Dataset, dict[str, Any]]:
    """Read instruction rows from a file (jsonl, json, csv, tsv, parquet) or a `Dataset`; return `(dataset, stats)`.

    The dataset has `instruction`, `input` ("" when absent), `output` and `idx` (0-based row in the source). A
    missing field, a non-text value or an empty instruction/output raises `DataError` naming the file and row, or is
    skipped and counted with `skip_bad_rows`. `gsm8k_answer="the_answer_is"` rewrites the final `#### n` line as
    `The answer is: n`; the default keeps the answer as written. `max_train_samples` keeps a seeded random subset.
    """
    if format not in ("auto", *FORMAT_FIELDS):
        raise ValueError(
            f"unknown instruction format {format!r}; choose 'auto', {', '.join(map(repr, FORMAT_FIELDS))}"
        )
    if gsm8k_answer not in ("keep", "the_answer_is"):
        raise ValueError(f"unknown gsm8k_answer {gsm8k_answer!r}; choose 'keep' or 'the_answer_is'")
    if isinstance(source, Dataset):
        name = "dataset"
        records: list[tuple[str, Any]] = [(f"row {n}", rec) for n, rec in enumerate(source, start=1)]
    else:
        name = str(source)
        records = list(iter_records(source))
    fmt = format
    if fmt == "auto":
        first = next((rec for _, rec in records if isinstance(rec, dict)), None)
        if first is None:
            raise DataError(f"{name}: no row with named fields; expected objects with instruction/output etc.")
        fmt = detect_format(list(first))
    rows, row_stats = collect_rows(iter(records), name, _converter(fmt, gsm8k_answer), skip_bad_rows=skip_bad_rows)
    ds = subsample(Dataset.from_list(rows), max_train_samples, seed, "max_train_samples")
    stats = {**row_stats.as_dict(), "format": fmt, "used": len(ds)}
    logger.info("%s: %d rows in %s format (%d skipped)", name, len(ds), fmt, row_stats.skipped)
    return ds, stats


def tokenize_instruct(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    template: TemplateName = "alpaca",
) -> tuple[Dataset, dict[str, int]]:
    """Tokenise rows as prompt + response prefix + response + eos, supervising only the response part.

    `labels` equal `input_ids` on the response and eos tokens and are -100 on the prompt (unshifted: the model shifts
    them). The prompt and the response are tokenised separately and concatenated, so the mask boundary is exact. A
    row longer than `max_length` is cut from the right (the response loses its end and the eos); a row whose prompt
    alone fills `max_length` has no supervised token left and is dropped, counted in the returned stats and logged.
    """
    if max_length <= 1:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos token, which ends every response; set tokenizer.eos_token")
    missing = [c for c in ("instruction", "input", "output") if c not in dataset.column_names]
    if missing:
        raise DataError(f"dataset lacks columns {missing} (has {dataset.column_names}); load it with load_instruct")
    prompts = [
        render_prompt(ins, inp or None, template=template, tokenizer=tokenizer)
        for ins, inp in zip(dataset["instruction"], dataset["input"], strict=True)
    ]
    prefix = response_prefix(template)
    # A chat template writes its own special tokens (BOS included) into the prompt text.
    prompt_ids = tokenizer(prompts, add_special_tokens=template != "chat")["input_ids"]
    response_ids = tokenizer([prefix + out for out in dataset["output"]], add_special_tokens=False)["input_ids"]
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    stats = {"rows": len(dataset), "kept": 0, "dropped_no_response_tokens": 0, "truncated": 0, "supervised_tokens": 0}
    for p_ids, r_ids in zip(prompt_ids, response_ids, strict=True):
        target = [*r_ids, tokenizer.eos_token_id]
        room = max_length - len(p_ids)
        if room <= 0:
            stats["dropped_no_response_tokens"] += 1
            continue
        if len(target) > room:
            stats["truncated"] += 1
            target = target[:room]
        out["input_ids"].append([*p_ids, *target])
        out["attention_mask"].append([1] * (len(p_ids) + len(target)))
        out["labels"].append([IGNORE_INDEX] * len(p_ids) + target)
        stats["supervised_tokens"] += len(target)
    stats["kept"] = len(out["input_ids"])
    if not stats["kept"]:
        raise DataError(
            f"all {stats['rows']} rows have prompts of {max_length} tokens or more, leaving no response token to "
            "train on; raise data.max_length"
        )
    if stats["dropped_no_response_tokens"]:
        logger.warning(
            "dropped %d of %d rows whose prompt fills max_length=%d (no response token left); raise max_length to "
            "keep them",
            stats["dropped_no_response_tokens"],
            stats["rows"],
            max_length,
        )
    logger.info(
        "tokenized %d rows (%d truncated, %d supervised tokens)",
        stats["kept"],
        stats["truncated"],
        stats["supervised_tokens"],
    )
    return Dataset.from_dict(out), stats


@dataclass
class CausalLMCollator:
    """Right-pad a batch: `input_ids` with `pad_token_id`, `attention_mask` with 0, `labels` with -100."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError("pad_token_id is None; give the tokenizer a pad token (load_model uses eos)")

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        for f in features:
            if not len(f["input_ids"]) == len(f["attention_mask"]) == len(f["labels"]):
                raise ValueError(
                    "a feature's input_ids, attention_mask and labels differ in length; build the rows "
                    "with tokenize_instruct"
                )
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = -(-longest // self.pad_to_multiple_of) * self.pad_to_multiple_of
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch: dict[str, torch.Tensor] = {}
        for key, value in fill.items():
            rows = [list(f[key]) for f in features]
            batch[key] = torch.tensor([row + [value] * (longest - len(row)) for row in rows], dtype=torch.long)
        return batch
