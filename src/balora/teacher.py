"""The teacher of the consistency term: the exact pre-trained model, computed by the model being trained.

After PiSSA the base weights hold W_res, so `disable_adapter()` computes W_res, not W. `get_balora_model` keeps the
initial adapter (A0, B0, and the initial classification head) as a frozen adapter named `"teacher"`; with it active the
layers compute W_res + B0·A0 = W. `pretrained_teacher` switches to it, in eval mode (no dropout) and without
gradients, and switches back on exit, restoring which parameters require grad.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import PeftModel

from balora.adapter import TEACHER


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The PeftModel inside `model` (which may be wrapped by DDP, accelerate or torch.compile), else the innermost
    model (a plain transformers model: full fine-tuning)."""
    seen = model
    for _ in range(8):
        if isinstance(seen, PeftModel):
            return seen
        inner = getattr(seen, "module", None) or getattr(seen, "_orig_mod", None)
        if inner is None:
            break
        seen = inner
    return seen


def unwrap_peft_model(model: torch.nn.Module) -> PeftModel:
    """The PeftModel inside `model` (which may be wrapped by DDP, accelerate or torch.compile)."""
    seen = unwrap_model(model)
    if isinstance(seen, PeftModel):
        return seen
    raise TypeError(f"expected a balora/PEFT model (from get_balora_model); got {type(model).__name__}")


@contextmanager
def pretrained_teacher(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block, `model`'s forward computes the pre-trained model, in eval mode and under `torch.no_grad()`.

    Call the model as usual inside (through its DDP/FSDP wrapper if there is one). Yields the model.
    """
    peft_model = unwrap_peft_model(model)
    if TEACHER not in peft_model.peft_config:
        raise ValueError(
            f"this model has no {TEACHER!r} adapter; build it with balora.get_balora_model to get an exact teacher"
        )
    previous = peft_model.active_adapter
    requires_grad = [(p, p.requires_grad) for p in peft_model.parameters()]
    training = peft_model.training
    try:
        with torch.no_grad():
            peft_model.set_adapter(TEACHER, inference_mode=True)
            peft_model.eval()
            yield model
    finally:
        peft_model.set_adapter(previous)
        for param, flag in requires_grad:
            param.requires_grad_(flag)
        peft_model.train(training)
