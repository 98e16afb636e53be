"""Batched greedy decoding: left padding changes nothing, stop strings end and cut the output, sampling gives n."""

from __future__ import annotations

import pytest
from tiny_lm import tiny_causal_lm, tiny_tokenizer

from balora.eval.generate import StopOnStrings, generate, truncate_at_stop

PROMPTS = [
    "the cat sat on the mat",
    "dog",
    "a cat ran far and the dog sat on a mat and it is 1 2 3 4 5 6",
    "Question: 1 + 2 = Answer:",
    "x",
]


@pytest.fixture(scope="module")
def lm():
    tokenizer = tiny_tokenizer()
    return tiny_causal_lm(len(tokenizer)), tokenizer


def test_left_padded_batches_match_unbatched_greedy(lm):
    model, tokenizer = lm
    batched = generate(model, tokenizer, PROMPTS, batch_size=5, max_new_tokens=10, progress=False)
    single = [generate(model, tokenizer, [p], batch_size=1, max_new_tokens=10, progress=False)[0] for p in PROMPTS]
    assert batched == single
    assert len({len(tokenizer(p)["input_ids"]) for p in PROMPTS}) > 1  # the batch really needed padding
    assert all(len(outputs) == 1 and outputs[0] for outputs in batched)
    assert tokenizer.padding_side == "right"  # restored


def test_stop_strings_end_generation_and_cut_the_output(lm):
    model, tokenizer = lm
    prompt = PROMPTS[0]
    full = generate(model, tokenizer, [prompt], max_new_tokens=12, progress=False)[0][0]
    words = full.split()
    assert len(words) >= 4
    stop = words[2]
    steps: list[int] = []
    hook = model.model.register_forward_hook(lambda *args: steps.append(1))
    try:
        cut = generate(model, tokenizer, [prompt], max_new_tokens=12, stop=[stop], progress=False)[0][0]
    finally:
        hook.remove()
    assert cut == truncate_at_stop(full, [stop])
    assert stop not in cut
    assert len(steps) <= words.index(stop) + 1  # generation stopped at the stop word, not at max_new_tokens


def test_stop_criterion_ignores_the_prompt():
    tokenizer = tiny_tokenizer()
    ids = tokenizer(["dog sat cat", "dog sat mat"], return_tensors="pt")["input_ids"]
    criterion = StopOnStrings(tokenizer, ["cat", "dog"], prompt_length=3)  # "<s> dog sat" is the prompt
    assert criterion(ids).tolist() == [True, False]


def test_sampling_gives_n_samples_per_prompt(lm):
    model, tokenizer = lm
    out = generate(model, tokenizer, PROMPTS[:3], batch_size=2, max_new_tokens=8, n_samples=3, temperature=1.0,
                   progress=False)  # fmt: skip
    assert [len(samples) for samples in out] == [3, 3, 3]
    assert len({s for samples in out for s in samples}) > 3  # not all identical
    again = generate(model, tokenizer, PROMPTS[:3], batch_size=2, max_new_tokens=8, n_samples=3, temperature=1.0,
                     progress=False)  # fmt: skip
    assert out == again  # seeded


def test_bad_settings_are_rejected(lm):
    model, tokenizer = lm
    with pytest.raises(ValueError, match="temperature"):
        generate(model, tokenizer, ["x"], n_samples=2, temperature=0.0)
    with pytest.raises(ValueError, match="unknown generation backend"):
        generate(model, tokenizer, ["x"], backend="tgi")  # type: ignore[arg-type]


def test_vllm_backend_without_vllm_is_a_clear_error(lm):
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="backend='vllm' needs vLLM"):
        generate("some/model", None, ["x"], backend="vllm")


def test_truncate_at_stop():
    assert truncate_at_stop("abc ### Instruction more", ["### Instruction", "### Response"]) == "abc "
    assert truncate_at_stop("abc", ["zz", ""]) == "abc"
