"""Model FLOPs utilisation: achieved model FLOPs per second over the devices' peak.

FLOPs per trained token follow the usual count (Chinchilla / nanoGPT / PaLM appendix B): 6 per matmul
parameter (forward 2, backward 4) plus 12 * layers * width * attended length for attention scores and values.
Embedding lookups are not matmuls (a tied embedding counts once, as the output head). For Titans the memory's
own MLPs are state, not parameters, so its MFU is a lower bound. Peaks are dense bf16/fp16 tensor-core figures
from the vendors' data sheets; devices not listed (and CPUs, and fp32 training) report no MFU.
"""

from __future__ import annotations

import torch
from torch import nn

# (name fragment as torch.cuda.get_device_name reports it, dense bf16 FLOP/s); the first match wins
PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for frag, peak in PEAK_BF16 if frag in name), None)


def matmul_params(model: nn.Module) -> int:
    """Parameters that multiply activations: all of them, less embedding tables that are only looked up."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    seen: set[int] = set()
    total = 0
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(mod, nn.Embedding) and id(p) not in linear:
                continue
            total += p.numel()
    return total


def flops_per_token(model: nn.Module, config: object, seq_len: int) -> float:
    layers = int(getattr(config, "n_layers", 0))
    width = int(getattr(config, "dim", 0))
    window = getattr(config, "window", None)
    attended = min(seq_len, int(window)) if window else seq_len
    return 6.0 * matmul_params(model) + 12.0 * layers * width * attended
