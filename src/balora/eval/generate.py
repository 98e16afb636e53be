"""Batched decoding for the generation benchmarks: `transformers` `generate` (default) or vLLM.

The HF backend pads on the left (so every row's last prompt token sits at the same position and the KV cache is
shared by the batch), sorts prompts by length to waste little padding, stops a row at EOS or at the first stop
string, and truncates each output before its first stop string, as vLLM's `stop=` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

Backend = Literal["hf", "vllm"]


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (excluding) the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


class StopOnStrings:
    """A `transformers` stopping criterion: a row is done once its generated text contains a stop string.

    Only the last `window` generated tokens are decoded at each step, so the cost does not grow with the output.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_length: int) -> None:
        self.tokenizer, self.stop, self.prompt_length = tokenizer, [s for s in stop if s], prompt_length
        self.window = max(len(s) for s in self.stop) + 8  # tokens: every token decodes to >= 1 char, margin for merges

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        tails = input_ids[:, self.prompt_length :][:, -self.window :]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        done = [any(s in text for s in self.stop) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _check(n_samples: int, temperature: float, max_new_tokens: int, batch_size: int) -> None:
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if n_samples > 1 and temperature == 0:
        raise ValueError(
            f"n_samples={n_samples} with temperature=0 (greedy) would give {n_samples} identical samples; "
            "set temperature > 0 (e.g. 0.2 or 0.8, as in the HumanEval paper) or n_samples=1"
        )
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens!r}, {batch_size!r}")


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
    n_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int = 0,
    add_special_tokens: bool = True,
    backend: Backend = "hf",
    progress: bool = True,
) -> list[list[str]]:
    """Completions of each prompt: `result[i]` holds `n_samples` strings (prompt excluded, cut at the first stop).

    temperature 0 is greedy decoding (n_samples must then be 1); otherwise nucleus sampling with `top_p`.
    add_special_tokens: let the tokenizer add BOS as it did in training (False for chat-template prompts, which
    contain their special tokens already). backend "vllm" needs vLLM installed and `model` a `vllm.LLM` or a
    model path; `tokenizer` is then unused.
    """
    _check(n_samples, temperature, max_new_tokens, batch_size)
    if backend == "vllm":
        return _generate_vllm(model, prompts, max_new_tokens, stop, n_samples, temperature, top_p, seed)
    if backend != "hf":
        raise ValueError(f"unknown generation backend {backend!r}; choose 'hf' or 'vllm'")
    return _generate_hf(
        model, tokenizer, prompts, batch_size, max_new_tokens, stop, n_samples, temperature, top_p, seed,
        add_special_tokens, progress,
    )  # fmt: skip


def _generation_config(model: Any, tokenizer: Any, max_new_tokens: int, n: int, temperature: float, top_p: float):  # noqa: ANN202
    from transformers import GenerationConfig

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token first")
    eos = model.generation_config.eos_token_id  # the model's own end token(s), e.g. <|im_end|> for chat models
    sampling = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else 1.0,
        top_p=top_p if sampling else 1.0,
        top_k=0 if sampling else 50,  # no top-k truncation when sampling: nucleus only
        num_return_sequences=n,
        pad_token_id=pad,
        eos_token_id=eos if eos is not None else tokenizer.eos_token_id,
        use_cache=True,
    )


@torch.no_grad()
def _generate_hf(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    batch_size: int,
    max_new_tokens: int,
    stop: Sequence[str],
    n_samples: int,
    temperature: float,
    top_p: float,
    seed: int,
    add_special_tokens: bool,
    progress: bool,
) -> list[list[str]]:
    from transformers import StoppingCriteriaList

    config = _generation_config(model, tokenizer, max_new_tokens, n_samples, temperature, top_p)
    device = next(model.parameters()).device
    was_training, padding_side, pad_token = model.training, tokenizer.padding_side, tokenizer.pad_token
    model.eval()
    tokenizer.padding_side = "left"
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # longest first: any OOM shows up at once
    results: list[list[str]] = [[] for _ in prompts]
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="generating", disable=not progress, unit="batch"):
            batch = order[start : start + batch_size]
            encoded = tokenizer(
                [prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
            ).to(device)
            prompt_length = encoded["input_ids"].shape[1]
            criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stop, prompt_length)] if stop else [])
            output = model.generate(**encoded, generation_config=config, stopping_criteria=criteria)
            texts = tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
            for j, i in enumerate(batch):  # generate returns the n samples of a prompt next to each other
                results[i] = [truncate_at_stop(t, stop) for t in texts[j * n_samples : (j + 1) * n_samples]]
    finally:
        tokenizer.padding_side = padding_side
        if pad_token is None:
            tokenizer.pad_token = None
        model.train(was_training)
    return results


def _generate_vllm(
    model: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    stop: Sequence[str],
    n_samples: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> list[list[str]]:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "backend='vllm' needs vLLM, which is not installed here (it needs a CUDA GPU): `pip install vllm`, "
            "or use backend='hf' (transformers generate, works everywhere)"
        ) from exc
    llm = model if isinstance(model, vllm.LLM) else vllm.LLM(model=str(model), seed=seed)
    params = vllm.SamplingParams(
        n=n_samples,
        temperature=temperature,
        top_p=top_p if temperature > 0 else 1.0,
        max_tokens=max_new_tokens,
        stop=list(stop) or None,
        seed=seed,
    )
    outputs = llm.generate(list(prompts), params)
    return [[truncate_at_stop(o.text, stop) for o in out.outputs] for out in outputs]
