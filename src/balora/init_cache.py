"""Cached PiSSA initialisation: the SVD of every target weight runs once, later runs load its result.

An entry is a folder `<cache>/<key>/` holding `pissa_init.safetensors` (per adapted layer: the initial factors
`lora_A`, `lora_B` as computed, and the residual W_res exactly as it is written into the base weight) and
`entry.json` (what the key was made of, for people). The key is a digest of everything the result depends on:

- the content of every target weight (name, shape, dtype and bytes, in layer order), so another model, a modified
  checkpoint or another dtype never matches, whatever its path;
- r, the scaling alpha / r, `init_niter`, `init_oversample`, `seed` (each layer is seeded with seed + its index), the
  Conv1D layout, and the entry format version.

A changed setting therefore gives another key: a stale entry cannot be hit. An entry is written to a temporary folder
and renamed into place, so a reader sees a whole entry or none. Hashing the weights costs about a second per GB
(0.5 s CPU for the 424 MB of SmolLM2-135M targets, benchmarks/results/pissa_init_cache.md), far less than the
SVD it replaces.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer

from balora.config import BALoRAConfig
from balora.pissa import PissaFactors, apply_pissa, pissa_factors

FORMAT_VERSION = 1
logger = logging.getLogger(__name__)
WEIGHTS_FILE = "pissa_init.safetensors"
ENTRY_FILE = "entry.json"


def resolve_cache_dir(setting: str) -> Path:
    """`"auto"`: `<balora cache>/pissa_init` ($BALORA_CACHE, else ~/.cache/balora); anything else: that folder."""
    if setting == "auto":
        from balora.models import cache_dir

        return cache_dir() / "pissa_init"
    return Path(setting).expanduser()


def _weight(layer: LoraLayer) -> torch.Tensor:
    """The base weight in (out, in) layout (GPT-2's Conv1D stores it transposed)."""
    weight = layer.get_base_layer().weight
    return weight.T if getattr(layer, "fan_in_fan_out", False) else weight


def init_key(named_layers: list[tuple[str, LoraLayer]], adapter: str, config: BALoRAConfig) -> str:
    """The digest of every input of the PiSSA init of `named_layers` (see the module docstring)."""
    digest = hashlib.blake2b(digest_size=20)
    settings = {"format": FORMAT_VERSION, "r": config.r, "scaling": config.scaling, "init_niter": config.init_niter,
                "init_oversample": config.init_oversample, "seed": config.seed}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for name, layer in named_layers:
        weight = layer.get_base_layer().weight.detach()
        header = [name, list(weight.shape), str(weight.dtype), bool(getattr(layer, "fan_in_fan_out", False)),
                  layer.r[adapter], layer.scaling[adapter]]
        digest.update(json.dumps(header).encode())
        flat = weight.contiguous().view(-1)
        if flat.element_size() == 2:  # numpy has no bfloat16: hash the bits
            flat = flat.view(torch.int16)
        digest.update(flat.cpu().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def apply_pissa_all(named_layers: list[tuple[str, LoraLayer]], adapter: str, config: BALoRAConfig) -> str | None:
    """PiSSA-initialise every layer's `adapter`, through the cache when `config.init_cache` is set.

    Returns "hit", "miss" (computed and stored) or None (no cache).
    """
    if config.init_cache is None:
        for index, (_, layer) in enumerate(named_layers):
            apply_pissa(layer, adapter, niter=config.init_niter, oversample=config.init_oversample,
                        seed=config.seed + index)
        return None
    start = time.perf_counter()
    entry = resolve_cache_dir(config.init_cache) / init_key(named_layers, adapter, config)
    if (entry / WEIGHTS_FILE).is_file():
        _load_entry(entry, named_layers, adapter)
        logger.info("PiSSA init loaded from %s in %.1f s (no SVD)", entry, time.perf_counter() - start)
        return "hit"
    tensors: dict[str, torch.Tensor] = {}
    for index, (name, layer) in enumerate(named_layers):
        factors = pissa_factors(_weight(layer), layer.r[adapter], layer.scaling[adapter], niter=config.init_niter,
                                oversample=config.init_oversample, seed=config.seed + index)
        tensors.update(_write_layer(name, layer, adapter, factors))
    _store_entry(entry, tensors, config, [name for name, _ in named_layers])
    logger.info("PiSSA init computed and stored in %s in %.1f s", entry, time.perf_counter() - start)
    return "miss"


def _write_layer(name: str, layer: LoraLayer, adapter: str, factors: PissaFactors) -> dict[str, torch.Tensor]:
    """Put `factors` into the layer (as `apply_pissa` does) and return what the cache keeps of them."""
    base = layer.get_base_layer()
    lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    lora_a.copy_(factors.lora_a.to(lora_a.dtype))
    lora_b.copy_(factors.lora_b.to(lora_b.dtype))
    residual = factors.residual.T if getattr(layer, "fan_in_fan_out", False) else factors.residual
    base.weight.data.copy_(residual.to(base.weight.dtype))
    return {f"{name}.lora_A": factors.lora_a, f"{name}.lora_B": factors.lora_b,
            f"{name}.residual": base.weight.detach()}


def _load_entry(entry: Path, named_layers: list[tuple[str, LoraLayer]], adapter: str) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(entry / WEIGHTS_FILE))
    for name, layer in named_layers:
        base = layer.get_base_layer()
        try:
            lora_a, lora_b, residual = (tensors[f"{name}.{part}"] for part in ("lora_A", "lora_B", "residual"))
        except KeyError:
            raise ValueError(f"PiSSA init cache entry {entry} has no tensors for layer {name!r}; delete the "
                             "folder (it will be rebuilt)") from None
        if residual.shape != base.weight.shape or residual.dtype != base.weight.dtype:
            raise ValueError(f"PiSSA init cache entry {entry} does not fit layer {name!r}; delete the folder")
        layer.lora_A[adapter].weight.copy_(lora_a.to(layer.lora_A[adapter].weight.dtype))
        layer.lora_B[adapter].weight.copy_(lora_b.to(layer.lora_B[adapter].weight.dtype))
        base.weight.data.copy_(residual.to(base.weight.device))


def _store_entry(entry: Path, tensors: dict[str, torch.Tensor], config: BALoRAConfig, names: list[str]) -> None:
    """Write the entry into a temporary sibling folder, then rename it into place (a concurrent writer may win)."""
    from safetensors.torch import save_file

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
        info = {"format": FORMAT_VERSION, "r": config.r, "alpha": config.lora_alpha, "init_niter": config.init_niter,
                "init_oversample": config.init_oversample, "seed": config.seed, "layers": names}
        (tmp / ENTRY_FILE).write_text(json.dumps(info, indent=1))
        try:
            os.replace(tmp, entry)
        except OSError:  # another process stored the same entry first: keep theirs
            if not (entry / WEIGHTS_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
