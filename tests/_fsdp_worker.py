"""Worker for test_fsdp.py: `balora train CONFIG [--resume]`, as launched by
`accelerate launch --config_file configs/accelerate/fsdp.yaml`, on CPU processes (gloo); or as one plain process.

accelerate turns FSDP on only for accelerator devices: `AcceleratorState` sets `DistributedType.FSDP` in its GPU
branch, and CPU processes become `MULTI_CPU` (plain data parallelism). `fsdp_on_cpu` changes that one decision.
Everything else is the code a GPU run goes through: the FSDP2 plugin built from the launcher's config,
transformers' rank-0-only loading (`cpu_ram_efficient_loading`: the other ranks hold meta tensors), balora's rank-0
PiSSA init, accelerate's `fully_shard` wrapping and rank-0 state broadcast, sharded checkpoints and `--resume`.

What the run does is recorded per rank in OUT/rank{R}.pt through a `BALoRATrainer` subclass: whether this rank loaded
meta weights, the input and logits of the last teacher forward, and the full (gathered) state dict after training.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch


def fsdp_on_cpu() -> None:
    """Let accelerate run FSDP on CPU processes: MULTI_CPU + an FSDP plugin becomes DistributedType.FSDP."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    state = model.state_dict()  # the same keys, in the same order, on every rank: the gathers below pair up
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone() for k, v in state.items()}


def weights_on_rank0_only() -> None:
    """Ranks other than 0 get a model whose parameters are meta tensors, as with memory-efficient loading.

    transformers 5 loads the weights on every rank even with `cpu_ram_efficient_loading`, so the test makes the
    condition itself. Non-persistent buffers (Llama's rotary frequencies) stay real: they are computed from the config,
    not loaded, and transformers keeps them real on those ranks too.
    """
    import torch.distributed as dist

    import balora.prepare

    original = balora.prepare.load_model_for

    def load(exp: Any, **kwargs: Any) -> tuple[Any, Any]:
        model, tokenizer = original(exp, **kwargs)
        if dist.is_initialized() and dist.get_rank() != 0:
            buffers = {name: b.clone() for name, b in model.named_buffers()}
            model.to("meta")
            for name, buffer in buffers.items():
                owner, _, attr = name.rpartition(".")
                model.get_submodule(owner)._buffers[attr] = buffer
        return model, tokenizer

    balora.prepare.load_model_for = load


def recording_trainer(out: Path) -> type:
    import balora.train
    from balora.teacher import unwrap_model

    class Recording(balora.train.BALoRATrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            model = kwargs["model"]
            self.record: dict[str, Any] = {"meta": [n for n, p in model.named_parameters() if p.is_meta]}
            super().__init__(*args, **kwargs)

        def _teacher_outputs(self, model: torch.nn.Module, model_inputs: dict[str, Any]) -> Any:
            logits, features = super()._teacher_outputs(model, model_inputs)
            self.record["teacher_inputs"] = {k: v.detach().cpu() for k, v in model_inputs.items()}
            self.record["teacher_logits"] = logits.detach().cpu()
            return logits, features

        def train(self, *args: Any, **kwargs: Any) -> Any:
            result = super().train(*args, **kwargs)
            self.record["state"] = full_state_dict(unwrap_model(self.model_wrapped))
            self.record["fsdp"] = self.is_fsdp_enabled
            torch.save(self.record, out / f"rank{self.args.process_index}.pt")
            return result

    balora.train.BALoRATrainer = Recording
    return Recording


def main(out: str, argv: list[str]) -> int:
    from balora import cli

    fsdp_on_cpu()
    weights_on_rank0_only()
    recording_trainer(Path(out))
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
