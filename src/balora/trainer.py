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
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Trainer

from balora import losses
from balora.config import BALoRAConfig
from balora.teacher import pretrained_teacher, unwrap_peft_model


class BALoRATrainer(Trainer):
    """A Trainer for models from `get_balora_model`; logs `task_loss`, each regularizer and each current λ."""

    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, balora_config: BALoRAConfig | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        peft_model = unwrap_peft_model(self.model)
        config = balora_config or getattr(peft_model, "balora_config", None)
        if config is None:
            raise ValueError("no BALoRAConfig: build the model with get_balora_model or pass balora_config=")
        if config.task is None:
            raise ValueError("balora_config.task is not set: call config.resolve(task) or use get_balora_model")
        self.balora_config = config
        # We compute the task loss ourselves from the logits, normalised by num_items_in_batch: ask the Trainer to
        # count the items of each optimizer step (it does so only for models that take loss kwargs).
        self.model_accepts_loss_kwargs = True
        self._term_logs: dict[str, dict[str, list[Tensor]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

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
            with pretrained_teacher(model):
                teacher_logits = model(**model_inputs).logits
        outputs = model(**model_inputs)
        logits = outputs.logits

        task_sum, count = self._task_loss_sum(logits, labels)
        if num_items_in_batch is None:
            task_loss = task_sum / max(count, 1)
            if training:
                task_loss = task_loss / self._accumulation_steps()
        else:
            task_loss = task_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                task_loss = task_loss * self.accelerator.num_processes  # DDP averages gradients over processes

        terms = {"consistency_loss": None, "diversity_loss": None, "svd_loss": None}
        if cfg.task == "nlu":
            if l1 > 0:
                terms["consistency_loss"] = losses.nlu_consistency(logits, teacher_logits, temperature=cfg.temperature)
            if l2 > 0:
                terms["diversity_loss"] = losses.nlu_diversity(logits)
            if l3 > 0:
                terms["svd_loss"] = losses.nlu_svd(logits, top_k=cfg.svd_top_k)
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
                    exact=True if cfg.svd_method == "exact" else None,
                )

        regularizer = task_loss.new_zeros(())
        for weight, value in zip((l1, l2, l3), terms.values(), strict=True):
            if value is not None:
                regularizer = regularizer + weight * value
        if training:
            regularizer = regularizer / self._accumulation_steps()
        loss = task_loss + regularizer

        split = "train" if training else "eval"
        store = self._term_logs[split]
        store["task_loss"].append((task_sum / max(count, 1)).detach())
        for name, value in terms.items():
            if value is not None:
                store[name].append(value.detach())
        if training:
            for name, weight in zip(
                ("lambda_consistency", "lambda_diversity", "lambda_svd"), (l1, l2, l3), strict=True
            ):
                store[name].append(torch.tensor(weight))
        return (loss, outputs) if return_outputs else loss

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
        problem_type = getattr(unwrap_peft_model(self.model).config, "problem_type", None)
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
        super().log(logs, start_time)
