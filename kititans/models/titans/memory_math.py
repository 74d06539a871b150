"""The closed-form math of the Titans neural memory (research/titans.md §4.1-4.3): activations and their
slopes, the memory MLP's forward and the closed-form gradient of its loss, the soft clamp, the momentum +
forgetting update, the causal conv, the forget gate's initial bias, and how a stored state is read back. Plain
tensor algebra (no autograd at inference): the same functions train, decode and export."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Weights = tuple[Tensor, ...]  # (w1, w2) or (w1, w2, gamma); leading dims broadcast against the tokens'
LN_EPS = 1e-5
QK_EPS = 1e-12  # the l2-normalisation as an RMSNorm: x * sqrt(d) / sqrt(|x|^2 + d * eps)


# ----------------------------------------------------------------------------- activations and their slopes


def _silu(z: Tensor) -> tuple[Tensor, Tensor]:
    s = torch.sigmoid(z)
    return z * s, s * (1 + z * (1 - s))


def _gelu(z: Tensor) -> tuple[Tensor, Tensor]:
    cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
    return z * cdf, cdf + z * torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))


def _gelu_tanh(z: Tensor) -> tuple[Tensor, Tensor]:
    c = math.sqrt(2 / math.pi)
    t = torch.tanh(c * (z + 0.044715 * z**3))
    return 0.5 * z * (1 + t), 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)


ACTIVATIONS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "silu": _silu,
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
}
ACT_ONLY: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
}


# ----------------------------------------------------------------------------- the memory MLP and its gradient


def mlp_forward(x: Tensor, w: Weights, act: str) -> Tensor:
    """x (..., c, d) through M_W -> (..., c, d), forward only (retrieval). len(w) == 3 means residual_norm."""
    z = x @ w[0]  # (..., c, h)
    a = ACT_ONLY[act](z)
    y = a @ w[1]  # (..., c, d)
    if len(w) == 2:
        return y
    return F.layer_norm(y, (y.shape[-1],), eps=LN_EPS) * (1 + w[2].unsqueeze(-2)) + x


def _forward_cached(x: Tensor, w: Weights, act: str) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """mlp_forward keeping what the closed-form gradient needs: (out, (act, act', normalised y, 1/std))."""
    z = x @ w[0]
    a, da = ACTIVATIONS[act](z)
    y = a @ w[1]
    if len(w) == 2:
        return y, (a, da, None, None)
    var, mu = torch.var_mean(y, dim=-1, keepdim=True, correction=0)
    rstd = torch.rsqrt(var + LN_EPS)  # (..., c, 1)
    n = (y - mu) * rstd
    return n * (1 + w[2].unsqueeze(-2)) + x, (a, da, n, rstd)


def mlp_grad(k: Tensor, v: Tensor, theta: Tensor, w: Weights, act: str) -> tuple[Weights, Tensor]:
    """Closed-form gradient of sum_i theta_i * mean_d (M_W(k_i) - v_i)^2 over the token axis (-2).

    k, v (..., c, d), theta (..., c), w with matching leading dims -> (grads like w, per-token loss (..., c)).
    """
    p, (a, da, n, rstd) = _forward_cached(k, w, act)
    diff = p - v
    e = diff * (theta.unsqueeze(-1) * (2.0 / k.shape[-1]))  # dL/dP (..., c, d)
    if len(w) == 2:
        dy, g_gamma = e, None
    else:
        g_gamma = (e * n).sum(-2)  # (..., d)
        dn = e * (1 + w[2].unsqueeze(-2))
        dy = rstd * (dn - dn.mean(-1, keepdim=True) - n * (dn * n).mean(-1, keepdim=True))
    g_w2 = a.transpose(-1, -2) @ dy  # (..., h, d)
    dz = (dy @ w[1].transpose(-1, -2)) * da  # (..., c, h)
    g_w1 = k.transpose(-1, -2) @ dz  # (..., d, h)
    grads = (g_w1, g_w2) if g_gamma is None else (g_w1, g_w2, g_gamma)
    return grads, diff.pow(2).mean(-1)


def soft_clamp(g: Weights, max_norm: float) -> Weights:
    """Scale each head's whole gradient to norm max_norm * tanh(norm / max_norm): smooth, ~identity when small."""
    if max_norm <= 0:
        return g
    sq = g[0].pow(2).sum((-1, -2)) + g[1].pow(2).sum((-1, -2))  # (...) per head
    if len(g) == 3:
        sq = sq + g[2].pow(2).sum(-1)
    norm = torch.sqrt(sq + 1e-12)
    f = torch.tanh(norm / max_norm) * (max_norm / norm)
    return (g[0] * f[..., None, None], g[1] * f[..., None, None], *(x * f[..., None] for x in g[2:]))


def as_fp32(t: Tensor) -> Tensor:
    """t in fp32 (a bf16-stored model's memory still computes in fp32); no dispatch when it already is."""
    return t if t.dtype == torch.float32 else t.float()


def _expand(t: Tensor, like: Tensor) -> Tensor:
    """A (B,H) gate broadcast against a weight tensor (B,H,...)."""
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def stored_read(stored: Tensor, keep: Tensor | None, base: Tensor | None) -> Tensor:
    """A memory state kept as keep-able storage (CoreML: fp16, as its change from W_0) -> fp32 value
    keep * stored (+ W_0). Here, so that an exporter's fp32 rule for this file covers it."""
    value = stored.float()
    if keep is not None:
        value = value * keep
    return value if base is None else base.to(value.dtype) + value


def stored_write(value: Tensor, base: Tensor | None) -> Tensor:
    """The inverse of stored_read for keep = 1: what to store for a new value."""
    return value if base is None else value - base


def apply_update(w: Weights, s: Weights, g: Weights, eta: Tensor, alpha: Tensor) -> tuple[Weights, Weights]:
    """S' = eta S - g ;  W' = (1 - alpha) W + S'  (eta, alpha (B,H))."""
    s_new = tuple(_expand(eta, si) * si - gi for si, gi in zip(s, g))
    w_new = tuple((1 - _expand(alpha, wi)) * wi + si for wi, si in zip(w, s_new))
    return w_new, s_new


def forget_bias(mode: str, chunk: int) -> float:
    """The forget gate's initial logit: -4 per chunk whatever its size ("chunk"), or the per-token forgetting
    that -4 gives a 16-token chunk, at any chunk size ("token": 1 - alpha_C = (1 - alpha_16) ** (C / 16))."""
    if mode == "chunk":
        return -4.0
    alpha = 1 - (1 - 1 / (1 + math.exp(4.0))) ** (chunk / 16)
    return math.log(alpha / (1 - alpha))


def causal_conv(p: Tensor, weight: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """Depthwise causal convolution over time: p (B,T,F), weight (F,k), state (B,k-1,F) the k-1 inputs before p
    (None: zeros, a sequence start) -> (out (B,T,F), the new state). weight[:, -1] weighs the current token."""
    B, T, n = p.shape
    k = weight.shape[1]
    full = torch.cat([state if state is not None else p.new_zeros(B, k - 1, n), p], dim=1)  # (B,T+k-1,F)
    if T == 1:  # decode: one multiply-add over the k rows
        out = (full * weight.t()).sum(1, keepdim=True)
    else:
        out = F.conv1d(full.transpose(1, 2), weight.unsqueeze(1), groups=n).transpose(1, 2)
    return out, full[:, T:]
