"""A tiny word-level tokenizer built offline and a tiny random Llama over its vocabulary, for generation tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = (
    "the a cat dog sat on mat ran far and is of to in it Question: Answer: Let's think step by step. The answer "
    "### Instruction: Response: Below an instruction that describes task. Write response appropriately completes "
    "request. def return if else for x y 0 1 2 3 4 5 6 7 8 9 10 11 12 + - = ( ) :"
).split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL + sorted(set(WORDS)))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_causal_lm(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def tiny_instruct_setup(root: Path) -> Path:
    """`root/model` (tiny Llama + tokenizer), `root/train.json` (8 Alpaca rows) and `root/nlg.yaml` (a BA-LoRA
    instruction experiment, 1 step at learning rate 0, output `root/run`); returns the experiment file."""
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [{"instruction": "the cat sat on a mat", "input": "", "output": f"the dog ran far {i} and {i + 1}"}
            for i in range(8)]
    (root / "train.json").write_text(json.dumps(rows))
    config = {
        "model": {"name": str(root / "model"), "dtype": "float32", "device": "cpu"},
        "data": {"task": "instruct", "train_file": str(root / "train.json"), "max_length": 32},
        "balora": {"method": "balora", "r": 2, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 0.0, "logging_steps": 1,
                     "save_strategy": "no", "seed": 0, "report_to": [], "disable_tqdm": True},
        "output_dir": str(root / "run"),
    }
    path = root / "nlg.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
