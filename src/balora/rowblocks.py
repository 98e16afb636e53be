"""Row blocks of the valid NLG positions, processed in place: the machinery shared by `balora.spectral` and
`balora.fused`.

The M valid positions (`losses.nlg_valid_mask`) of the (B·T, V) logits fall into runs of consecutive rows (each
sequence's answer is one run); blocks of a run are plain slices, so the regularizers read the logits and write their
gradients without gathering or copying. `map_blocks` shares the blocks out to single-threaded workers on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from balora.losses import IGNORE_INDEX, nlg_valid_mask

Segments = list[tuple[int, int, int]]  # runs of consecutive valid rows: (start, stop) in 0..M, first row in 0..B·T
Block = tuple[int, int, slice]  # rows start:stop of the M valid rows = rows `slice` of the (B·T, V) logits

_CHUNK_BYTES = 2 << 20  # default block: 2 MiB of float32 per (rows, V) scratch, so a block's passes stay in cache


def default_chunk_rows(n_cols: int) -> int:
    """Rows per block so that one float32 (rows, n_cols) buffer takes about 2 MiB (10 rows at V = 49,152)."""
    return max(1, _CHUNK_BYTES // (4 * max(n_cols, 1)))


def valid_rows(labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(M,) int64 indices into the flattened (B·T) positions of `nlg_valid_mask(labels)`, ascending."""
    return nlg_valid_mask(labels, ignore_index=ignore_index).reshape(-1).nonzero().squeeze(1)


def row_segments(rows: Tensor) -> Segments:
    """Split ascending row indices (M,) into maximal runs of consecutive rows (each sequence's answer is one run).

    Every block of a run is then a plain slice of the (B·T, V) logits: no gather, no copy for float32 logits, and
    gradients are written into slices too.
    """
    r = rows.cpu()
    if r.numel() == 0:
        return []
    breaks = ((r[1:] - r[:-1]) != 1).nonzero().squeeze(1).add(1).tolist()
    starts, stops = [0, *breaks], [*breaks, r.numel()]
    return [(a, b, int(r[a])) for a, b in zip(starts, stops, strict=True)]


def blocks_of(segments: Segments, chunk: int) -> list[Block]:
    """Cut the runs into blocks of at most `chunk` rows."""
    return [
        (start, min(start + chunk, b), slice(first + start - a, first + min(start + chunk, b) - a))
        for a, b, first in segments
        for start in range(a, b, chunk)
    ]


def scratch(state: dict[str, Tensor], key: str, n: int, cols: int, device: torch.device) -> Tensor:
    """An (n, cols) float32 buffer kept in a worker's `state` and reused across its blocks."""
    buf = state.get(key)
    if buf is None or buf.shape[0] < n or buf.shape[1] != cols:
        buf = state[key] = torch.empty(n, cols, device=device)
    return buf[:n]


def float_rows(flat: Tensor, rows: slice, state: dict[str, Tensor], key: str = "rows") -> Tensor:
    """flat[rows] as float32: a view when `flat` is float32 (read it, never write it), else a copy in scratch."""
    block = flat[rows]
    if block.dtype == torch.float32:
        return block
    return scratch(state, key, block.shape[0], block.shape[1], block.device).copy_(block)


def empty_grad_like(x: Tensor, segments: Segments) -> Tensor:
    """A contiguous buffer shaped like `x` (..., C) whose rows (of the (N, C) view) outside `segments` are zero."""
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    flat, prev = grad.view(-1, x.shape[-1]), 0
    for a, b, first in segments:
        flat[prev:first].zero_()
        prev = first + b - a
    flat[prev:].zero_()
    return grad


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool)


def map_blocks(work: Callable[[dict, int, int, slice], None], blocks: list[Block], device: torch.device) -> list[dict]:
    """Run `work(state, start, stop, rows)` on every block under no_grad; return each worker's `state` dict.

    On CPU the blocks are shared out to torch.get_num_threads() worker threads that each run their ops
    single-threaded (ATen releases the GIL inside ops). The per-block ops are many and small, cache-sized on purpose;
    with intra-op threads every one is an OpenMP parallel region, and on a loaded machine each region can cost a
    scheduler time slice: 10× slower on the shared 2-core box this was written on. Blocks write disjoint rows;
    anything summed goes into the worker's own state. Elsewhere (CUDA): one worker, in order.
    """
    global _POOL
    workers = min(torch.get_num_threads() if torch.device(device).type == "cpu" else 1, len(blocks))
    if workers <= 1:
        return [run_share(work, blocks)]
    threads = torch.get_num_threads()
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1]._max_workers < workers:  # a forked child has no threads
        _POOL = (os.getpid(), ThreadPoolExecutor(workers, "balora", initializer=torch.set_num_threads, initargs=(1,)))
    try:
        return [f.result() for f in [_POOL[1].submit(run_share, work, blocks[i::workers]) for i in range(workers)]]
    finally:
        torch.set_num_threads(threads)  # a worker's set_num_threads(1) also moves ATen's default for new threads


def run_share(work: Callable[[dict, int, int, slice], None], blocks: list[Block]) -> dict:
    """Run `work` on `blocks` in order, in this thread, under no_grad; return its `state` dict."""
    state: dict[str, Tensor] = {}
    with torch.no_grad():
        for start, stop, rows in blocks:
            work(state, start, stop, rows)
    return state
