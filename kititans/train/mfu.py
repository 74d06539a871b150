"""Model FLOPs utilisation: achieved model FLOPs per second over the devices' peak.

FLOPs per trained token are the model's (models/flops.py: 6 per matmul parameter plus attention over the keys
a query attends on average, causal and window-capped; a family's own count through FamilySpec.flops_per_token,
e.g. Titans' neural memory). Peaks are dense bf16/fp16 tensor-core figures from the vendors' data
sheets; devices not listed (and CPUs, and fp32 training) report no MFU.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kititans.models.flops import causal_flops_per_token

# (pattern matched against torch.cuda.get_device_name as a whole word, dense bf16/fp16 tensor FLOP/s); the
# first match wins, so a variant comes before its base name ("H100 PCIe" before "H100", "L40S" before "L40",
# which the bare "L4" must not catch). GeForce figures are with FP32 accumulate (what autocast uses). T4 and
# V100 have no bf16: their figure is fp16 (the dtype `auto` picks there).
PEAK_BF16: tuple[tuple[str, float], ...] = (
    (r"GH200", 989e12),
    (r"H200 NVL", 836e12),
    (r"H200", 989e12),
    (r"H100 PCIe", 756e12),
    (r"H100 NVL", 835e12),
    (r"H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"H800", 989e12),
    (r"B200", 2250e12),
    (r"A100", 312e12),
    (r"A800", 312e12),
    (r"L40S", 362e12),
    (r"L40", 181e12),
    (r"L4", 121e12),
    (r"A10G", 70e12),  # AWS's A10G: a lower-clocked A10
    (r"A10", 125e12),
    (r"RTX 5090", 209.5e12),
    (r"RTX 4090", 165.2e12),
    (r"RTX 3090 Ti", 80e12),
    (r"RTX 3090", 71e12),
    (r"V100S", 130e12),
    (r"V100-SXM2", 125e12),
    (r"V100-PCIE", 112e12),
    (r"V100", 112e12),
    (r"T4", 65e12),
)


def peak_for_name(name: str) -> float | None:
    """The dense bf16/fp16 peak of a GPU by the name torch reports, or None when it is not in the table."""
    for pattern, peak in PEAK_BF16:
        if re.search(rf"(?<![\w-]){re.escape(pattern)}(?![\w])", name):
            return peak
    return None


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def family_flops(config: Any) -> Callable[[nn.Module, Any, int], float] | None:
    from kititans.models.spec import load_families

    for fam in load_families().values():
        if type(config) is fam.config_cls:  # exact: an encoder config subclasses Lite's
            return fam.flops_per_token
    return None


def flops_per_token(model: nn.Module, config: object, seq_len: int) -> float:
    """Training FLOPs per token: the family's own count when its spec has one, else a causal transformer's."""
    own = family_flops(config)
    if own is not None:
        return own(model, config, seq_len)
    return causal_flops_per_token(model, config, seq_len)
