"""The NLU side of the trainer: the classification head of a (PEFT-wrapped) model, its pooled input features, the
consistency targets built from them, and the per-row teacher cache.

Consistency targets (`BALoRAConfig.consistency_target`, see docs/method.md):
- `initial_head`: the pre-trained model's logits, i.e. the pre-trained backbone through the *initial* head (the paper's
  literal reading; for a fresh head those are near-uniform class probabilities, or near-0 regression outputs);
- `current_head`: the *current* head applied to the pre-trained backbone's features, detached: how the drift of the
  representation changes the predictions, never a pull toward the initial head's output;
- `features`: a scale-free distance between the student's and the pre-trained model's pooled features
  (`losses.nlu_feature_consistency`).
The features are the input of the head module (`heads.find_head`); a (B, T, H) input (RoBERTa, decoders) is reduced
by a masked mean over the attention mask for the `features` distance.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper
from torch import Tensor, nn

from balora.adapter import ADAPTER
from balora.heads import find_head, masked_mean
from balora.teacher import unwrap_model


@dataclass
class Head:
    """The classification head of a model: `module` as called in the forward (a `ModulesToSaveWrapper` under PEFT),
    `current` its trainable copy, `names` every module trained in full as part of the head."""

    module: nn.Module
    current: nn.Module
    names: list[str]


def _base(model: nn.Module) -> nn.Module:
    inner = unwrap_model(model)
    return inner.base_model.model if isinstance(inner, PeftModel) else inner


def locate_head(model: nn.Module) -> Head:
    """The head of a sequence-classification model (plain, or wrapped by PEFT/DDP)."""
    base = _base(model)
    names = getattr(unwrap_model(model), "balora_head", None) or find_head(base)
    module = base.get_submodule(names[0])
    current = module.modules_to_save[ADAPTER] if isinstance(module, ModulesToSaveWrapper) else module
    return Head(module=module, current=current, names=list(names))


def check_consistency_target(config: Any, model: nn.Module) -> None:
    """Refuse `initial_head` on a regression head: it would pull every prediction toward the initial head's output."""
    num_labels = getattr(getattr(_base(model), "config", None), "num_labels", None)
    if config.consistency_target == "initial_head" and (config.consistency_weight or 0) > 0 and num_labels == 1:
        raise ValueError(
            "consistency_target='initial_head' on a regression head pulls every prediction toward the initial "
            "head's output (near 0 for a fresh head); use consistency_target 'current_head' or 'features', or set "
            "consistency_weight 0"
        )


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the head modules (under PEFT: their trainable copies)."""
    base = _base(model)
    names = locate_head(model).names
    params = []
    for name in names:
        module = base.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            module = module.modules_to_save[ADAPTER]
        params.extend(p for p in module.parameters() if p.requires_grad)
    return params


@contextmanager
def capture_input(module: nn.Module) -> Iterator[list[Tensor]]:
    """Collect the first tensor argument of every call of `module` inside the block (a forward pre-hook)."""
    captured: list[Tensor] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        if tensors:
            captured.append(tensors[0])

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def pooled(features: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(B, H) features as they are; (B, T, H) features averaged over the attention mask."""
    if features.dim() == 2:
        return features
    if features.dim() == 3:
        return masked_mean(features, attention_mask)
    raise ValueError(f"the head's input has shape {tuple(features.shape)}; expected (B, H) or (B, T, H)")


def last_token_index(input_ids: Tensor, pad_token_id: int | None) -> Tensor:
    """(B,) index of each row's last non-pad token, as transformers' decoder classifiers pick their logits."""
    if pad_token_id is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
    non_pad = (input_ids != pad_token_id).int()
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (positions * non_pad).argmax(-1)


@torch.no_grad()
def current_head_logits(
    head: Head, teacher_features: Tensor, model_inputs: dict[str, Any], pad_token_id: Any
) -> Tensor:
    """The current head (eval mode, no dropout, no gradient) applied to the pre-trained model's head input -> (B, D).

    A head that maps every token (decoders' `score`) is read at the last non-pad token, as the model itself does.
    """
    training = head.current.training
    head.current.eval()
    try:
        out = head.current(teacher_features.to(next(head.current.parameters()).dtype))
    finally:
        head.current.train(training)
    if out.dim() == 3:
        index = last_token_index(model_inputs["input_ids"], pad_token_id)
        out = out[torch.arange(out.shape[0], device=out.device), index]
    return out


class TeacherCache:
    """Per-row teacher outputs (logits, and the head's input features when a target needs them), keyed by
    `trainer.row_keys`. A (T, H) feature row is stored without its padding and padded back for each batch."""

    def __init__(self, store_features: bool) -> None:
        self.store_features = store_features
        self._rows: dict[bytes, tuple[Tensor, Tensor | None]] = {}
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, keys: list[bytes], attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None] | None:
        rows = [self._rows.get(k) for k in keys]
        if any(r is None for r in rows):
            return None
        self.hits += len(keys)
        logits = torch.stack([r[0] for r in rows])  # type: ignore[index]
        if not self.store_features:
            return logits, None
        feats = [r[1] for r in rows]  # type: ignore[index]
        if feats[0].dim() == 1:  # type: ignore[union-attr]
            return logits, torch.stack(feats)  # type: ignore[arg-type]
        mask = attention_mask.bool()  # type: ignore[union-attr]
        full = feats[0].new_zeros(*mask.shape, feats[0].shape[-1])  # type: ignore[union-attr]
        full[mask] = torch.cat(feats)  # type: ignore[arg-type]
        return logits, full

    def put(self, keys: list[bytes], logits: Tensor, features: Tensor | None, attention_mask: Tensor | None) -> None:
        self.misses += len(keys)
        for row, key in enumerate(keys):
            feat = None
            if self.store_features and features is not None:
                feat = features[row].detach()
                if feat.dim() == 2 and attention_mask is not None:
                    feat = feat[attention_mask[row].bool()]
            self._rows[key] = (logits[row].detach(), feat)


def row_keys(model_inputs: dict[str, Any]) -> list[bytes]:
    """One key per row: a digest of every model input of that row, padding removed.

    The teacher's output for a row is a function of exactly these tensors, so a changed dataset, tokenizer or max
    length gives a different key and can never reuse a stale cache entry.
    """
    tensors = {k: v.detach().cpu() for k, v in model_inputs.items() if isinstance(v, Tensor) and v.dim() >= 1}
    if "input_ids" not in tensors:
        raise ValueError("teacher_cache needs input_ids in the batch")
    mask = tensors.get("attention_mask")
    keys = []
    for row in range(tensors["input_ids"].shape[0]):
        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(tensors):
            value = tensors[name][row]
            if mask is not None and value.dim() >= 1 and value.shape[0] == mask.shape[1]:
                value = value[mask[row].bool()]
            digest.update(name.encode())
            digest.update(str(value.dtype).encode())
            digest.update(value.contiguous().numpy().tobytes())
        keys.append(digest.digest())
    return keys


def classifier_layers(peft_model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The Linear layers whose output can be the logits of a sequence classifier (out_features = num_labels).

    LoRA's own factors are skipped (lora_A has out_features = r, which can equal num_labels).
    With PEFT's modules_to_save the head exists as the original and one copy per adapter; only the active one runs,
    so hooking all of them and keeping the last input seen in a forward gives the features the logits came from.
    """
    num_labels = getattr(peft_model.config, "num_labels", None)
    layers = [
        m for name, m in peft_model.named_modules()
        if isinstance(m, torch.nn.Linear) and m.out_features == num_labels
        and not any(part.startswith("lora_") for part in name.split("."))  # LoRA A has out_features = r
    ]
    if not num_labels or not layers:
        raise ValueError(
            "svd_input='features' needs a sequence-classification head ending in a Linear layer with num_labels "
            f"outputs; {type(peft_model).__name__} has none. Use svd_input='logits'"
        )
    return layers


@contextmanager
def capture_classifier_input(layers: list[torch.nn.Linear]) -> Iterator[list[Tensor]]:
    """Collect the input of every call of `layers` during the block (forward pre-hooks, removed on exit)."""
    captured: list[Tensor] = []

    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0])

    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
