"""Heads that fit the model: generic head detection over many *ForSequenceClassification classes, mean pooling against
a hand-written reference, and a mean-pooled model saved, merged and loaded back."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from balora import BALoRAConfig, BALoRATrainer, get_balora_model, pretrained_teacher
from balora.heads import MeanPooledForSequenceClassification, find_head, masked_mean

from conftest import VOCAB, tiny_bert, tiny_deberta, tiny_roberta


def _seqcls(config_cls: str, model_cls: str, **kw):
    import transformers

    config = getattr(transformers, config_cls)(vocab_size=VOCAB, num_labels=2, **kw)
    return getattr(transformers, model_cls)(config)


SMALL = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}
CLASSIFIERS = {
    "bert": lambda: tiny_bert(num_labels=2),
    "roberta": tiny_roberta,
    "deberta-v2": tiny_deberta,
    "electra": lambda: _seqcls("ElectraConfig", "ElectraForSequenceClassification", embedding_size=32, **SMALL),
    "t5": lambda: _seqcls("T5Config", "T5ForSequenceClassification", d_model=32, d_ff=48, d_kv=8, num_layers=2,
                          num_heads=4, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0),
    "bart": lambda: _seqcls("BartConfig", "BartForSequenceClassification", d_model=32, encoder_layers=2,
                            decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                            encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=1,
                            eos_token_id=2, bos_token_id=0),
    "gpt2": lambda: _seqcls("GPT2Config", "GPT2ForSequenceClassification", n_embd=32, n_layer=2, n_head=4,
                            n_positions=64, pad_token_id=0),
    "llama": lambda: _seqcls("LlamaConfig", "LlamaForSequenceClassification", num_key_value_heads=2,
                             max_position_embeddings=64, pad_token_id=0, **SMALL),
    "qwen2": lambda: _seqcls("Qwen2Config", "Qwen2ForSequenceClassification", num_key_value_heads=2,
                             max_position_embeddings=64, pad_token_id=0, **SMALL),
}
EXPECTED_HEAD = {"bert": "classifier", "roberta": "classifier", "deberta-v2": "classifier", "electra": "classifier",
                 "t5": "classification_head", "bart": "classification_head", "gpt2": "score", "llama": "score",
                 "qwen2": "score"}


def _batch(model, rows: int = 4, length: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    ids[:, -1] = 2  # an eos at the end: T5/BART classify from the eos token
    mask = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1, 0][:rows])}


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


@pytest.mark.parametrize("arch", list(CLASSIFIERS))
def test_any_classifier_works_with_default_settings(arch, tmp_path):
    torch.manual_seed(0)
    model = _no_dropout(CLASSIFIERS[arch]()).eval()
    assert find_head(model) == [EXPECTED_HEAD[arch]]
    batch = _batch(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        before = model(**inputs).logits.clone()
    peft_model = get_balora_model(model, BALoRAConfig(r=4))  # defaults: all-linear, PiSSA, every term on
    adapted = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    head = EXPECTED_HEAD[arch]
    assert adapted and not any(f".{head}." in n for n in adapted)  # the head gets no adapter
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, before, atol=1e-4, rtol=1e-4)  # unchanged at init
    trainable = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(f"{head}.modules_to_save.default" in n for n in trainable)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
    from datasets import Dataset

    data = Dataset.from_dict({k: v.tolist() for k, v in batch.items()})
    BALoRATrainer(model=peft_model, args=args, train_dataset=data).train()
    changed = {n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])}
    assert any(f"{head}.modules_to_save.default" in n for n in changed), "the head did not train"
    assert any("lora_" in n for n in changed), "no adapter trained"
    with pretrained_teacher(peft_model), torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, before, atol=1e-4, rtol=1e-4)  # teacher exact


def test_masked_mean_matches_a_loop_reference():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    expected = torch.zeros(3, 4, dtype=torch.float64)
    for b in range(3):
        kept = [hidden[b, t].double() for t in range(5) if mask[b, t]]
        if kept:
            expected[b] = sum(kept) / len(kept)
    torch.testing.assert_close(masked_mean(hidden, mask).double(), expected)


def test_mean_pooled_classifier_against_a_hand_written_forward():
    backbone = tiny_bert(num_labels=2).bert.eval()
    model = MeanPooledForSequenceClassification(backbone.config, backbone=backbone).eval()
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    with torch.no_grad():
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state.double()
        pooled = torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0)])
        w, b = model.classifier.out_proj.weight.double(), model.classifier.out_proj.bias.double()
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits.double(), pooled @ w.T + b,
                                   atol=1e-5, rtol=1e-5)
    assert find_head(model) == ["classifier"]


def test_mean_pooling_refuses_an_encoder_decoder_backbone():
    t5 = CLASSIFIERS["t5"]()
    with pytest.raises(ValueError, match="encoder-decoder.*pooling 'cls'"):
        MeanPooledForSequenceClassification(t5.config)


def test_find_head_names_modules_created_at_load_and_refuses_headless_models():
    model = tiny_deberta()
    model.balora_new_modules = ["pooler", "classifier"]
    assert find_head(model) == ["classifier", "pooler"]
    peft_model = get_balora_model(model, BALoRAConfig(r=2))
    assert not any("pooler" in n and "lora_" in n for n, _ in peft_model.named_parameters())
    assert any("pooler.modules_to_save.default" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    bert = tiny_bert(num_labels=3)
    bert.config.num_labels = 7
    with pytest.raises(ValueError, match="no classification head found.*modules_to_save"):
        find_head(bert)


def test_regression_head_bias_starts_at_the_label_mean():
    from balora.heads import set_output_bias

    model = tiny_bert(num_labels=1, problem_type="regression")
    assert set_output_bias(model, 2.75)
    assert torch.all(model.classifier.bias == 2.75)
    roberta = tiny_roberta(num_labels=1)
    assert set_output_bias(roberta, -1.5)
    assert torch.all(roberta.classifier.out_proj.bias == -1.5) and not torch.all(roberta.classifier.dense.bias == -1.5)
    decoder = CLASSIFIERS["llama"]()
    decoder.config.num_labels = 1
    decoder.score = torch.nn.Linear(32, 1, bias=False)
    assert not set_output_bias(decoder, 1.0)  # no bias to set: reported, nothing changed


def test_pooling_is_refused_for_a_causal_lm():
    from balora.experiment import ConfigError, build_experiment

    raw = {"model": {"name": "x", "pooling": "mean"}, "data": {"task": "instruct"}, "output_dir": "o"}
    with pytest.raises(ConfigError, match="model.pooling 'mean' is for sequence classification"):
        build_experiment(raw)


@pytest.mark.parametrize("bias", ["mean", "zero"])
def test_balora_train_regression_starts_the_head_at_the_label_mean(tmp_path, bias):
    import json

    from safetensors.torch import load_file

    from balora.cli import main

    from cli_fixtures import save_tiny_bert, write_experiment

    bert = save_tiny_bert(tmp_path / "bert")
    rows = [{"sentence": f"a film {i}", "label": 1.0 + 0.5 * (i % 5)} for i in range(16)]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_experiment(
        tmp_path / "reg.yaml", model=bert, output_dir=tmp_path / "run",
        data={"task": "classification", "text_fields": ["sentence"], "num_labels": 1, "train_file": str(train),
              "validation_file": str(train), "max_length": 16},
        balora={"method": "balora", "consistency_weight": 1.0},
        training={"max_steps": 1, "learning_rate": 1e-12, "lr_scheduler_type": "constant"},
        model_options={"pooling": "mean", "regression_bias": bias},
    )
    assert main(["train", str(config)]) == 0
    state = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    (key,) = [k for k in state if k.endswith("out_proj.bias")]
    expected = sum(r["label"] for r in rows) / len(rows) if bias == "mean" else 0.0
    assert state[key].item() == pytest.approx(expected, abs=1e-6)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert "eval_pearson" in metrics


def test_named_targets_never_adapt_a_layer_inside_the_head():
    # "out_proj" names BART's attention outputs and its head's output layer (2 outputs < r = 4): the head is trained in
    # full, so it is neither adapted nor checked against r
    model = get_balora_model(CLASSIFIERS["bart"](), BALoRAConfig(r=4, target_modules=["q_proj", "out_proj"]))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith("lora_A")}
    assert any(n.endswith("self_attn.out_proj") for n in adapted)
    assert not any("classification_head" in n for n in adapted)
