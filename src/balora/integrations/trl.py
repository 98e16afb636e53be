"""`BALoRASFTTrainer`: TRL's `SFTTrainer` (chat templates, completion-only loss, packing) with the BA-LoRA objective.

The loss is `balora.trainer.BALoRALossMixin.compute_loss`, the same code as `BALoRATrainer`'s; TRL contributes its
data path (dataset formatting, chat templates, tokenisation, `completion_only_loss` / `assistant_only_loss` labels,
packing and its collator) and its training defaults. Needs the optional extra: `pip install balora[trl]`.

    model = get_balora_model(AutoModelForCausalLM.from_pretrained(NAME), BALoRAConfig(r=16))
    trainer = BALoRASFTTrainer(model=model, args=SFTConfig(output_dir="out"), train_dataset=dataset,
                               processing_class=tokenizer)
    trainer.train()
    trainer.save_adapter("out/adapter")  # a plain LoRA on the original base model (rank 2r for PiSSA)

How TRL's options meet the regularizers' definitions (docs/trl.md):
- completion-only / assistant-only loss: every term uses the same token mask as the cross-entropy (labels != -100),
  so the consistency KL, the entropy and the SVD term see only the completion tokens, as in the paper's code;
- packing: TRL's "bfd" packing is padding-free (one row of concatenated documents, `position_ids` restarting at 0,
  the first token of each document masked); per-token terms (task, consistency, diversity) are unchanged, the SVD
  term is a statistic of the micro-batch's token matrix, which packing fills with more tokens per step;
- TRL's other losses (`loss_type="dft"`, label smoothing, `compute_loss_func`) replace the task term and are refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from balora.adapter import AdapterForm, get_balora_model, save_adapter
from balora.config import BALoRAConfig
from balora.teacher import unwrap_model, unwrap_peft_model
from balora.trainer import BALoRALossMixin

try:
    from trl import SFTTrainer
except ImportError as error:  # pragma: no cover - depends on the optional extra
    raise ImportError("balora.integrations.trl needs TRL: pip install 'balora[trl]'") from error


class BALoRASFTTrainer(BALoRALossMixin, SFTTrainer):
    """`trl.SFTTrainer` whose loss is BA-LoRA's (task cross-entropy + λ-weighted regularizers, logged per term).

    `model`: a causal LM from `get_balora_model`, or a plain `PreTrainedModel` together with `balora_config=` (it is
    wrapped here). Every other argument is `SFTTrainer`'s; `peft_config` is refused, because balora builds the
    adapters (the trainable one and the frozen teacher).
    """

    def __init__(self, model: torch.nn.Module, args: Any = None, *, balora_config: BALoRAConfig | None = None,
                 **kwargs: Any) -> None:
        if kwargs.get("peft_config") is not None:
            raise ValueError(
                "BALoRASFTTrainer builds its own adapters: drop peft_config and pass a model from get_balora_model "
                "(or a plain model with balora_config=BALoRAConfig(...))"
            )
        if isinstance(model, str):
            raise TypeError("BALoRASFTTrainer needs a loaded model, not a name: load it with from_pretrained first")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func would replace BA-LoRA's loss; remove it")
        if args is not None and (getattr(args, "loss_type", "nll") != "nll" or args.label_smoothing_factor > 0):
            raise ValueError(
                f"BA-LoRA's task term is the plain cross-entropy; got loss_type={args.loss_type!r}, "
                f"label_smoothing_factor={args.label_smoothing_factor}. Use loss_type='nll' and no label smoothing"
            )
        wrap = not isinstance(unwrap_model(model), PeftModel) and balora_config is not None
        if wrap and balora_config.method != "full":
            model = get_balora_model(model, balora_config)
            balora_config = None  # the resolved copy travels with the model
        super().__init__(model=model, args=args, balora_config=balora_config, **kwargs)
        if self.balora_config.task != "nlg":
            raise ValueError("BALoRASFTTrainer trains causal LMs (task 'nlg'); use BALoRATrainer for classification")

    def save_adapter(self, directory: str | Path, *, form: AdapterForm = "lora") -> Path:
        """`balora.adapter.save_adapter` on the trained model: a plain LoRA on the original base by default."""
        return save_adapter(unwrap_peft_model(self.model), directory, form=form)
