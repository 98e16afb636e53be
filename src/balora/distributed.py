"""One PiSSA initialisation for all processes: computed on rank 0, the same W_res, A0, B0 and teacher everywhere.

PiSSA rewrites the base weights (W -> W_res = W - B0·A0), so a process that initialises differently from the others
silently trains a different model. With several processes `get_balora_model` therefore runs the SVDs on rank 0 only:

- every rank holds the loaded weights (DDP, FSDP, DeepSpeed ZeRO-2/3 with `zero3_init_flag: false`): rank 0
  initialises, then every parameter and buffer is broadcast from rank 0 (`share_rank0_init`);
- memory-efficient loading (rank 0 holds the weights, other ranks meta tensors, e.g. from `init_empty_weights` or
  transformers' FSDP `cpu_ram_efficient_loading`): rank 0 initialises, the others keep their meta tensors, and FSDP
  gives them rank 0's values when it shards the model (accelerate's FSDP2 loads rank 0's full state dict into the
  shards; FSDP1 needs `sync_module_states`, which accelerate turns on with `cpu_ram_efficient_loading`).

Where that cannot work the error says so: meta weights on rank 0 or in a single process (nothing to factorise),
meta weights without FSDP's `cpu_ram_efficient_loading` (nothing would fill them), and weights already partitioned by
DeepSpeed ZeRO-3 at load time (`zero3_init_flag: true`: each rank holds a slice, and the SVD needs whole matrices).
References: PEFT issue #1826, accelerate issue #2886 (PiSSA under ZeRO-3 and memory-efficient loading).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    """Where tensors must be for this process group's collectives (NCCL: this rank's GPU; gloo: the CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rank0_sync_configured() -> bool:
    # Set by `accelerate launch` from fsdp_cpu_ram_efficient_loading, and by TrainingArguments(fsdp_config=...).
    return os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() in ("1", "true", "yes")


def init_on_this_rank(weights: list[Tensor]) -> bool:
    """Whether this process computes the PiSSA init of the base `weights`; raises where no init can work.

    With several processes this is a collective call: every rank must call it, with its own copies of the weights.
    """
    partitioned = [w for w in weights if hasattr(w, "ds_id") or (w.numel() == 0 and not w.is_meta)]
    if partitioned:
        raise ValueError(
            "the target weights are partitioned across processes (DeepSpeed ZeRO-3 with zero3_init_flag: true "
            "splits them while the model loads), and PiSSA needs whole matrices for its SVD. Set "
            "zero3_init_flag: false in the DeepSpeed config (configs/accelerate/deepspeed-zero3.yaml does): ZeRO-3 "
            "then partitions the model after balora has initialised it"
        )
    meta_here = any(w.is_meta for w in weights)
    rank, world = rank_and_world()
    if world == 1:
        if meta_here:
            raise ValueError(
                "the target weights are on the meta device (not loaded): PiSSA factorises the pre-trained weights, "
                "so load them first (no init_empty_weights / device='meta' for a single process)"
            )
        return True
    flags = torch.zeros(world, dtype=torch.int32, device=_collective_device())
    flags[rank] = int(meta_here)
    dist.all_reduce(flags)
    if flags[0]:
        raise ValueError(
            "rank 0 holds meta (not loaded) target weights: with several processes, balora computes the PiSSA init on "
            "rank 0 and shares it, so rank 0 must load the real weights"
        )
    if flags.any() and not _rank0_sync_configured():
        meta_ranks = flags.nonzero().flatten().tolist()
        raise ValueError(
            f"ranks {meta_ranks} hold meta (not loaded) target weights, and nothing would give them rank 0's "
            "PiSSA-initialised weights: load the weights on every rank, or use FSDP with cpu_ram_efficient_loading "
            "(configs/accelerate/fsdp.yaml), which broadcasts rank 0's weights when it shards the model"
        )
    return rank == 0


@torch.no_grad()
def share_rank0_init(model: torch.nn.Module) -> None:
    """Make every rank's parameters and buffers equal to rank 0's, after rank 0 alone initialised the adapter.

    Collective. Does nothing in a single process, and nothing where some rank holds meta tensors: there FSDP copies
    rank 0's state into the shards (see the module docstring; `init_on_this_rank` checked it is configured).
    """
    rank, world = rank_and_world()
    if world == 1:
        return
    device = _collective_device()
    tensors = [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()]
    meta = torch.tensor([int(any(t.is_meta for t in tensors))], dtype=torch.int32, device=device)
    dist.all_reduce(meta)
    if meta.item():
        return
    for tensor in tensors:
        if tensor.device == device:
            dist.broadcast(tensor.data, src=0)
        else:  # e.g. a model still on the CPU under NCCL: go through the GPU, one tensor at a time
            staged = tensor.data.to(device)
            dist.broadcast(staged, src=0)
            tensor.data.copy_(staged)


def gathered_state_dict(model: torch.nn.Module) -> dict[str, Tensor] | None:
    """The full state dict of a model whose parameters FSDP2 has sharded (DTensors), gathered on every rank; None
    when no parameter is sharded. Collective: every rank must call it."""
    from torch.distributed.tensor import DTensor

    state = model.state_dict()  # the same keys in the same order on every rank, so the gathers pair up
    if not any(isinstance(v, DTensor) for v in state.values()):
        return None
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def is_main_process() -> bool:
    return rank_and_world()[0] == 0
