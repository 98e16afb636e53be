"""Named method presets: PEFT's other adapters (DoRA, rsLoRA, OLoRA, CorDA) as baselines and under the BA-LoRA terms.

Each preset is a set of `BALoRAConfig` fields. `<variant>` is the baseline (no regularizers; LoRA's B = 0 init,
OLoRA's QR init for `olora`, CorDA's for `corda`) and `balora+<variant>` adds the three terms (PiSSA init; OLoRA's or
CorDA's for `balora+olora`, `balora+corda`). `balora compare --methods` takes these names next to its own
(`compare.METHODS`); `overrides(name)` gives the command-line form.
"""

from __future__ import annotations

from typing import Any

NO_REGULARIZERS: dict[str, Any] = {"consistency_weight": 0.0, "diversity_weight": 0.0, "svd_weight": 0.0}
VARIANTS: dict[str, dict[str, Any]] = {
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "olora": {"init": "olora"},
    "corda": {"init": "corda"},  # PEFT's CorDA (IPM), calibrated on data.corda_samples training rows
}
PRESETS: dict[str, dict[str, Any]] = {}
for _name, _fields in VARIANTS.items():
    PRESETS[_name] = {"method": "lora", **NO_REGULARIZERS, **_fields}
    PRESETS[f"balora+{_name}"] = {"method": "balora", **_fields}


def overrides(name: str) -> list[str]:
    """The preset as `--balora.key value` overrides (values in YAML syntax, as the CLI parses them)."""
    if name not in PRESETS:
        raise ValueError(f"unknown method preset {name!r}; choose from {', '.join(PRESETS)}")
    out: list[str] = []
    for key, value in PRESETS[name].items():
        out += [f"--balora.{key}", "true" if value is True else str(value)]
    return out
