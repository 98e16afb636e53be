"""Perplexity of a causal LM on a text file or an instruction file: exp(total NLL / number of scored tokens).

A `.txt` file is one text, cut into consecutive windows of `max_length` tokens (the first token of each window has
no context and is not scored). A `.json`/`.jsonl` file holds rows with `text` (every token scored) or
`instruction`/`input`/`output` (rendered with the training template; only the response and its EOS are scored, as
in training).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from balora.data.templates import render_prompt, response_prefix
from balora.io import DataError, check_file, read_rows, read_text, write_json_atomic, write_jsonl_atomic
from balora.losses import IGNORE_INDEX


def _pieces(data_file: str | os.PathLike, template: str, tokenizer: Any) -> list[tuple[str, str]]:
    """(context, target) pairs: the target is scored, the context only conditions it."""
    path = check_file(data_file)
    if path.suffix == ".txt":
        return [("", read_text(path))]
    pieces = []
    for line, row in read_rows(path):
        if "text" in row:
            pieces.append(("", str(row["text"])))
        elif "instruction" in row and "output" in row:
            instruction, extra = str(row["instruction"]), row.get("input") or None
            if template == "plain":
                context = instruction + (f"\n\n{extra}" if extra else "") + "\n"
            else:
                context = render_prompt(instruction, extra, template=template, tokenizer=tokenizer)  # type: ignore[arg-type]
                context += response_prefix(template)  # type: ignore[arg-type]
            pieces.append((context, str(row["output"]) + (tokenizer.eos_token or "")))
        else:
            raise DataError(
                f"{path}:{line}: perplexity rows need `text`, or `instruction` and `output`; the row has {sorted(row)}"
            )
    return pieces


def _encode(
    pieces: list[tuple[str, str]], tokenizer: Any, max_length: int, whole_text: bool, add_special_tokens: bool
) -> tuple[list[tuple[list[int], int]], int]:
    """(token ids, index of the first scored token) per sequence, and how many sequences were cut at max_length."""
    sequences, truncated = [], 0
    for context, target in pieces:
        if whole_text:  # one long text: consecutive windows
            ids = tokenizer(target, add_special_tokens=add_special_tokens)["input_ids"]
            sequences += [(ids[i : i + max_length], 1) for i in range(0, len(ids), max_length) if len(ids[i:]) > 1]
            continue
        context_ids = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"] if context else []
        target_ids = tokenizer(target, add_special_tokens=not context and add_special_tokens)["input_ids"]
        ids = (context_ids + target_ids)[:max_length]
        truncated += len(context_ids) + len(target_ids) > max_length
        sequences.append((ids, max(len(context_ids), 1)))
    return sequences, truncated


@torch.no_grad()
def _nll(
    model: Any, sequences: list[tuple[list[int], int]], batch_size: int, progress: bool
) -> list[tuple[float, int]]:
    """(summed NLL in nats, number of scored tokens) per sequence; float32 log-softmax."""
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(sequences), batch_size), desc="perplexity", disable=not progress, unit="batch"):
        batch = sequences[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (ids, first) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, first : len(ids)] = torch.tensor(ids[first:])
            mask[row, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
        targets = labels[:, 1:].to(device)  # token t is predicted from position t-1
        losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        counts = (targets != IGNORE_INDEX).sum(dim=1)
        out += [(float(loss), int(n)) for loss, n in zip(losses.sum(dim=1).tolist(), counts.tolist(), strict=True)]
    return out


def evaluate_perplexity(
    model: Any,
    tokenizer: Any,
    data_file: str | os.PathLike | None,
    *,
    out_dir: str | os.PathLike,
    template: str = "alpaca",
    batch_size: int = 8,
    max_length: int = 1024,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity on `data_file`; writes results.jsonl (per sequence) and summary.json (returned) to out_dir."""
    if data_file is None:
        raise DataError("the perplexity task needs data_file=PATH (.txt, or .json/.jsonl with text or instructions)")
    if max_length < 2 or batch_size < 1:
        raise ValueError(f"max_length must be >= 2 and batch_size >= 1, got {max_length!r}, {batch_size!r}")
    start = time.monotonic()
    pieces = _pieces(data_file, template, tokenizer)
    whole_text = Path(data_file).suffix == ".txt"
    sequences, truncated = _encode(pieces, tokenizer, max_length, whole_text, add_special_tokens=template != "chat")
    sequences = sequences[:limit]
    was_training = model.training
    model.eval()
    try:
        scores = _nll(model, sequences, batch_size, progress)
    finally:
        model.train(was_training)
    total_nll, total_tokens = sum(s for s, _ in scores), sum(n for _, n in scores)
    if total_tokens == 0:
        raise DataError(f"{data_file}: nothing to score (every sequence is empty or fully context)")
    rows = [
        {"index": i, "n_tokens": n, "nll": nll, "perplexity": math.exp(nll / n) if n else None}
        for i, (nll, n) in enumerate(scores)
    ]
    summary = {
        "task": "perplexity",
        "perplexity": math.exp(total_nll / total_tokens),
        "mean_nll": total_nll / total_tokens,
        "n_sequences": len(scores),
        "n_tokens": total_tokens,
        "n_truncated": truncated,
        "total_s": time.monotonic() - start,
        "data": str(data_file),
        "settings": {"template": template, "max_length": max_length, "batch_size": batch_size, "limit": limit},
        "results_file": "results.jsonl",
    }
    write_jsonl_atomic(Path(out_dir) / "results.jsonl", rows)
    write_json_atomic(Path(out_dir) / "summary.json", summary)
    return summary
