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

from collections import defaultdict
from contextlib import ExitStack
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
from balora.nlu import (
    TeacherCache,
    capture_classifier_input,
    capture_input,
    check_consistency_target,
    classifier_layers,
    current_head_logits,
    head_parameters,
    last_token_index,
    locate_head,
    pooled,
    row_keys,
)
from balora.rowblocks import valid_rows
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
        nlu_target = config.consistency_target if config.task == "nlu" else None
        # NLU: the head (its input is the pooled features of the consistency targets; its own learning rate).
        self._head = locate_head(peft_model) if config.task == "nlu" else None
        if self._head is not None:
            check_consistency_target(config, peft_model)
        self._teacher_needs_features = nlu_target in ("current_head", "features")
        # svd_input="features": the Linear layers that can produce the logits (checked now, hooked per forward).
        self._logit_layers = classifier_layers(peft_model) if config.svd_input == "features" else []
        # We compute the task loss ourselves from the logits, normalised by num_items_in_batch: ask the Trainer to
        # count the items of each optimizer step (it does so only for models that take loss kwargs).
        self.model_accepts_loss_kwargs = True
        self._term_logs: dict[str, dict[str, list[Tensor]]] = {"train": defaultdict(list)}
        # NLU teacher cache: row key -> the teacher's logits (and head input) for that row (see `row_keys`).
        self._teacher_cache = TeacherCache(self._teacher_needs_features) if config.teacher_cache else None

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

        teacher_logits = teacher_feats = None
        if l1 > 0:
            teacher_logits, teacher_feats = self._teacher_outputs(model, model_inputs)
        features = consistency_features = None
        if cfg.task == "nlu":
            outputs, features, teacher_logits, consistency_features = self._nlu_forward(
                model, model_inputs, teacher_logits, teacher_feats, l1 > 0, l3 > 0
            )
        else:
            hidden_svd = l3 > 0 and self.svd_method == "hidden"
            outputs = model(**model_inputs, **({"output_hidden_states": True} if hidden_svd else {}))
        logits = outputs.logits
        ga = self._accumulation_steps() if training else 1
        if cfg.task == "nlg" and cfg.loss_impl == "fused":
            loss, values = self._fused_nlg(
                model, outputs, labels, teacher_logits, (l1, l2, l3), ga, num_items_in_batch
            )
        else:
            loss, values = self._reference_loss(
                logits, labels, teacher_logits, (l1, l2, l3), ga, num_items_in_batch, svd_features=features,
                consistency_features=consistency_features,
            )

        # Evaluation logs no terms: λ is 0 there, so the loss is the task loss and the Trainer's eval_loss (weighted
        # by rows) already reports it; a per-batch mean here would weigh a short last batch like a full one.
        if training:
            store = self._term_logs["train"]
            for name, value in values.items():
                store[name].append(value.detach())
            for name, weight in zip(
                ("lambda_consistency", "lambda_diversity", "lambda_svd"), (l1, l2, l3), strict=True
            ):
                store[name].append(torch.tensor(weight))
        return (loss, outputs) if return_outputs else loss

    def _nlu_forward(
        self,
        model: torch.nn.Module,
        model_inputs: dict[str, Any],
        teacher_logits: Tensor | None,
        teacher_feats: Tensor | None,
        consistency_on: bool,
        svd_on: bool,
    ) -> tuple[Any, Tensor | None, Tensor | None, tuple[Tensor, Tensor] | None]:
        """The student forward of an NLU model, capturing what the terms need (`balora.nlu`).

        Returns (outputs, the SVD term's (N, H) features or None, the consistency target's logits,
        (student, pre-trained) pooled features for consistency_target="features" or None).
        """
        cfg = self.balora_config
        target = cfg.consistency_target if consistency_on else None
        with ExitStack() as stack:
            svd_captured = head_captured = None
            if svd_on and cfg.svd_input == "features":
                svd_captured = stack.enter_context(capture_classifier_input(self._logit_layers))
            if target == "features":
                head_captured = stack.enter_context(capture_input(self._head.module))
            outputs = model(**model_inputs)
        features = None
        if svd_captured is not None:
            features = svd_captured[-1] if svd_captured else None
            if features is not None and features.dim() == 3:  # a decoder's score maps every token: read the last one
                index = last_token_index(model_inputs["input_ids"], self._pad_token_id())
                features = features[torch.arange(features.shape[0], device=features.device), index]
            if features is None or features.dim() != 2 or features.shape[0] != outputs.logits.shape[0]:
                raise RuntimeError(
                    "svd_input='features': no (batch, features) input reached the classifier's last Linear in this "
                    "forward; this model's head is not supported, use svd_input='logits'"
                )
        consistency_features = None
        if target == "current_head":
            teacher_logits = current_head_logits(self._head, teacher_feats, model_inputs, self._pad_token_id())
        elif target == "features":
            if not head_captured:
                raise RuntimeError("consistency_target='features': the head was not called in this forward")
            mask = model_inputs.get("attention_mask")
            consistency_features = (pooled(head_captured[-1], mask), pooled(teacher_feats, mask))
        return outputs, features, teacher_logits, consistency_features

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
        consistency_features: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The objective from the plain functions of `balora.losses` (NLU, and NLG with loss_impl="reference").

        `svd_features` (NLU, svd_input="features"): the batch matrix the SVD term acts on instead of the logits.
        `consistency_features` (NLU, consistency_target="features"): (student, pre-trained) pooled features.
        """
        cfg = self.balora_config
        l1, l2, l3 = weights
        task_sum, count = self._task_loss_sum(logits, labels)
        task_loss = task_sum / self._task_denominator(count, ga, num_items_in_batch)
        terms: dict[str, Tensor | None] = {"consistency_loss": None, "diversity_loss": None, "svd_loss": None}
        if cfg.task == "nlu":
            if l1 > 0 and consistency_features is not None:
                terms["consistency_loss"] = losses.nlu_feature_consistency(*consistency_features)
            elif l1 > 0:
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
        rows = valid_rows(labels)  # (M,): once per step, for the fused pass and the hidden-state SVD term
        count = rows.numel()
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
            rows=rows,
        )
        if hidden_svd:
            head = _frozen_bias_free_head(model)
            svd = hidden_svd_loss(outputs.hidden_states[-1], labels, head.weight, top_k=cfg.svd_top_k, rows=rows)
            loss = loss + (l3 / ga) * svd
            values = {**values, "svd_loss": svd.detach()}
        return loss, dict(values)

    def _teacher_outputs(self, model: torch.nn.Module, model_inputs: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """The pre-trained model's logits and (when a consistency target needs them) its head input features; from
        the NLU cache when every row of the batch is in it."""
        cache, mask = self._teacher_cache, model_inputs.get("attention_mask")
        keys = row_keys(model_inputs) if cache is not None else None
        if cache is not None and (hit := cache.get(keys, mask)) is not None:
            return hit
        with ExitStack() as stack:
            captured = stack.enter_context(capture_input(self._head.module)) if self._teacher_needs_features else None
            stack.enter_context(pretrained_teacher(model))
            logits = model(**model_inputs).logits
        features = None
        if captured is not None:
            if not captured:
                raise RuntimeError("the pre-trained model's forward did not call the classification head")
            features = captured[-1]
        if cache is not None:
            cache.put(keys, logits, features, mask)
        return logits, features

    def _pad_token_id(self) -> int | None:
        return getattr(unwrap_model(self.model).config, "pad_token_id", None)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer; with `head_learning_rate`, the head's parameters get their own group."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        head_lr = self.balora_config.head_learning_rate
        if head_lr is None or self._head is None or getattr(self, "_head_group_added", False):
            return optimizer
        head_ids = {id(p) for p in head_parameters(self.model)}
        for group in list(optimizer.param_groups):
            in_head = [p for p in group["params"] if id(p) in head_ids]
            if in_head:
                group["params"] = [p for p in group["params"] if id(p) not in head_ids]
                optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": in_head,
                                           "lr": head_lr})
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
        self._head_group_added = True
        return optimizer

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
        training_log = "loss" in logs  # the Trainer's evaluation logs carry eval_loss instead
        store = self._term_logs["train"]
        if training_log:
            for name, values in store.items():
                if values:
                    logs[name] = torch.stack([v.float().cpu() for v in values]).mean().item()
            store.clear()
        cache = self._teacher_cache
        if training_log and cache is not None and cache.hits + cache.misses:
            logs["teacher_cache_hit_rate"] = cache.hits / (cache.hits + cache.misses)
            cache.hits = cache.misses = 0  # the rate since the last log
        super().log(logs, start_time)


class BALoRATrainer(BALoRALossMixin, Trainer):
    """A Trainer for models from `get_balora_model`; logs `task_loss`, each regularizer and each current λ."""


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
