"""`balora export`: a PiSSA-initialised run as a plain LoRA on the original base (rank 2r) and as a merged model.

"The trained model" is the PEFT model the run trained (residual base weights + the rank-r PiSSA adapter), captured
during the CLI run; each export is loaded independently on a freshly loaded original checkpoint and must give its
logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import balora.train
from balora.cli import main
from balora.models import load_model

from cli_fixtures import nlg_experiment, nlu_experiment, save_tiny_bert, save_tiny_llama, write_alpaca, write_sst2

ATOL = 1e-4  # float32


def _train_and_capture(monkeypatch_module, config):
    """Run `balora train config` and return the PEFT model it trained (still in memory)."""
    captured = []
    original = balora.train.get_balora_model

    def capture(*args, **kwargs):
        captured.append(original(*args, **kwargs))
        return captured[-1]

    monkeypatch_module.setattr(balora.train, "get_balora_model", capture)
    assert main(["train", str(config)]) == 0
    monkeypatch_module.undo()
    (model,) = captured
    return model.eval()


def _inputs(tokenizer, texts):
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


@torch.no_grad()
def _logits(model, inputs):
    return model(**inputs).logits.float()


def _nlu_case(tmp, pooling):
    bert = save_tiny_bert(tmp / "bert")
    train, validation = write_sst2(tmp / "sst2")
    config = nlu_experiment(tmp, bert, train, validation, balora={"method": "balora", "r": 2, "alpha": 4},
                            training={"learning_rate": 5e-2}, model_options={"pooling": pooling})
    with pytest.MonkeyPatch.context() as mp:
        trained = _train_and_capture(mp, config)
    texts = [json.loads(line)["sentence"] for line in validation.read_text().splitlines()[:6]]
    inputs = _inputs(AutoTokenizer.from_pretrained(bert), texts)
    if pooling == "mean":  # the base is the backbone with a mean-pooled head (seeded like the run's)
        def load(path):
            torch.manual_seed(0)
            return load_model(str(path), task="nlu", num_labels=2, pooling="mean", device="cpu")[0]
    else:
        load = AutoModelForSequenceClassification.from_pretrained
    return {"tmp": tmp, "base": bert, "run": tmp / "nlu", "inputs": inputs, "want": _logits(trained, inputs),
            "load": load, "r": 2, "alpha": 4}


@pytest.fixture(scope="module")
def nlu(tmp_path_factory):
    return _nlu_case(tmp_path_factory.mktemp("export-nlu"), "cls")


@pytest.fixture(scope="module")
def nlu_mean(tmp_path_factory):
    return _nlu_case(tmp_path_factory.mktemp("export-nlu-mean"), "mean")


@pytest.fixture(scope="module")
def nlg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export-nlg")
    llama = save_tiny_llama(tmp / "llama")
    config = nlg_experiment(tmp, llama, write_alpaca(tmp / "alpaca", n=8), balora={"method": "pissa", "r": 3},
                            training={"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 5e-2})
    with pytest.MonkeyPatch.context() as mp:
        trained = _train_and_capture(mp, config)
    tokenizer = AutoTokenizer.from_pretrained(llama)
    inputs = _inputs(tokenizer, ["Below is an instruction that describes a task .", "Give three tips for"])
    return {"tmp": tmp, "base": llama, "run": tmp / "nlg", "inputs": inputs, "want": _logits(trained, inputs),
            "load": AutoModelForCausalLM.from_pretrained, "r": 3, "alpha": 3}


@pytest.fixture(params=["nlu", "nlu_mean", "nlg"])
def case(request):
    return request.getfixturevalue(request.param)


def test_the_adapter_has_moved(case):
    """Without training the export would be a no-op and the parity tests below could not fail."""
    base = case["load"](case["base"]).eval()
    assert (_logits(base, case["inputs"]) - case["want"]).abs().max() > 100 * ATOL


def test_export_lora_applies_to_the_original_base(case, tmp_path):
    out = tmp_path / "lora"
    assert main(["export", str(case["run"]), "--to", "lora", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 * case["r"]  # PiSSA: ΔW = [B | -B0] [A ; A0]
    assert config["lora_alpha"] == 2 * case["alpha"]  # same scaling alpha / r
    fresh = case["load"](case["base"]).eval()
    exported = PeftModel.from_pretrained(fresh, str(out)).eval()
    torch.testing.assert_close(_logits(exported, case["inputs"]), case["want"], atol=ATOL, rtol=0)


def test_export_merged_is_a_plain_transformers_model(case, tmp_path):
    out = tmp_path / "merged"
    assert main(["export", str(case["run"]), "--to", "merged", str(out)]) == 0
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    merged = case["load"](out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, case["inputs"]), case["want"], atol=ATOL, rtol=0)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(case["base"]).get_vocab()


@pytest.mark.parametrize("to", ["lora", "merged"])
def test_export_refuses_a_non_empty_folder(nlu, tmp_path, capsys, to):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(nlu["run"]), "--to", to, str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_export_of_an_unfinished_run_exits_2(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["export", str(tmp_path / "run"), "--to", "lora", str(tmp_path / "out")]) == 2
    assert "holds no adapter" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
