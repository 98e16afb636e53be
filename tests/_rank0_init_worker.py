"""Worker for test_fsdp.py's rank-0 init tests: `get_balora_model` in 2 gloo processes under torchrun, no Trainer.

Scenarios, run one after the other in the same process group; each rank writes OUT/rank{R}.pt with, per scenario,
the adapter model's state dict or the error message:
- "different": the ranks load different weights (seed 0 on rank 0, seed 1 on rank 1): every rank must end with
  rank 0's PiSSA init;
- "meta_without_fsdp": rank 1 holds meta weights and nothing would broadcast rank 0's (no FSDP
  cpu_ram_efficient_loading): a clear error on every rank;
- "meta_on_rank0": rank 0 holds the meta weights: a clear error.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def build(seed: int, meta: bool) -> torch.nn.Module:
    sys.path.insert(0, "tests")
    from conftest import tiny_llama

    torch.manual_seed(seed)
    model = tiny_llama()
    if meta:
        model.to("meta")
    return model


def main(out: str) -> None:
    from balora import BALoRAConfig, get_balora_model

    os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = BALoRAConfig(method="balora", r=2)
    scenarios = {"different": (rank, False), "meta_without_fsdp": (0, rank == 1), "meta_on_rank0": (0, rank == 0)}
    record: dict[str, object] = {}
    for name, (seed, meta) in scenarios.items():
        try:
            model = get_balora_model(build(seed, meta), config)
            record[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        except ValueError as error:
            record[name] = str(error)
        dist.barrier()
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
