"""QPiSSA: decompose in full precision, then quantize the residual to 4-bit NF4 (bitsandbytes).

Reference: Meng et al., PiSSA (NeurIPS 2024), Section 5 (QPiSSA). `get_balora_model` runs PiSSA on the float weights
(W = W_res + s·B0·A0); `quantize_residual` then replaces every adapted layer's base weight by NF4(W_res). The model
computes NF4(W_res) + s·B·A: the principal part stays in the float adapter, and the residual, whose largest singular
values were removed, quantizes with a smaller error than W itself (QLoRA quantizes W). The teacher adapter shares the
quantized base, so it computes NF4(W_res) + s·B0·A0 = W − (W_res − NF4(W_res)): the pre-trained model up to the
residual's quantization error (tested against that formula, and against QLoRA's error).

Needs the optional extra `pip install balora[bnb]`. bitsandbytes ≥ 0.45 quantizes and runs NF4 layers on the CPU too
(slowly; it logs that an optional CPU kernel is missing). The exported plain LoRA (`save_adapter`, rank 2r) is an
update of the *float* W: loading it on W gives W_res + s·B·A, which differs from the trained model by the same
quantization error.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer


def _bnb():  # noqa: ANN202
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError("quantize_residual needs bitsandbytes: pip install 'balora[bnb]'") from error
    return bitsandbytes


@torch.no_grad()
def quantize_residual(peft_model: PeftModel, *, compute_dtype: torch.dtype | None = None,
                      blocksize: int = 64) -> int:
    """Replace the base weight of every adapted `nn.Linear` by its NF4 quantization, in place; returns the count.

    Call it on a model from `get_balora_model` (after the PiSSA init, which needs the float weights). `compute_dtype`:
    the dtype the 4-bit layers compute in (default: the weight's own dtype).
    """
    bnb = _bnb()
    count = done = 0
    for layer in [m for m in peft_model.modules() if isinstance(m, LoraLayer)]:
        base = layer.get_base_layer()
        if isinstance(base, bnb.nn.Linear4bit):
            done += 1
            continue
        if type(base) is not torch.nn.Linear:
            raise ValueError(f"quantize_residual handles torch.nn.Linear base layers; got {type(base).__name__}")
        weight = base.weight
        quantized = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=base.bias is not None,
                                      compute_dtype=compute_dtype or weight.dtype, quant_type="nf4",
                                      device="meta")
        quantized.weight = bnb.nn.Params4bit(weight.data.detach().clone(), requires_grad=False, quant_type="nf4",
                                             blocksize=blocksize)
        if base.bias is not None:
            quantized.bias = torch.nn.Parameter(base.bias.data.detach().clone(), requires_grad=False)
        layer.base_layer = quantized.to(weight.device)  # moving the Params4bit is what quantizes it
        count += 1
    if count == 0:
        raise ValueError("the base layers are already quantized" if done else
                         "no adapted Linear layer to quantize: build the model with get_balora_model first")
    return count


def dequantized_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The float weight a 4-bit base layer computes with (for checks and reports)."""
    bnb = _bnb()
    weight = layer.weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
