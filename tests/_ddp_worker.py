"""Worker for test_distributed.py: a few BALoRATrainer steps on a tiny Llama, one process or under torchrun.

Writes rank 0's log history as JSON. Rows go to processes in order (process p of P gets rows p·b .. p·b + b − 1 of each
global batch), so one process with batch P·b sees exactly the same global batches.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from datasets import Dataset
from torch.utils.data import SequentialSampler
from transformers import TrainingArguments

from balora import BALoRAConfig, BALoRATrainer, get_balora_model


class _Sequential(BALoRATrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def main(out: str, per_device_batch: int, method: str) -> None:
    sys.path.insert(0, "tests")
    from conftest import tiny_llama

    torch.manual_seed(0)
    model = get_balora_model(tiny_llama(), BALoRAConfig(method=method, r=2, consistency_schedule="constant",
                                                        regularizer_schedule="constant", svd_top_k=2))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 101, (16, 10), generator=g)
    labels = ids.clone()
    for i in range(16):
        labels[i, : 1 + i % 7] = -100  # different token counts per row and per process
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 10] * 16, "labels": labels.tolist()})
    args = TrainingArguments(
        output_dir="/tmp/balora-ddp-test", per_device_train_batch_size=per_device_batch, max_steps=4,
        learning_rate=0.05, optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        seed=0, dataloader_drop_last=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )
    trainer = _Sequential(model=model, args=args, train_dataset=data)
    trainer.train()
    if trainer.is_world_process_zero():
        with open(out, "w") as f:
            json.dump(trainer.state.log_history, f)
    if torch.distributed.is_initialized():
        # Both ranks are done; leave without gloo's teardown. At interpreter exit it sometimes aborted a rank
        # ("terminate called without an active exception", one CI run in four), and an explicit
        # destroy_process_group() sometimes hung instead (1 of 8 runs here): a race in PyTorch's gloo shutdown,
        # not in the training this test checks.
        torch.distributed.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
