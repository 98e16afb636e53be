"""Instruction data: formats, bad rows, the response-only label mask, truncation, the causal-LM collator."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from balora.data.instruct import (
    IGNORE_INDEX,
    CausalLMCollator,
    detect_format,
    gsm8k_answer_is,
    load_instruct,
    tokenize_instruct,
)
from balora.data.records import DataError, default_data_dir
from balora.data.templates import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, render_prompt, response_prefix

ROWS = [
    {"instruction": "Write a function that adds two numbers.", "input": "", "output": "def add(a, b): return a + b"},
    {"instruction": "Natalia sold clips.", "input": "48 friends in April", "output": "The answer is: 72"},
    {"instruction": "Say hi.", "output": "hi"},  # no input field at all
]

CORPUS = [
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    "Natalia sold clips to 48 of her friends in April. The answer is: 72",
    "Write a function that adds two numbers. def add(a, b): return a + b",
] * 3


def build_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in a few ms: any text encodes, and decode(encode(t)) == t."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="session")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    return build_bpe_tokenizer()


@pytest.fixture
def fresh_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A private copy, for tests that modify the tokenizer."""
    return build_bpe_tokenizer()


def repo_file(*parts: str) -> Path:
    data = default_data_dir()
    if data is None:
        pytest.fail("the repository's data/ folder was not found next to the package")
    return data.joinpath(*parts)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- loading


def test_detect_format() -> None:
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["query", "response", "type"]) == "query_response"
    assert detect_format(["question", "answer"]) == "gsm8k"
    with pytest.raises(DataError, match="none of alpaca"):
        detect_format(["prompt", "completion"])
    with pytest.raises(DataError, match=r"several \(alpaca, gsm8k\).*set data.format"):
        detect_format(["instruction", "output", "question", "answer"])


def test_bundled_instruction_files() -> None:
    gsm, stats = load_instruct(repo_file("gsm8k", "train.jsonl"))
    assert len(gsm) == 7473 and stats["format"] == "gsm8k"
    assert gsm[0]["instruction"].startswith("Natalia sold clips") and gsm[0]["output"].endswith("\n#### 72")
    demo, stats = load_instruct(repo_file("alpaca_demo", "alpaca_en_demo.json"))
    assert len(demo) == 999 and stats["format"] == "alpaca"
    # Code Alpaca has two rows with an empty output: an error by default, skipped and counted on request.
    code = repo_file("code_alpaca", "code_alpaca_2k.json")
    with pytest.raises(DataError, match=r"code_alpaca_2k\.json, record 238: field 'output' is empty"):
        load_instruct(code)
    rows, stats = load_instruct(code, skip_bad_rows=True)
    assert len(rows) == 2015 and stats["skipped"] == 2 and stats["rows"] == 2017


def test_gsm8k_answer_styles(tmp_path: Path) -> None:
    answer = "She sold 48+24 = <<48+24=72>>72 clips, 1,080 cents.\n#### 1,080"
    assert gsm8k_answer_is(answer) == "She sold 48+24 = <<48+24=72>>72 clips, 1,080 cents.\nThe answer is: 1080"
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q?", "answer": answer}, {"question": "q2", "answer": "7"}])
    kept, _ = load_instruct(path, max_train_samples=1, seed=0)
    assert kept[0]["output"] in (answer, "7")
    with pytest.raises(DataError, match=r"g\.jsonl, line 2: .*no final '#### <number>' line"):
        load_instruct(path, gsm8k_answer="the_answer_is")
    converted, _ = load_instruct(path, gsm8k_answer="the_answer_is", skip_bad_rows=True)
    assert converted["output"] == ["She sold 48+24 = <<48+24=72>>72 clips, 1,080 cents.\nThe answer is: 1080"]


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ({"instruction": "x"}, "missing field 'output'"),
        ({"instruction": "x", "output": "  "}, "field 'output' is empty"),
        ({"instruction": "x", "input": 3, "output": "y"}, "field 'input' is int 3, expected text"),
        ({"instruction": ["x"], "output": "y"}, "field 'instruction' is list"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, bad: dict[str, Any], problem: str) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], bad, ROWS[1]])
    with pytest.raises(DataError, match="skip_bad_rows") as info:
        load_instruct(path)
    assert f"{path}, line 2: {problem}" in str(info.value)
    rows, stats = load_instruct(path, skip_bad_rows=True)
    assert len(rows) == 2 and stats["skipped"] == 1 and stats["problems"][0].startswith(f"line 2: {problem}")


def test_query_response_and_dataset_source() -> None:
    ds = Dataset.from_list([{"query": "What is 2+2?", "response": "The answer is: 4", "type": "GSM_Rephrased"}])
    rows, stats = load_instruct(ds)
    assert stats["format"] == "query_response" and rows[0] == {
        "instruction": "What is 2+2?",
        "input": "",
        "output": "The answer is: 4",
        "idx": 0,
    }


# ---------------------------------------------------------------- tokenisation and masking


def tokenized(tok: PreTrainedTokenizerFast, max_length: int = 512) -> tuple[Dataset, dict[str, int]]:
    rows, _ = load_instruct(Dataset.from_list(ROWS))
    return tokenize_instruct(rows, tok, max_length=max_length)


def test_labels_mask_exactly_the_prompt_and_padding(bpe_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = bpe_tokenizer
    data, stats = tokenized(tok)
    assert stats == {
        "rows": 3,
        "kept": 3,
        "dropped_no_response_tokens": 0,
        "truncated": 0,
        "supervised_tokens": stats["supervised_tokens"],
    }
    batch = CausalLMCollator(tok.pad_token_id)([data[i] for i in range(3)])
    width = batch["input_ids"].shape[1]
    for i, row in enumerate(ROWS):
        prompt = render_prompt(row["instruction"], row.get("input") or None)
        n_prompt = len(tok(prompt)["input_ids"])  # tokenised independently of the code under test
        n_real = len(data[i]["input_ids"])
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        expected = torch.full((width,), IGNORE_INDEX)
        expected[n_prompt:n_real] = ids[n_prompt:n_real]
        assert torch.equal(labels, expected)
        assert tok.decode(ids[labels != IGNORE_INDEX]) == response_prefix("alpaca") + row["output"] + tok.eos_token
        assert tok.decode(ids[:n_prompt]) == prompt
        assert batch["attention_mask"][i].tolist() == [1] * n_real + [0] * (width - n_real)
        assert (ids[n_real:] == tok.pad_token_id).all()
    assert stats["supervised_tokens"] == int((batch["labels"] != IGNORE_INDEX).sum())


def test_truncation_drops_and_counts_rows_without_response_tokens(
    bpe_tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    tok = bpe_tokenizer
    full, _ = tokenized(tok)
    prompt_lens = [len(tok(render_prompt(r["instruction"], r.get("input") or None))["input_ids"]) for r in ROWS]
    # Row lengths: room for row 0's prompt + 2 response tokens; shorter prompts fit, the longest does not.
    limit = prompt_lens[0] + 2
    assert prompt_lens[1] >= limit > prompt_lens[2], "fixture rows no longer exercise all three cases"
    with caplog.at_level(logging.WARNING, logger="balora.data.instruct"):
        data, stats = tokenized(tok, max_length=limit)
    assert stats["kept"] == 2 and stats["dropped_no_response_tokens"] == 1
    assert "dropped 1 of 3 rows" in caplog.text
    assert all(len(ids) <= limit for ids in data["input_ids"])
    first = data[0]
    assert sum(label != IGNORE_INDEX for label in first["labels"]) == 2  # cut from the right; no eos
    assert first["labels"][-1] != tok.eos_token_id and stats["truncated"] == 1 + (len(full[2]["input_ids"]) > limit)
    with pytest.raises(DataError, match="all 3 rows .* raise data.max_length"):
        tokenized(tok, max_length=min(prompt_lens))


def test_chat_template_prompt(fresh_bpe_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = fresh_bpe_tokenizer
    tok.chat_template = "{% for m in messages %}<eos>User: {{ m['content'] }}\n{% endfor %}Assistant:"
    rows, _ = load_instruct(Dataset.from_list(ROWS[:1]))
    data, _ = tokenize_instruct(rows, tok, max_length=512, template="chat")
    ids, labels = torch.tensor(data[0]["input_ids"]), torch.tensor(data[0]["labels"])
    assert tok.decode(ids[labels == IGNORE_INDEX]) == f"<eos>User: {ROWS[0]['instruction']}\nAssistant:"
    assert tok.decode(ids[labels != IGNORE_INDEX]) == ROWS[0]["output"] + "<eos>"  # no separator for chat


def test_collator_pads_to_multiple_and_rejects_ragged_rows() -> None:
    collate = CausalLMCollator(pad_token_id=9, pad_to_multiple_of=4)
    batch = collate(
        [
            {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [-100, 2, 3]},
            {"input_ids": [4], "attention_mask": [1], "labels": [4]},
        ]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3, 9], [4, 9, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100], [4, -100, -100, -100]]
    assert batch["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="differ in length"):
        collate([{"input_ids": [1, 2], "attention_mask": [1], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="pad token"):
        CausalLMCollator(pad_token_id=None)  # type: ignore[arg-type]


def test_tokenizer_without_eos_is_an_error(fresh_bpe_tokenizer: PreTrainedTokenizerFast) -> None:
    tok = fresh_bpe_tokenizer
    tok.eos_token = None
    rows, _ = load_instruct(Dataset.from_list(ROWS[:1]))
    with pytest.raises(DataError, match="no eos token"):
        tokenize_instruct(rows, tok, max_length=64)
