"""Muon per logical matrix: momentum (Nesterov) -> Newton-Schulz orthogonalisation -> a per-matrix update scale
-> decoupled weight decay, the same step as torch.optim.Muon (torch 2.13, _muon.py), with two additions:

  splits   a fused matrix (Titans' attention q|k|v, its memory's keys|values|queries; FamilySpec.param_splits)
           is orthogonalised block by block with each block's own shape scaling, so it gets exactly the
           update of the separate matrices it stands for: orthogonalising [q; k; v] as one couples the three
           update scales and multiplies the step by sqrt(3) ("original" scaling of a 3D x D matrix);
  sharding under FSDP2 the update of a sharded matrix is gathered, orthogonalised whole (each rank the same),
           and each rank applies its own rows: the same numbers as one process.

Scales (adjust_lr_fn, as torch names them): "original" sqrt(max(1, A/B)) for an A x B block (Keller Jordan:
Muon-sized lr ~0.02-0.05), "match_rms_adamw" 0.2 sqrt(max(A, B)) (Moonlight: update RMS ~0.2, so AdamW's lr
and weight decay carry over). Weight decay uses the unscaled lr, as torch does. State: one momentum_buffer per
parameter, the same as torch.optim.Muon's (older checkpoints load).

Newton-Schulz runs in bf16 where bf16 matrix products are fast (CUDA, CPUs with AVX512-BF16 or AMX: torch does
the same), in fp32 elsewhere: on an AVX2 CPU a bf16 product of titans-tiny's shapes is 8-100x slower than fp32,
which made a Muon step 54x slower than an fp32 one (12.6 s vs 0.23 s) and Muon training 4.5x slower than AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from kititans.device import cpu_has_fast_bf16

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
SCALES = ("original", "match_rms_adamw")


def ns_dtype(device: torch.device) -> torch.dtype:
    """The dtype Newton-Schulz runs in on `device`: bf16 where its matrix products are fast, else fp32."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
        return torch.bfloat16
    return torch.float32


def newton_schulz(g: Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> Tensor:  # fmt: skip
    """An approximately orthogonal matrix with g's singular vectors (quintic Newton-Schulz in `dtype`)."""
    a, b, c = coefficients
    x = g.to(dtype, copy=True)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x.div_(x.norm().clamp(min=eps))  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def scale(shape: tuple[int, ...], kind: str) -> float:
    """The update scale of an A x B matrix."""
    rows, cols = shape[0], shape[1]
    if kind == "original":
        return math.sqrt(max(1.0, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's step per block of rows (`splits`: {param: row sizes}); sharded params (DTensor)
    are orthogonalised whole."""

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 0.02,
        weight_decay: float = 0.01,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        eps: float = 1e-7,
        adjust_lr_fn: str = "original",
        splits: dict[int, tuple[int, ...]] | None = None,
        ns_dtype: torch.dtype | None = None,
    ):
        if adjust_lr_fn not in SCALES:
            raise ValueError(f"adjust_lr_fn must be one of {SCALES}, got {adjust_lr_fn!r}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, ns_coefficients=NS_COEFFICIENTS, eps=eps, adjust_lr_fn=adjust_lr_fn)  # fmt: skip
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"Muon takes 2-D matrices only, got a parameter of shape {tuple(p.shape)}"
                    )
        self.splits = dict(splits or {})  # id(param) -> row sizes (kept out of the state dict)
        self.ns_dtype = ns_dtype  # None: ns_dtype(device) per parameter

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, wd, mom = float(group["lr"]), group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - mom)
                update = g.lerp(buf, mom) if group["nesterov"] else buf
                delta = self._delta(p, update, group)
                p.mul_(1 - lr * wd)
                p.add_(delta, alpha=-lr)

    def _delta(self, p: Tensor, update: Tensor, group: dict[str, Any]) -> Tensor:
        """The scaled orthogonalised update (before -lr), shaped and sharded like p."""
        full = update.full_tensor() if hasattr(update, "full_tensor") else update
        rows = self.splits.get(id(p)) or (full.shape[0],)
        steps, coeffs, eps, kind = (
            group["ns_steps"],
            tuple(group["ns_coefficients"]),
            group["eps"],
            group["adjust_lr_fn"],
        )
        dtype = self.ns_dtype or ns_dtype(full.device)
        parts = [
            newton_schulz(block, steps, coeffs, eps, dtype).to(p.dtype).mul_(scale(tuple(block.shape), kind))
            for block in full.split(list(rows))
        ]
        delta = parts[0] if len(parts) == 1 else torch.cat(parts)
        if hasattr(update, "full_tensor"):  # this rank's rows of the whole update
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(delta, update.device_mesh, update.placements, src_data_rank=None)
        return delta
