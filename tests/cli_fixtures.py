"""Tiny model folders and data files on disk, for tests that drive `balora` the way a user does (CLI, run dirs).

- `save_tiny_bert(dir)`: a 2-layer BERT sequence classifier (2 labels) with a `BertTokenizerFast` whose vocab file
  holds the words of a few real SST-2 rows (other words become [UNK]);
- `save_tiny_llama(dir)`: a 2-layer Llama causal LM with a word-level `PreTrainedTokenizerFast` trained on a few
  Alpaca rows and the Alpaca prompt, with pad/bos/eos/unk tokens;
- `write_sst2(dir)` / `write_alpaca(dir)`: a few dozen real rows of the bundled SST-2 and Alpaca data;
- `write_experiment(path, ...)`: an experiment YAML for a run of a few steps.

Everything is random-initialised and saved with `save_pretrained`, so `balora.models.load_model(path, task=...)` loads
it like any local checkpoint. No network.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SST2_DIR = REPO_ROOT / "data" / "glue" / "sst2"
ALPACA_FILE = REPO_ROOT / "data" / "alpaca_demo" / "alpaca_en_demo.json"

N_SST2_TRAIN = 40
N_SST2_VALIDATION = 24
N_ALPACA = 24
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LLAMA_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3, as in LlamaConfig(pad 0, bos 1, eos 2)


def _jsonl_head(path: Path, n: int) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n:
                break
    return rows


def write_sst2(directory: Path) -> tuple[Path, Path]:
    """The first rows of the bundled SST-2 train and validation splits; returns (train.jsonl, validation.jsonl)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, n in (("train", N_SST2_TRAIN), ("validation", N_SST2_VALIDATION)):
        path = directory / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in _jsonl_head(SST2_DIR / f"{split}.jsonl", n)))
        paths.append(path)
    return paths[0], paths[1]


def write_alpaca(directory: Path, n: int = N_ALPACA) -> Path:
    """The first `n` rows of the bundled Alpaca demo set, as a JSON list."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = json.loads(ALPACA_FILE.read_text(encoding="utf-8"))[:n]
    path = directory / "alpaca.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def save_tiny_bert(directory: Path, *, seed: int = 0) -> Path:
    """A tiny `BertForSequenceClassification` (2 labels) + `BertTokenizerFast` over words of 20 SST-2 rows."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    rows = _jsonl_head(SST2_DIR / "train.jsonl", 20)
    words = sorted({w for row in rows for w in _words(row["sentence"])})
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(BERT_SPECIAL + words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, num_labels=2, pad_token_id=tokenizer.pad_token_id,
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def alpaca_prompt_texts(n: int = N_ALPACA) -> list[str]:
    from balora.data.templates import render_prompt, response_prefix

    rows = json.loads(ALPACA_FILE.read_text(encoding="utf-8"))[:n]
    return [render_prompt(r["instruction"], r["input"] or None, template="alpaca") + response_prefix("alpaca")
            + r["output"] for r in rows]


def tiny_word_tokenizer(texts: list[str], vocab_size: int = 400) -> Any:
    """A word-level `PreTrainedTokenizerFast` trained on `texts`; adds <s> in front of every sequence."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=LLAMA_SPECIAL))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def save_tiny_llama(directory: Path, *, seed: int = 0) -> Path:
    """A tiny `LlamaForCausalLM` + word-level tokenizer trained on the first Alpaca rows in the Alpaca prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_word_tokenizer(alpaca_prompt_texts())
    assert [tokenizer.convert_tokens_to_ids(t) for t in LLAMA_SPECIAL] == [0, 1, 2, 3]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


TRAINING = {
    "max_steps": 4, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "learning_rate": 1.0e-2,
    "lr_scheduler_type": "constant", "warmup_steps": 0, "logging_steps": 1, "eval_strategy": "no",
    "save_strategy": "no", "seed": 0, "report_to": [], "disable_tqdm": True, "use_cpu": True,
}


def write_experiment(
    path: Path, *, model: Path, output_dir: Path, data: dict[str, Any], balora: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None, model_options: dict[str, Any] | None = None,
) -> Path:
    """An experiment YAML headed by the command that runs it; `training` values update `TRAINING`."""
    raw = {
        "model": {"name": str(model), "dtype": "float32", "device": "cpu", **(model_options or {})},
        "data": data,
        "balora": {"r": 2, **(balora or {})},
        "training": {**TRAINING, **(training or {})},
        "output_dir": str(output_dir),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# balora train {path}\n" + yaml.safe_dump(raw, sort_keys=False))
    return path


def nlu_experiment(tmp: Path, bert: Path, train: Path, validation: Path, name: str = "nlu", **kw: Any) -> Path:
    data = {"task": "sst2", "train_file": str(train), "validation_file": str(validation), "max_length": 32,
            **kw.pop("data", {})}
    return write_experiment(tmp / f"{name}.yaml", model=bert, output_dir=tmp / name, data=data,
                            balora={"svd_top_k": 1, **kw.pop("balora", {})}, **kw)


def nlg_experiment(tmp: Path, llama: Path, train: Path, name: str = "nlg", **kw: Any) -> Path:
    data = {"task": "instruct", "train_file": str(train), "max_length": 64, **kw.pop("data", {})}
    return write_experiment(tmp / f"{name}.yaml", model=llama, output_dir=tmp / name, data=data, **kw)
