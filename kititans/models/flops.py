"""Training FLOPs per token, the model side of MFU (train/mfu.py divides by the device's peak).

6 per matmul parameter (forward 2, backward 4), plus attention's scores (q.k) and weighted values (p.v):
2 matmuls of width x keys multiply-adds per layer, forward and backward, 12 * layers * width * the keys a
query attends on average. Causal attention over T tokens: query i sees i + 1 keys, (T + 1) / 2 on average
(a count that leaves out the causal mask's saving overstates the work 2x at long T); a sliding window of w
caps it; bidirectional attention sees all T. Families whose work their parameters do not show set
FamilySpec.flops_per_token (the encoder below; Titans in models/titans/flops.py).
"""

from __future__ import annotations

from typing import Any

from torch import nn


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


def linear_params(model: nn.Module) -> int:
    """Weights of nn.Linear layers (a weight shared by two layers, e.g. a tied head, counted once)."""
    seen = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)}
    return sum(seen.values())


def causal_keys(seq_len: int, window: int | None = None) -> float:
    """Mean number of keys a causal query attends over T tokens: query i sees min(i + 1, window)."""
    t = max(int(seq_len), 1)
    w = min(int(window), t) if window else t
    return (w * (w + 1) / 2 + (t - w) * w) / t


def attention_flops(layers: int, width: int, keys_per_query: float) -> float:
    return 12.0 * layers * width * keys_per_query


def causal_flops_per_token(model: nn.Module, config: Any, seq_len: int) -> float:
    """A causal transformer (Lite): optional sliding window from the config's `window`."""
    keys = causal_keys(seq_len, getattr(config, "window", None))
    return 6.0 * matmul_params(model) + attention_flops(config.n_layers, config.dim, keys)


def bidirectional_flops_per_token(model: nn.Module, config: Any, seq_len: int) -> float:
    """An encoder: every query attends every token of its sequence."""
    return 6.0 * matmul_params(model) + attention_flops(config.n_layers, config.dim, float(seq_len))
