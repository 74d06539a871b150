"""Learning-rate multipliers: linear warmup, then cosine, WSD (warmup-stable-decay) or constant."""

from __future__ import annotations

import math


def lr_multiplier(
    step: int,
    total: int,
    warmup: int,
    kind: str = "cosine",
    min_ratio: float = 0.1,
    decay_fraction: float = 0.2,
) -> float:
    """Multiplier of the base lr for 0-based `step` of `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "wsd":
        decay_start = int(total * (1 - decay_fraction))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, total - decay_start)
        return 1.0 - (1.0 - min_ratio) * min(progress, 1.0)
    progress = min((step - warmup) / max(1, total - warmup), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
