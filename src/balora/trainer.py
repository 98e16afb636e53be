"""`BALoRATrainer`: `transformers.Trainer` with the BA-LoRA objective.

total = task loss + λ1(t)·consistency + λ2(t)·diversity + λ3(t)·SVD  (paper Eq. 10), where the λ follow the schedules
of `BALoRAConfig.weights_at`. Only `compute_loss` and `log` are overridden (the pattern of TRL's GKDTrainer); a term
whose λ is 0 is not computed, and the teacher forward is skipped when λ1 = 0.

Normalisation under gradient accumulation (one rule, tested):
- the task loss is a sum over items (supervised tokens for NLG, examples for NLU) divided by `num_items_in_batch`,
  the number of items in the whole optimizer step (all accumulated micro-batches, and all processes when
  `average_tokens_across_devices`), exactly as transformers normalises its own causal-LM loss; so accumulation gives
  the same gradient as one large batch;
- each regularizer is a statistic of one micro-batch (a mean over its tokens or examples, or a batch covariance or
  spectrum), divided by the number of accumulation steps, so an optimizer step sees the mean over micro-batches
  with its weight λ, never λ times the number of accumulation steps. Under data parallelism the regularizers are
  per-device statistics averaged over devices, as in the paper's code.
The Trainer is told the loss is already scaled (`loss_is_scaled_for_ga = True`).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import Tensor
from transformers import Trainer

from balora import losses
from balora.adapter import detect_task
from balora.config import BALoRAConfig
from balora.fused import nlg_fused_loss
from balora.spectral import hidden_svd_loss
from balora.teacher import pretrained_teacher, unwrap_model


class BALoRALossMixin:
    """The BA-LoRA objective for any `transformers.Trainer` subclass: `compute_loss`, `log` and their helpers.

    Put it first in the bases (`class T(BALoRALossMixin, SomeTrainer)`); `BALoRATrainer` and
    `balora.integrations.trl.BALoRASFTTrainer` share it, so both compute the same loss.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, balora_config: BALoRAConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        peft_model = unwrap_model(self.model)
        config = balora_config or getattr(peft_model, "balora_config", None)
        if config is None:
            raise ValueError("no BALoRAConfig: build the model with get_balora_model or pass balora_config=")
        if (config.method == "full") == isinstance(peft_model, PeftModel):
            raise TypeError(
                "method='full' trains a plain transformers model (no adapter); every other method needs the "
                f"PeftModel from get_balora_model; got method={config.method!r} and a {type(peft_model).__name__}"
            )
        if config.method == "full" and config.task is None:
            config = config.resolve(detect_task(peft_model))
        if config.task is None:
            raise ValueError("balora_config.task is not set: call config.resolve(task) or use get_balora_model")
        self.balora_config = config
        self.svd_method = resolve_svd_method(config, peft_model)
        # svd_input="features": the Linear layers that can produce the logits (checked now, hooked per forward).
        self._logit_layers = classifier_layers(peft_model) if config.svd_input == "features" else []
        # We compute the task loss ourselves from the logits, normalised by num_items_in_batch: ask the Trainer to
        # count the items of each optimizer step (it does so only for models that take loss kwargs).
        self.model_accepts_loss_kwargs = True
        self._term_logs: dict[str, dict[str, list[Tensor]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        # NLU teacher cache: row key -> the teacher's logits for that row (see `row_keys`).
        self._teacher_cache: dict[bytes, Tensor] = {}
        self._cache_hits = self._cache_misses = 0

    # ------------------------------------------------------------------------------------------------------------
    def current_weights(self) -> tuple[float, float, float]:
        """(λ1, λ2, λ3) at the current step."""
        total = self.state.max_steps or 0
        progress = self.state.global_step / total if total > 0 else 0.0
        return self.balora_config.weights_at(progress)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        if "labels" not in inputs:
            raise ValueError(
                "BALoRATrainer needs `labels` in every batch (class ids, regression targets or token ids)"
            )
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        training = model.training
        cfg = self.balora_config
        l1, l2, l3 = self.current_weights() if training else (0.0, 0.0, 0.0)

        teacher_logits = None
        if l1 > 0:
            teacher_logits = self._teacher_logits(model, model_inputs)
        hidden_svd = cfg.task == "nlg" and l3 > 0 and self.svd_method == "hidden"
        features = None
        if cfg.task == "nlu" and l3 > 0 and cfg.svd_input == "features":
            with capture_classifier_input(self._logit_layers) as captured:
                outputs = model(**model_inputs)
            features = captured[-1] if captured else None
            if features is None or features.dim() != 2 or features.shape[0] != labels.shape[0]:
                raise RuntimeError(
                    "svd_input='features': no (batch, features) input reached the classifier's last Linear in this "
                    "forward; this model's head is not supported, use svd_input='logits'"
                )
        else:
            outputs = model(**model_inputs, **({"output_hidden_states": True} if hidden_svd else {}))
        logits = outputs.logits
        ga = self._accumulation_steps() if training else 1
        if cfg.task == "nlg" and cfg.loss_impl == "fused":
            loss, values = self._fused_nlg(
                model, outputs, labels, teacher_logits, (l1, l2, l3), ga, num_items_in_batch
            )
        else:
            loss, values = self._reference_loss(
                logits, labels, teacher_logits, (l1, l2, l3), ga, num_items_in_batch, svd_features=features
            )

        store = self._term_logs["train" if training else "eval"]
        for name, value in values.items():
            store[name].append(value.detach())
        if training:
            for name, weight in zip(
                ("lambda_consistency", "lambda_diversity", "lambda_svd"), (l1, l2, l3), strict=True
            ):
                store[name].append(torch.tensor(weight))
        return (loss, outputs) if return_outputs else loss

    def _task_denominator(self, count: int, ga: int, num_items_in_batch: Tensor | int | None) -> Tensor | float:
        """What the summed task loss is divided by (see the module docstring)."""
        if num_items_in_batch is None:
            return float(max(count, 1) * ga)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            return num_items_in_batch / self.accelerator.num_processes  # DDP averages gradients over processes
        return num_items_in_batch

    def _reference_loss(
        self,
        logits: Tensor,
        labels: Tensor,
        teacher_logits: Tensor | None,
        weights: tuple[float, float, float],
        ga: int,
        num_items_in_batch: Tensor | int | None,
        svd_features: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective from the plain functions of `balora.losses` (NLU, and NLG with loss_impl="reference").

        `svd_features` (NLU, svd_input="features"): the batch matrix the SVD term acts on instead of the logits.
        """
        cfg = self.balora_config
        l1, l2, l3 = weights
        task_sum, count = self._task_loss_sum(logits, labels)
        task_loss = task_sum / self._task_denominator(count, ga, num_items_in_batch)
        terms: dict[str, Tensor | None] = {"consistency_loss": None, "diversity_loss": None, "svd_loss": None}
        if cfg.task == "nlu":
            if l1 > 0:
                terms["consistency_loss"] = losses.nlu_consistency(logits, teacher_logits, temperature=cfg.temperature)
            if l2 > 0:
                terms["diversity_loss"] = losses.nlu_diversity(logits)
            if l3 > 0:
                spectrum_of = logits if svd_features is None else svd_features
                terms["svd_loss"] = losses.nlu_svd(spectrum_of, top_k=cfg.svd_top_k)
        else:
            if l1 > 0:
                terms["consistency_loss"] = losses.nlg_consistency(
                    logits, teacher_logits, labels, temperature=cfg.temperature
                )
            if l2 > 0:
                terms["diversity_loss"] = losses.nlg_diversity(logits, labels, top_k=cfg.entropy_top_k)
            if l3 > 0:
                terms["svd_loss"] = losses.nlg_svd(
                    logits,
                    labels,
                    top_k=cfg.svd_top_k,
                    oversample=cfg.svd_oversample,
                    niter=cfg.svd_loss_niter,
                    exact=True if self.svd_method != "randomized" else None,
                )
        loss = task_loss
        for weight, value in zip(weights, terms.values(), strict=True):
            if value is not None:
                loss = loss + (weight / ga) * value
        values = {"task_loss": task_sum / max(count, 1)}
        values.update({k: v for k, v in terms.items() if v is not None})
        return loss, values

    def _fused_nlg(
        self,
        model: torch.nn.Module,
        outputs: Any,
        labels: Tensor,
        teacher_logits: Tensor | None,
        weights: tuple[float, float, float],
        ga: int,
        num_items_in_batch: Tensor | int | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """NLG objective in one chunked pass with closed-form gradients (`balora.fused`, `balora.spectral`)."""
        cfg = self.balora_config
        l1, l2, l3 = weights
        hidden_svd = l3 > 0 and self.svd_method == "hidden"
        count = int(losses.nlg_valid_mask(labels).sum())
        loss, values = nlg_fused_loss(
            outputs.logits,
            labels,
            teacher_logits,
            ce_denominator=self._task_denominator(count, ga, num_items_in_batch),
            consistency_weight=l1 / ga,
            diversity_weight=l2 / ga,
            svd_weight=0.0 if hidden_svd else l3 / ga,
            temperature=cfg.temperature,
            entropy_top_k=cfg.entropy_top_k,
            svd_top_k=cfg.svd_top_k,
            svd_method="exact" if self.svd_method == "exact" else "randomized",
            svd_oversample=cfg.svd_oversample,
            svd_niter=cfg.svd_loss_niter,
        )
        if hidden_svd:
            head = _frozen_bias_free_head(model)
            svd = hidden_svd_loss(outputs.hidden_states[-1], labels, head.weight, top_k=cfg.svd_top_k)
            loss = loss + (l3 / ga) * svd
            values = {**values, "svd_loss": svd.detach()}
        return loss, dict(values)

    def _teacher_logits(self, model: torch.nn.Module, model_inputs: dict[str, Any]) -> Tensor:
        """The pre-trained model's logits, from the NLU cache when every row of the batch is in it."""
        if not self.balora_config.teacher_cache:
            with pretrained_teacher(model):
                return model(**model_inputs).logits
        keys = row_keys(model_inputs)
        cached = [self._teacher_cache.get(k) for k in keys]
        if all(c is not None for c in cached):
            self._cache_hits += len(keys)
            return torch.stack(cached)  # type: ignore[arg-type]
        with pretrained_teacher(model):
            logits = model(**model_inputs).logits
        for key, row in zip(keys, logits.detach(), strict=True):
            self._teacher_cache[key] = row
        self._cache_misses += len(keys)
        return logits

    def _accumulation_steps(self) -> int:
        return int(getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps) or 1)

    def _task_loss_sum(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
        """Sum of the per-item task losses and the item count, as the model's own loss would define them."""
        if self.balora_config.task == "nlg":
            shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            total = F.cross_entropy(shift_logits, shift_labels, ignore_index=losses.IGNORE_INDEX, reduction="sum")
            return total, int((shift_labels != losses.IGNORE_INDEX).sum())
        num_labels = logits.shape[-1]
        problem_type = getattr(unwrap_model(self.model).config, "problem_type", None)
        if num_labels == 1 or problem_type == "regression":
            total = F.mse_loss(logits.float().squeeze(-1), labels.float().view(-1), reduction="sum")
            return total, labels.numel()
        if problem_type == "multi_label_classification":
            total = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="sum")
            return total, labels.numel()
        flat = labels.view(-1)
        total = F.cross_entropy(
            logits.float().view(-1, num_labels), flat, ignore_index=losses.IGNORE_INDEX, reduction="sum"
        )
        return total, int((flat != losses.IGNORE_INDEX).sum())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        split = "train" if "loss" in logs else "eval"
        prefix = "eval_" if split == "eval" else ""
        store = self._term_logs[split]
        for name, values in store.items():
            if values:
                logs[f"{prefix}{name}"] = torch.stack([v.float().cpu() for v in values]).mean().item()
        store.clear()
        if split == "train" and self.balora_config.teacher_cache and self._cache_hits + self._cache_misses:
            logs["teacher_cache_hit_rate"] = self._cache_hits / (self._cache_hits + self._cache_misses)
            self._cache_hits = self._cache_misses = 0  # the rate since the last log
        super().log(logs, start_time)


class BALoRATrainer(BALoRALossMixin, Trainer):
    """A Trainer for models from `get_balora_model`; logs `task_loss`, each regularizer and each current λ."""


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


def _head_problem(peft_model: torch.nn.Module) -> str | None:
    """Why `svd_method="hidden"` (logits = hidden @ Wᵀ with W frozen) does not fit this model, or None."""
    head = peft_model.get_output_embeddings()
    config = peft_model.config
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        return "the model has no output head weight"
    if getattr(head, "bias", None) is not None:
        return "the output head has a bias"
    if head.weight.requires_grad:
        return "the output head is trained"
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None) not in (None, 1.0):
        return "the model soft-caps or scales its logits"
    return None


def resolve_svd_method(config: BALoRAConfig, peft_model: torch.nn.Module) -> str:
    """The NLG SVD method to run: `auto` becomes `hidden` where the head allows it, else `randomized`."""
    if config.task != "nlg":
        return config.svd_method
    problem = _head_problem(peft_model)
    if config.svd_method == "auto":
        return "randomized" if problem else "hidden"
    if config.svd_method == "hidden" and problem:
        raise ValueError(f"svd_method='hidden' does not fit this model: {problem}. Use 'randomized' or 'exact'.")
    return config.svd_method


def _frozen_bias_free_head(model: torch.nn.Module) -> torch.nn.Module:
    """The output head (checked by `resolve_svd_method` when the trainer was built)."""
    return unwrap_model(model).get_output_embeddings()
