"""Sequence-classification heads that fit the backbone, and finding a model's head generically.

`pooling="cls"` is the model class's own head (`AutoModelForSequenceClassification`: BERT puts it on the [CLS] pooler,
decoders on the last token). `pooling="mean"` is `MeanPooledForSequenceClassification`: the backbone's last hidden
states, averaged over the attention mask, into a fresh `Linear` head. Sentence-embedding models such as
all-MiniLM-L6-v2 were trained with exactly that pooling; their [CLS] pooler was never trained (NOTES: a linear probe
on the frozen mean-pooled features scores 0.781 on SST-2, on the pooler output 0.701).

`find_head` names the modules a fine-tune must train in full and keep out of the adapted targets: the Linear layer that
produces the `num_labels` outputs (its parent too when that parent is a head module such as RoBERTa's
`classifier.dense/out_proj` or T5's `classification_head`), and any module whose weights were created fresh when the
checkpoint was loaded (recorded by `balora.models.load_model`, e.g. DeBERTa's `pooler`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.pytorch_utils import Conv1D

Pooling = Literal["cls", "mean"]
POOLING_KEY = "balora_pooling"  # in config.json of a saved MeanPooledForSequenceClassification
NEW_MODULES_ATTR = "balora_new_modules"  # modules whose weights were created at load (not in the checkpoint)


def masked_mean(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(B, T, H) hidden states averaged over the positions where `attention_mask` (B, T) is 1 -> (B, H).

    A row with an all-zero mask gives zeros (never NaN). Accumulates in float32.
    """
    if attention_mask is None:
        return hidden.float().mean(dim=1).to(hidden.dtype)
    mask = attention_mask.to(hidden.device, torch.float32).unsqueeze(-1)  # (B, T, 1)
    total = (hidden.float() * mask).sum(dim=1)
    return (total / mask.sum(dim=1).clamp_min(1.0)).to(hidden.dtype)


def _hidden_size(config: PretrainedConfig) -> int:
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot find the hidden size in a {type(config).__name__}; use model.pooling 'cls'")


class LinearHead(nn.Module):
    """Dropout, then one Linear layer: (B, H) pooled features -> (B, num_labels) logits."""

    def __init__(self, hidden: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden, num_labels)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.out_proj(self.dropout(pooled))


class MeanPooledForSequenceClassification(PreTrainedModel):
    """`backbone` (any `AutoModel` encoder or decoder) -> masked mean of the last hidden states -> `LinearHead`.

    The head is named `classifier`, as in BERT, so PEFT trains it in full (`modules_to_save`); its input is the pooled
    features before dropout. Loss as in transformers: MSE for regression (`num_labels == 1`), cross-entropy otherwise.
    """

    base_model_prefix = "backbone"
    _supports_sdpa = True

    def __init__(self, config: PretrainedConfig, backbone: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"pooling 'mean' takes an encoder-only or decoder-only backbone; {config.model_type} is an "
                "encoder-decoder model: use model.pooling 'cls' (its own classification head)"
            )
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config)
        dropout = getattr(config, "classifier_dropout", None)
        if dropout is None:
            dropout = getattr(config, "hidden_dropout_prob", 0.1)
        self.classifier = LinearHead(_hidden_size(config), config.num_labels, float(dropout or 0.0))
        std = float(getattr(config, "initializer_range", 0.02))
        with torch.no_grad():  # only the fresh head is initialised: the backbone keeps its (pre-trained) weights
            self.classifier.out_proj.weight.normal_(0.0, std)
            self.classifier.out_proj.bias.zero_()
        self.config.architectures = [type(self).__name__]
        setattr(self.config, POOLING_KEY, "mean")
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:  # the weights are set in __init__ or loaded, never re-drawn
        return None

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        extra = {k: v for k, v in kwargs.items() if v is not None and k in ("token_type_ids", "position_ids")}
        outputs = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            **extra,
        )
        pooled = masked_mean(outputs.last_hidden_state, attention_mask)  # (B, H)
        logits = self.classifier(pooled)  # (B, num_labels)
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float().view(-1))
            else:
                loss = F.cross_entropy(logits.float().view(-1, self.config.num_labels), labels.view(-1))
        return SequenceClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    @classmethod
    def from_backbone(
        cls, path: str, *, config_kwargs: dict[str, Any], **load_kwargs: Any
    ) -> MeanPooledForSequenceClassification:
        """The pre-trained backbone in `path` (a checkpoint or a saved mean-pooled classifier) with a mean-pooled head.

        A folder saved from this class (a merged export) is loaded whole, head included.
        """
        config_file = Path(path) / "config.json"
        saved = config_file.is_file() and json.loads(config_file.read_text()).get(POOLING_KEY) == "mean"
        if saved:
            return _load_saved(cls, path, config_kwargs, load_kwargs)
        backbone = AutoModel.from_pretrained(path, **load_kwargs)
        config = backbone.config
        for key, value in config_kwargs.items():
            setattr(config, key, value)
        model = cls(config, backbone=backbone)
        setattr(model, NEW_MODULES_ATTR, ["classifier"])
        return model.to(backbone.dtype)


def _load_saved(cls: type, path: str, config_kwargs: dict[str, Any], load_kwargs: dict[str, Any]) -> Any:
    from safetensors.torch import load_file

    config = AutoConfig.from_pretrained(path, trust_remote_code=load_kwargs.get("trust_remote_code", False))
    for key, value in config_kwargs.items():
        if getattr(config, key, value) != value:
            raise ValueError(f"{path} was saved with {key}={getattr(config, key)!r}, not {value!r}")
        setattr(config, key, value)
    model = cls(config)
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has a mean-pooled classifier config.json but no *.safetensors weights")
    state: dict[str, Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]})")
    model.tie_weights()
    dtype = load_kwargs.get("dtype")
    return model.to(dtype) if isinstance(dtype, torch.dtype) else model


def _tied_keys(model: PreTrainedModel) -> set[str]:
    return set(getattr(model, "all_tied_weights_keys", {}) or {})


# ------------------------------------------------------------------------------------------------------------------
# Finding the head of any *ForSequenceClassification model
# ------------------------------------------------------------------------------------------------------------------
def _is_output_layer(name: str, module: nn.Module, num_labels: int) -> bool:
    if any(part.startswith("lora_") for part in name.split(".")):  # LoRA's A has out_features = r
        return False
    if isinstance(module, nn.Linear):
        return module.out_features == num_labels
    return isinstance(module, Conv1D) and module.nf == num_labels


def find_head(model: nn.Module) -> list[str]:
    """Module names (relative to `model`) of the sequence-classification head, to train in full and never adapt.

    The last Linear/Conv1D with `config.num_labels` outputs is the output layer; when its parent is a module of its
    own (not the model, not the backbone), the parent is the head (RoBERTa `classifier`, T5/BART
    `classification_head`). Modules recorded as created at load (`balora_new_modules`) are added.
    """
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    outputs = []  # under PEFT, `X.modules_to_save.<adapter>.Y` and `X.original_module.Y` are named `X.Y`
    for name, module in model.named_modules():
        plain = re.sub(r"\.(modules_to_save\.[^.]+|original_module)(?=\.|$)", "", name)
        if name and num_labels and _is_output_layer(name, module, num_labels) and plain not in outputs:
            outputs.append(plain)
    if not outputs:
        raise ValueError(
            f"no classification head found in this {type(model).__name__}: no Linear layer has num_labels="
            f"{num_labels} outputs; name the head in modules_to_save"
        )
    head = outputs[-1]
    if "." in head:
        parent = head.rsplit(".", 1)[0]
        prefix = getattr(model, "base_model_prefix", "")
        if "." not in parent and parent != prefix and not _holds_layers(model.get_submodule(parent)):
            head = parent
    names = [head]
    for new in getattr(model, NEW_MODULES_ATTR, None) or []:
        if not any(new == n or new.startswith(n + ".") for n in names):
            names.append(new)
    return names


@torch.no_grad()
def set_output_bias(model: nn.Module, value: float) -> bool:
    """Set the bias of the head's output layer to `value` (a regression head starting at the labels' mean).

    Returns False (nothing changed) when the output layer has no bias, as in decoders' `score`.
    """
    names = find_head(model)
    module = model.get_submodule(names[0])
    num_labels = model.config.num_labels
    layers = [m for n, m in module.named_modules() if _is_output_layer(n or "head", m, num_labels)]
    bias = getattr(layers[-1], "bias", None) if layers else None
    if bias is None:
        return False
    bias.fill_(value)
    return True


def _holds_layers(module: nn.Module) -> bool:
    """A backbone (many nested modules), not a small head module (under PEFT: its original module is counted)."""
    return sum(1 for _ in getattr(module, "original_module", module).modules()) > 8
