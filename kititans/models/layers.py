"""Building blocks shared by the families: RMSNorm, RoPE (HF rotate-half convention), SwiGLU, causal attention.

RoPE convention, written down once: pairs are (x[i], x[i + head_dim/2]) ("rotate_half", GPT-NeoX/HF style).
llama.cpp's arch=llama rotates interleaved pairs, so the GGUF exporter permutes the Q/K rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (llama: the weight multiplies, not 1+w)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (max_len, head_dim), duplicated halves [f, f] as HF computes them (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, hd); cos/sin: (T, hd) or (B, 1, T, hd)."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def signed_sin(sin: Tensor) -> Tensor:
    """sin (..., hd) with its first half negated: rotate_half(x) * sin == x.roll(hd / 2, -1) * signed_sin(sin)."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rope_rolled(x: Tensor, cos: Tensor, ssin: Tensor) -> Tensor:
    """apply_rope in 3 ops (a decode step runs it per layer): ssin = signed_sin(sin), in x's dtype."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), ssin)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), llama's MLP with HF names."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.gate_up_weight: Tensor | None = None  # set by fuse(): one matmul for gate and up at inference

    def fuse(self) -> None:
        """Inference: gate/up weights become views of one 2*hidden x dim matrix (same state_dict)."""
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight]).detach()
        self.gate_proj.weight.data, self.up_proj.weight.data = w.chunk(2)
        self.gate_up_weight = w

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up_weight is not None:
            gate, up = linear(x, self.gate_up_weight).chunk(2, dim=-1)
            return apply_linear(self.down_proj, F.silu(gate) * up)
        return apply_linear(
            self.down_proj, F.silu(apply_linear(self.gate_proj, x)) * apply_linear(self.up_proj, x)
        )


# ----------------------------------------------------------------------------- row-by-row matrix products
# A BLAS picks its GEMM kernel by the number of rows (MKL: one for 1 row, another for 2-3, another from 4; rows
# 6e-5 apart between them), so a row multiplied among others can get other bits than the same row alone. Under
# `row_gemms()`, `linear` and `apply_linear` multiply each batch row on its own (torch.bmm over the expanded
# weight: per row the kernel of a one-row call, whatever the batch), so a decode step of one sequence and a
# batched step of several (models/titans/rows.py, which probes this on the model) give each sequence the same
# bits. Padding the rows to a multiple of 4 instead (one GEMM for all rows, as models/lite_batch.py does) keeps
# them exact too, but made a lone Titans decode 0.5x as fast here (MKL's 4-row GEMM on AVX2 vs its GEMV).
# Outside row_gemms(): F.linear and module(x).

_ROW_GEMMS: ContextVar[bool] = ContextVar("kititans_row_gemms", default=False)


@contextmanager
def row_gemms() -> Iterator[None]:
    token = _ROW_GEMMS.set(True)
    try:
        yield
    finally:
        _ROW_GEMMS.reset(token)


def _rows_mode() -> bool:
    """Inside row_gemms(); never while torch.compile or torch.export traces (they cannot read a ContextVar, and
    a compiled or exported step is never a batched decode step)."""
    return not torch.compiler.is_compiling() and _ROW_GEMMS.get()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear; under row_gemms() and for x (B, T, K): each of the B rows' product on its own."""
    if x.dim() != 3 or not _rows_mode():
        return F.linear(x, weight, bias)
    wt = weight.t().unsqueeze(0).expand(x.shape[0], -1, -1)
    if bias is None:
        return torch.bmm(x, wt)
    return torch.baddbmm(bias.expand(x.shape[0], x.shape[1], -1), x, wt)


def apply_linear(module: nn.Module, x: Tensor) -> Tensor:
    """module(x); under row_gemms() a plain nn.Linear's product row by row (other modules, e.g. QAT's, run
    as they are)."""
    if type(module) is nn.Linear and _rows_mode():
        return linear(x, module.weight, module.bias)
    return module(x)


def causal_offset_mask(t_q: int, t_k: int, device: torch.device) -> Tensor:
    """Boolean (t_q, t_k) mask where query i (at absolute position t_k - t_q + i) sees keys <= its position."""
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    return torch.arange(t_k, device=device)[None, :] <= q_pos


def attention(q: Tensor, k: Tensor, v: Tensor, past: int) -> Tensor:
    """Causal SDPA for q (B, H, Tq, hd) against k/v (B, Hkv, past+Tq, hd); GQA shares each kv head among
    H/Hkv query heads without copying the cache (enable_gqa)."""
    gqa = k.shape[1] != q.shape[1]
    t_q = q.shape[2]
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if t_q == 1:  # one new token sees the whole cache
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    # is_causal is upper-left aligned: with a past it would hide the cache, so build the mask explicitly
    mask = causal_offset_mask(t_q, k.shape[2], q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class HyperConnection(nn.Module):
    """Hyper-connections (Zhu et al., arXiv 2409.19606) for one branch over n residual streams h (B,T,n,D):
    input = alpha_0^T h, h' = A^T h + beta * branch(input), with static + dynamic (tanh, zero-initialised)
    alpha and beta. `reset()` initialises it to a plain pre-norm residual. Token-local: no decode state."""

    def __init__(self, dim: int, n: int, index: int, eps: float):
        super().__init__()
        self.n, self.index = n, index
        self.norm = RMSNorm(dim, eps)
        self.static_alpha = nn.Parameter(torch.empty(n, n + 1))
        self.static_beta = nn.Parameter(torch.empty(n))
        self.dynamic_alpha = nn.Parameter(torch.empty(dim, n + 1))
        self.dynamic_beta = nn.Parameter(torch.empty(dim))
        self.scales = nn.Parameter(torch.empty(2))

    def reset(self) -> None:
        with torch.no_grad():
            alpha = torch.zeros(self.n, self.n + 1)
            alpha[self.index % self.n, 0] = 1.0
            alpha[:, 1:] = torch.eye(self.n)
            self.static_alpha.copy_(alpha)
            self.static_beta.fill_(1.0)
            self.dynamic_alpha.zero_()
            self.dynamic_beta.zero_()
            self.scales.fill_(0.01)
            self.norm.weight.fill_(1.0)

    def forward(self, h: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        hn = self.norm(h)
        dyn_alpha = torch.tanh(hn @ self.dynamic_alpha.to(hn.dtype))  # (B,T,n,n+1)
        alpha = self.static_alpha + self.scales[0] * dyn_alpha
        beta = self.static_beta + self.scales[1] * torch.tanh(hn @ self.dynamic_beta.to(hn.dtype))  # (B,T,n)
        mix = alpha.to(h.dtype).transpose(-1, -2) @ h  # (B,T,n+1,D)
        y = fn(mix[..., 0, :])
        return mix[..., 1:, :] + beta.to(h.dtype).unsqueeze(-1) * y.unsqueeze(-2)


def mean_pool(hidden: Tensor, keep: Tensor | None) -> Tensor:
    """(B, T, D) -> (B, D): the mean over the kept (non-pad) positions, in fp32."""
    h = hidden.float()
    if keep is None:
        return h.mean(1)
    w = keep.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
    return (h * w).sum(1) / w.sum(1).clamp(min=1.0)
