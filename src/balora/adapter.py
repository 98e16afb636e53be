"""Wrap a Hugging Face model with PEFT LoRA adapters, PiSSA-initialised, plus a frozen copy of the initial adapter.

`get_balora_model` checks the request first (targets exist, are float Linear/Conv1D layers, r fits), so an impossible
request fails before any weight is touched. It then adds the trainable adapter `"default"` (PiSSA or LoRA init) and a
frozen adapter `"teacher"` holding the initial factors (A0, B0) and, for classification models, the initial head. With
the teacher adapter active, the model computes W_res + B0·A0 = W: the exact pre-trained model at the cost of one extra
adapter (see `balora.teacher`). The same initial factors turn the trained PiSSA adapter into a plain LoRA on W
(`lora_state_dict_for_base`, rank 2r).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.config import CordaConfig
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
from transformers.pytorch_utils import Conv1D

from balora.config import BALoRAConfig, Task
from balora.distributed import gathered_state_dict, init_on_this_rank, is_main_process, share_rank0_init
from balora.heads import find_head
from balora.init_cache import apply_pissa_all

ADAPTER = "default"
TEACHER = "teacher"


def detect_task(model: torch.nn.Module) -> Task:
    """nlu for `*ForSequenceClassification` models, nlg for causal LMs; an error otherwise."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "nlu"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "nlg"
    raise ValueError(
        f"cannot tell the task of a {name}: balora supports *ForSequenceClassification (nlu) and causal LM (nlg) "
        "models; set BALoRAConfig(task=...) only for one of those"
    )


def lora_config_for(model: torch.nn.Module, config: BALoRAConfig) -> LoraConfig:
    """The PEFT LoraConfig of the trainable adapter (initialised by PEFT as plain LoRA; PiSSA is applied after)."""
    task_type = TaskType.SEQ_CLS if config.task == "nlu" else TaskType.CAUSAL_LM
    targets = config.target_modules
    heads = find_head(model) if config.task == "nlu" else []
    extra = [m for m in config.modules_to_save or [] if m not in heads]
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        target_modules=list(targets) if isinstance(targets, list) else targets,
        modules_to_save=(heads + extra) or None,
        task_type=task_type,
        # PiSSA is applied after, by balora; OLoRA and CorDA by PEFT when the adapter is built
        init_lora_weights=config.init if config.init in ("olora", "corda") else True,
        corda_config=CordaConfig(corda_method=config.corda_method) if config.init == "corda" else None,
        use_dora=config.use_dora,
        use_rslora=config.use_rslora,
    )
    lora = _maybe_include_all_linear_layers(lora, model)
    # The head (and any module created fresh at load) is trained in full (modules_to_save); PEFT then never matches a
    # layer inside it as a target, whether the targets are 'all-linear' or names such as 'dense' (tested).
    if any(isinstance(m, Conv1D) for _, m in _matched_modules(model, lora)):
        if config.init == "olora":
            raise ValueError("init='olora' (PEFT's QR init) does not handle GPT-2's Conv1D layers; use init='pissa'")
        lora.fan_in_fan_out = True
    return lora


def _matched_modules(model: torch.nn.Module, lora: LoraConfig) -> list[tuple[str, torch.nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if name and check_target_module_exists(lora, name)]


def validate_targets(model: torch.nn.Module, lora: LoraConfig) -> list[str]:
    """Raise a clear error for an impossible request; return the names of the matched modules."""
    matched = _matched_modules(model, lora)
    if not matched:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)}
        )
        raise ValueError(
            f"target_modules={lora.target_modules!r} matches no module of this {type(model).__name__}; "
            f"its Linear layers are named {linear}"
        )
    for name, module in matched:
        if not isinstance(module, torch.nn.Linear | Conv1D):
            raise ValueError(
                f"target {name!r} is a {type(module).__name__}; balora adapts torch.nn.Linear and GPT-2 Conv1D layers "
                "only. Name the Linear layers inside it instead."
            )
        weight = module.weight
        if not weight.dtype.is_floating_point or type(weight) is not torch.nn.Parameter:
            raise ValueError(
                f"target {name!r} has a {weight.dtype} weight ({type(weight).__name__}): PiSSA needs a float, "
                "unquantized weight. Load the model in float32/bfloat16, or quantize after initialisation."
            )
        out_f, in_f = (weight.shape[1], weight.shape[0]) if isinstance(module, Conv1D) else weight.shape
        if lora.r > min(out_f, in_f):
            raise ValueError(
                f"rank r={lora.r} is larger than min(out, in)={min(out_f, in_f)} of target {name!r} "
                f"({out_f}×{in_f}); lower r or drop this target"
            )
    return [name for name, _ in matched]


def get_balora_model(model: torch.nn.Module, config: BALoRAConfig, *,
                     calibration: Callable[[torch.nn.Module], None] | None = None) -> PeftModel:
    """Wrap `model` with a PiSSA (or LoRA) adapter and a frozen teacher adapter; returns a `peft.PeftModel`.

    The returned model carries the resolved config as `model.balora_config`. Only the adapter `"default"` (and, for
    classification, its head copy) is trainable. Under torch.distributed every rank must call it: rank 0 computes the
    init and shares it (`balora.distributed`). `init="corda"` needs `calibration(model)`: it runs the plain model on
    training rows (forward only, one row per pass) while PEFT's `preprocess_corda` collects each target layer's input
    covariance.
    """
    if isinstance(model, PeftModel):
        raise ValueError("model is already a PeftModel; pass the plain transformers model to get_balora_model")
    if config.method == "full":
        raise ValueError(
            "method='full' (full fine-tuning) has no adapter to build: train the plain model with BALoRATrainer("
            "balora_config=BALoRAConfig(method='full')) or transformers' Trainer, or use `balora train`"
        )
    task = config.task or detect_task(model)
    config = config.resolve(task)
    heads = find_head(model) if task == "nlu" else []
    if heads:
        from balora.nlu import check_consistency_target

        check_consistency_target(config, model)
    lora = lora_config_for(model, config)
    validate_targets(model, lora)
    if config.init == "corda":
        if calibration is None:
            raise ValueError("init='corda' calibrates on training rows: pass get_balora_model(..., calibration=fn), "
                             "fn(model) running forward passes, or train with `balora train`")
        _calibrate_corda(model, lora, calibration)

    peft_model = get_peft_model(model, lora)
    layers = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]
    # Several processes: rank 0 initialises, the others receive its weights (balora.distributed).
    init_here = init_on_this_rank([layer.get_base_layer().weight for _, layer in layers])
    if config.init == "pissa" and init_here:
        apply_pissa_all(layers, ADAPTER, config)  # seeds seed + layer index; through config.init_cache if set
    _add_teacher_adapter(peft_model, lora)
    share_rank0_init(peft_model)
    peft_model.balora_config = config
    if heads:
        peft_model.balora_head = heads
    return peft_model


@torch.no_grad()
def _calibrate_corda(model: torch.nn.Module, lora: LoraConfig,
                     calibration: Callable[[torch.nn.Module], None]) -> None:
    """PEFT's `preprocess_corda` over `calibration(model)`. Its covariance hook takes one (1, T, H) input per pass;
    a target layer that sees another shape (BERT's pooler sees (1, H)) gets a clear error here instead of PEFT's."""
    from peft.tuners.lora.corda import preprocess_corda

    def check(module: torch.nn.Module, args: tuple, name: str) -> None:
        x = args[0]
        if x.dim() != 3 or x.shape[0] != 1:
            raise ValueError(f"init='corda': target {name!r} received an input of shape {tuple(x.shape)}; PEFT's "
                             "CorDA needs one (1, tokens, features) input per calibration pass. Run one row per "
                             "pass, and leave layers that see pooled inputs (e.g. BERT's pooler.dense) out of "
                             "target_modules")

    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: check(mod, args, n))
               for name, m in _matched_modules(model, lora)]
    try:
        preprocess_corda(model, lora, run_model=lambda: calibration(model))
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _add_teacher_adapter(peft_model: PeftModel, lora: LoraConfig) -> None:
    """Add the frozen `"teacher"` adapter: a copy of the initial trainable adapter and head."""
    teacher_config = copy.deepcopy(lora)
    teacher_config.init_lora_weights = False  # never run an init (PiSSA would SVD W_res and mutate the base again)
    teacher_config.corda_config = None
    teacher_config.inference_mode = True
    peft_model.add_adapter(TEACHER, teacher_config)
    peft_model.set_adapter(ADAPTER)
    params = dict(peft_model.named_parameters())
    for name, param in params.items():
        if f".{TEACHER}." in name or name.endswith(f".{TEACHER}"):
            source = params[name.replace(f".{TEACHER}", f".{ADAPTER}")]
            if not (param.is_meta or source.is_meta):  # meta: rank 0's values arrive when FSDP shards the model
                param.copy_(source)
            param.requires_grad_(False)


def lora_state_dict_for_base(
    peft_model: PeftModel, full_state: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The trained adapter as a plain LoRA on the *original* weights: ΔW = B A − B0 A0 = [B | −B0] [A ; A0].

    The rank doubles (2r) and alpha doubles with it (rsLoRA: alpha grows by √2), so the scaling is unchanged. The
    LoRA factors come from PEFT's own `subtract_mutated_init` with the teacher adapter as the initial adapter (PEFT's
    `path_initial_model_for_weight_conversion` mechanism, without the round trip through disk); fully trained modules
    (a classification head, DoRA's magnitude vector) are kept as they are. DoRA normalises the combined weight, and
    W + [B | −B0][A ; A0]·s = W_res + B A·s, so the same magnitude on W gives the same layer. `full_state`: the
    model's gathered state dict (sharded models).
    """
    state = get_peft_model_state_dict(peft_model, state_dict=full_state, adapter_name=ADAPTER)
    inner = None if full_state is None else {k.removeprefix("base_model."): v for k, v in full_state.items()}
    converted = peft_model.base_model.subtract_mutated_init(state, TEACHER, {"state_dict": inner})
    return {**state, **converted}


AdapterForm = Literal["lora", "pissa"]


def save_adapter(peft_model: PeftModel, directory: str | os.PathLike[str], *, form: AdapterForm = "lora") -> Path:
    """Save the trained adapter in PEFT's format (safetensors + adapter_config.json) plus `balora_config.json`.

    `form="lora"` (default): a plain LoRA of rank 2r that applies to the original, unmodified base model, so
    `PeftModel.from_pretrained(base, directory)` reproduces the trained model. `form="pissa"`: the rank-r adapter as
    trained, which applies to the residual weights W_res only (rebuild them with the same PiSSA init first).
    With a LoRA init (B0 = 0) both forms describe the same update. Each file is written to a temporary name first.
    With several processes every rank must call it (an FSDP-sharded adapter is gathered); rank 0 writes.
    """
    from safetensors.torch import save_file

    out = Path(directory)
    lora = copy.deepcopy(peft_model.peft_config[ADAPTER])
    initialised_as_lora = getattr(getattr(peft_model, "balora_config", None), "init", None) == "lora"
    full = gathered_state_dict(peft_model)  # None unless FSDP sharded the model
    if form == "lora" and initialised_as_lora:  # B0 = 0: the adapter as trained already applies to W
        state = get_peft_model_state_dict(peft_model, state_dict=full, adapter_name=ADAPTER)
    elif form == "lora":
        state = lora_state_dict_for_base(peft_model, full)
        grow = math.sqrt(2) if lora.use_rslora else 2  # keeps the scaling alpha/r (rsLoRA: alpha/sqrt(r)) at 2r
        lora.r *= 2
        lora.lora_alpha *= grow
        lora.rank_pattern = {k: 2 * v for k, v in (lora.rank_pattern or {}).items()}
        lora.alpha_pattern = {k: grow * v for k, v in (lora.alpha_pattern or {}).items()}
    elif form == "pissa":
        state = get_peft_model_state_dict(peft_model, state_dict=full, adapter_name=ADAPTER)
    else:
        raise ValueError(f"form must be 'lora' or 'pissa'; got {form!r}")
    if not is_main_process():
        return out
    out.mkdir(parents=True, exist_ok=True)
    lora.init_lora_weights = True  # the saved adapter applies to the original weights: no init to rerun
    lora.corda_config = None
    lora.inference_mode = True
    if lora.base_model_name_or_path is None:
        lora.base_model_name_or_path = getattr(peft_model.base_model.model, "name_or_path", None) or None
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tmp = out / "adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "adapter_model.safetensors")
    lora.save_pretrained(str(out))
    config = getattr(peft_model, "balora_config", None)
    if config is not None:
        config.save(out, adapter_form=form)
    return out
