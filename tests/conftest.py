"""Tiny random Hugging Face models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 101


def tiny_llama(vocab: int = VOCAB):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2(vocab: int = VOCAB):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config)


def tiny_bert(num_labels: int = 3, vocab: int = VOCAB, problem_type: str | None = None):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=num_labels,
        problem_type=problem_type,
    )
    return BertForSequenceClassification(config)


def tiny_roberta(num_labels: int = 2, vocab: int = VOCAB):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=72,
        num_labels=num_labels,
        pad_token_id=1,
    )
    return RobertaForSequenceClassification(config)


def tiny_deberta(num_labels: int = 2, vocab: int = VOCAB):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    config = DebertaV2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        num_labels=num_labels,
        pooler_hidden_size=32,
        relative_attention=True,
        position_buckets=8,
        pos_att_type=["p2c", "c2p"],
    )
    return DebertaV2ForSequenceClassification(config)


MODEL_FACTORIES = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "roberta": tiny_roberta,
    "deberta-v2": tiny_deberta,
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def teacher_calls(monkeypatch):
    """A list that gets one entry per teacher forward the trainer makes (spies on `pretrained_teacher`)."""
    import balora.trainer as trainer_module

    calls: list[int] = []
    real = trainer_module.pretrained_teacher

    def spy(model):
        calls.append(1)
        return real(model)

    monkeypatch.setattr(trainer_module, "pretrained_teacher", spy)
    return calls


def train_a_few_steps(model, inputs, steps=4):
    """Move the trainable weights: a few AdamW steps on the squared logits (no labels needed)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for _ in range(steps):
        model(**inputs).logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
