"""Prompt templates for instruction data.

The PiSSA and BA-LoRA papers train and evaluate with the Alpaca prompt (Taori et al., 2023); the same template must be
used at training and at evaluation time, so both sides import it from here. `chat` uses the tokenizer's own chat
template instead.
"""

from __future__ import annotations

from typing import Any, Literal

TemplateName = Literal["alpaca", "chat"]

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
# Between the prompt and the response, as in the PiSSA/BA-LoRA training scripts ("### Response:" + " " + output).
RESPONSE_SEPARATOR = " "


def render_prompt(
    instruction: str, input: str | None = None, *, template: TemplateName = "alpaca", tokenizer: Any = None
) -> str:
    """Return the prompt text that precedes the response (the response itself is not included).

    `template="chat"` needs a tokenizer with a chat template; the instruction (and input, on a new line) becomes the
    user turn and the generation prompt of the assistant turn is appended.
    """
    if template == "alpaca":
        if input:
            return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
        return ALPACA_PROMPT.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "template='chat' needs a tokenizer that has a chat template; this tokenizer has none. "
                "Use template='alpaca' or a tokenizer with `chat_template` set."
            )
        user = f"{instruction}\n\n{input}" if input else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"unknown prompt template {template!r}; choose one of 'alpaca', 'chat'")


def response_prefix(template: TemplateName = "alpaca") -> str:
    """Text placed between the rendered prompt and the response when building training examples."""
    return RESPONSE_SEPARATOR if template == "alpaca" else ""
