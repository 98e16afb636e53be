"""BALoRASFTTrainer: BA-LoRA's loss through TRL's own data path (chat template, completion-only loss, packing)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, AutoTokenizer

from balora import BALoRAConfig, losses
from balora.trainer import BALoRATrainer

from cli_fixtures import save_tiny_llama

trl = pytest.importorskip("trl")
from balora.integrations.trl import BALoRASFTTrainer  # noqa: E402


class SequentialSFTTrainer(BALoRASFTTrainer):
    """Rows in dataset order, so batch row i is prompt i."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)
PROMPTS = ["give three tips for staying healthy", "what is the capital of france", "describe a good day"]
ANSWERS = ["eat a balanced diet and exercise", "the capital is paris", "a good day is sunny and calm"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("trl") / "llama")


def _tokenizer(llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _sft_args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=3, learning_rate=1e-2,
                  bf16=False, gradient_checkpointing=False, report_to=[], use_cpu=True, logging_steps=1,
                  save_strategy="no", disable_tqdm=True, shuffle_dataset=False, seed=0)
    values.update(overrides)
    return trl.SFTConfig(**values)


def _conversations():
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": a}]}
        for p, a in zip(PROMPTS, ANSWERS, strict=True)
    ])


def test_chat_template_completion_only_loss_is_balora_objective(llama_dir, tmp_path):
    tokenizer = _tokenizer(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    original = copy.deepcopy(model).eval()
    config = BALoRAConfig(r=4, consistency_weight=0.5, diversity_weight=0.2, svd_weight=0.3,
                          regularizer_schedule="constant", consistency_schedule="constant")
    trainer = SequentialSFTTrainer(model=model, balora_config=config, args=_sft_args(tmp_path),
                               train_dataset=_conversations(), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))

    # TRL's data path: the chat template renders each row, and only the completion tokens carry labels.
    for row, prompt in enumerate(PROMPTS):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        assert torch.equal(ids[: len(prompt_ids)], torch.tensor(prompt_ids))
        assert (labels[: len(prompt_ids)] == -100).all()
        valid = batch["attention_mask"][row].bool()
        valid[: len(prompt_ids)] = False
        assert torch.equal(labels[valid], ids[valid])

    # The loss is BA-LoRA's, on the completion tokens only: at step 0 the PiSSA student is the pre-trained model, so
    # loss = CE(original) + λ2·diversity + λ3·SVD (consistency 0), from the plain functions on the untouched model.
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    with torch.no_grad():
        logits = original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shift.reshape(-1), ignore_index=-100)
    expected = (ce + 0.2 * losses.nlg_diversity(logits, batch["labels"], top_k=config.entropy_top_k)
                + 0.3 * losses.nlg_svd(logits, batch["labels"], top_k=10, exact=True))
    torch.testing.assert_close(loss, expected, atol=2e-4, rtol=0)
    logged = trainer._term_logs["train"]
    torch.testing.assert_close(logged["task_loss"][-1], ce, atol=1e-5, rtol=0)
    assert logged["consistency_loss"][-1].abs() < 1e-5

    # One mixin, one loss: BALoRATrainer on the same model and batch gives the same value.
    plain = BALoRATrainer(model=trainer.model, args=_sft_args(tmp_path / "plain"))
    torch.testing.assert_close(plain.compute_loss(trainer.model, dict(batch)), loss)

    trainer.train()
    last = [e for e in trainer.state.log_history if "task_loss" in e][-1]
    for key in ("task_loss", "consistency_loss", "diversity_loss", "svd_loss", "lambda_svd"):
        assert key in last and torch.isfinite(torch.tensor(last[key])), key
    out = trainer.save_adapter(tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").is_file() and (out / "balora_config.json").is_file()


def test_packing_keeps_documents_apart(llama_dir, tmp_path):
    """TRL's bfd packing is padding-free: the packed task loss equals the mean CE of each document alone."""
    tokenizer = _tokenizer(llama_dir)
    texts = [f"{p} {a}" for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    original = copy.deepcopy(model).eval()
    trainer = BALoRASFTTrainer(model=model, balora_config=BALoRAConfig(r=4, consistency_weight=0.5),
                               args=_sft_args(tmp_path, packing=True, max_length=64),
                               train_dataset=Dataset.from_dict({"text": texts}), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one packed row
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))  # λ2, λ3 are 0 at step 0 (two-phase schedule)
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text + tokenizer.eos_token, return_tensors="pt")["input_ids"]
            total += original(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert int((batch["labels"] != -100).sum()) == count
    assert loss.item() == pytest.approx(total / count, abs=1e-5)
    assert trainer._term_logs["train"]["consistency_loss"][-1].abs() < 1e-5  # the teacher sees the same packing


def test_refuses_what_would_replace_the_objective(llama_dir, tmp_path):
    from peft import LoraConfig

    tokenizer = _tokenizer(llama_dir)
    data = _conversations()
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    with pytest.raises(ValueError, match="drop peft_config"):
        BALoRASFTTrainer(model=model, balora_config=BALoRAConfig(), args=_sft_args(tmp_path),
                         train_dataset=data, processing_class=tokenizer, peft_config=LoraConfig(r=4))
    with pytest.raises(ValueError, match="loss_type='nll'"):
        BALoRASFTTrainer(model=model, balora_config=BALoRAConfig(), args=_sft_args(tmp_path, loss_type="dft"),
                         train_dataset=data, processing_class=tokenizer)
    with pytest.raises(TypeError, match="loaded model"):
        BALoRASFTTrainer(model=str(llama_dir), balora_config=BALoRAConfig(), args=_sft_args(tmp_path),
                         train_dataset=data, processing_class=tokenizer)
