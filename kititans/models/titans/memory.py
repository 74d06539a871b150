"""Titans neural long-term memory: a per-head 2-layer MLP whose weights learn at test time.

Per head h, with keys and queries (and, with norm_v, values) l2-normalised (research/titans.md §1.3, §4):
    M_W(x)  = act(x W1) W2                                  (plain)
            = LN(act(x W1) W2) * (1 + gamma) + x            (residual_norm: tp's ResidualNorm)
    loss    = sum_i theta_i * mean_d (M_W(k_i) - v_i)^2      theta_i = max_lr * sigmoid(.) per token
    chunk j : g_j = grad of the loss over the chunk's tokens at W_base (soft-clamped norm)
              S_j = eta_j S_{j-1} - g_j ;  W_j = (1 - alpha_j) W_{j-1} + S_j
              eta_j, alpha_j = sigmoid(mean over the chunk of per-token logits)
    read    : token t retrieves with W_{floor((t+1)/C)} (a token that closes a chunk sees its own chunk)
W_base is the weights at the chunk start (grad_base "chunk", B = C, the paper's scheme) or the learned initial
weights W_0 ("init", B = None: every chunk's gradient is independent, so they are computed in one batch).
Optionally (conv > 0) a depthwise causal convolution follows the q/k/v projections (the paper's kernel 4).

The gradient is the closed form of research §4.1 written as plain tensor algebra (no autograd, no torch.func),
so the same code trains (autograd differentiates *through* it), decodes token by token, and exports.
Everything here runs in fp32, also under bf16 autocast.

The per-token path over a decode state (its layout and the few ops of a decode step) is memory_step.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kititans.models.layers import RMSNorm, linear
from kititans.models.titans.memory_math import (
    QK_EPS,
    Weights,
    apply_update,
    as_fp32,
    causal_conv,
    forget_bias,
    mlp_forward,
    mlp_grad,
    soft_clamp,
)
from kititans.models.titans.memory_step import MemoryStep

# ----------------------------------------------------------------------------- the module


def _chunk_columns(n: int) -> Callable[[Tensor], Sequence[Tensor]]:
    """The scan's per-chunk views of a (B, H, n, ...) tensor. Training: one unbind, whose backward stacks the n
    chunks' gradients once (a select per chunk would make n full-size zero tensors in the backward, O(n^2)
    at long sequences: 128 chunks per memory layer at T 2048). Without autograd (decode, exports) the plain
    selects, so exported graphs are unchanged."""
    if torch.is_grad_enabled():
        return lambda t: t.unbind(2)
    return lambda t: [t[:, :, j] for j in range(n)]


class NeuralMemory(MemoryStep, nn.Module):
    """One memory layer: projections (+ optional causal conv), gates, learned initial weights W_0, the
    chunk-parallel path (training, prefill) and the per-token path (decode), both over one state layout."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        head_dim: int,
        hidden: int,
        chunk: int,
        *,
        act: str = "silu",
        residual_norm: bool = True,
        grad_base: str = "chunk",
        max_lr: float = 0.1,
        max_grad_norm: float = 1.0,
        norm_eps: float = 1e-5,
        conv: int = 0,
        norm_v: bool = True,
        forget: str = "chunk",
        frozen: bool = False,
        split_kv: bool = False,
    ):
        super().__init__()
        self.dim, self.n_heads, self.head_dim, self.hidden, self.chunk = dim, n_heads, head_dim, hidden, chunk
        self.act, self.grad_base, self.max_lr, self.max_grad_norm = act, grad_base, max_lr, max_grad_norm
        self.conv_size, self.norm_v, self.forget = conv, norm_v, forget
        self.frozen = frozen  # MAC: also reads with the weights frozen at the segment start (seg_* state)
        # MAC: keys, gates and queries from one input (the block's), values from another (the attention output)
        self.split_kv = split_kv
        self.norm = RMSNorm(dim, norm_eps)
        self.proj = nn.Linear(dim, 3 * n_heads * head_dim, bias=False)  # keys, values, queries
        self.qkv_gain = nn.Parameter(torch.zeros(3, n_heads, head_dim))  # per-head RMSNorm gains, 1 + g
        self.gates = nn.Linear(dim, 4 * n_heads)  # theta, eta, alpha, output-gate logits per head
        if conv:
            self.conv = nn.Parameter(torch.empty(3 * n_heads * head_dim, conv))  # depthwise, per channel
        self.w1 = nn.Parameter(torch.empty(n_heads, head_dim, hidden))  # learned initial memory W_0
        self.w2 = nn.Parameter(torch.empty(n_heads, hidden, head_dim))
        if residual_norm:
            self.gamma = nn.Parameter(torch.zeros(n_heads, head_dim))
        self.out = nn.Linear(n_heads * head_dim, dim, bias=False)
        self._fused: tuple[Tensor, Tensor, Tensor] | None = None  # fuse(): views of one matrix
        self._fused_q: tuple[Tensor, Tensor] | None = None  # fuse(): the rows a read needs (queries, gate)

    @property
    def n_proj(self) -> int:
        return 3 * self.n_heads * self.head_dim

    @property
    def width(self) -> int:
        """Features per token: the projected keys, values, queries and the 4 gate logits of every head."""
        return self.n_proj + 4 * self.n_heads

    # -- parameters and state layout

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.proj.weight, 0.0, std)
        nn.init.normal_(self.out.weight, 0.0, out_std)
        nn.init.normal_(self.gates.weight, 0.0, std)
        bias = torch.zeros(4, self.n_heads)
        bias[2] = forget_bias(self.forget, self.chunk)  # forget gate near 0: the memory keeps what it stored
        with torch.no_grad():
            self.gates.bias.copy_(bias.flatten())
        nn.init.zeros_(self.qkv_gain)
        nn.init.normal_(self.w1, 0.0, math.sqrt(2 / (self.head_dim + self.hidden)))  # xavier
        nn.init.normal_(self.w2, 0.0, math.sqrt(2 / (self.head_dim + self.hidden)))
        if hasattr(self, "gamma"):
            nn.init.zeros_(self.gamma)
        if self.conv_size:  # starts as the identity (the current token), learns its mix of the previous ones
            with torch.no_grad():
                self.conv.zero_()
                self.conv[:, -1] = 1.0
        self.norm.weight.data.fill_(1.0)

    def fuse(self) -> None:
        """Inference: the projections and gates become one (3Hd + 4H) x dim matrix, rows [keys | values |
        queries | output gate | theta, eta, alpha], read through three views: the keys and values, what a read
        needs (queries and output gate: a token inside a chunk reads through these alone) and the store gates.
        proj.weight becomes a view of it (the same state_dict, nothing stored twice); an exporter stores each
        view once for all its graphs."""
        if self._fused is not None:
            return
        Hd, H = self.n_proj // 3, self.n_heads
        gw, gb = self.gates.weight.detach(), self.gates.bias.detach()
        w = torch.cat([self.proj.weight.detach(), gw[3 * H :], gw[: 3 * H]])
        b = torch.cat([gb[3 * H :], gb[: 3 * H]])
        self.proj.weight.data = w[: 3 * Hd]
        self._fused = (w[: 2 * Hd], w[3 * Hd + H :], b[H:])  # keys and values; the store gates and their bias
        self._fused_q = (w[2 * Hd : 3 * Hd + H], torch.cat([gb.new_zeros(Hd), b[:H]]))

    def initial_weights(self) -> Weights:
        """W_0 in fp32, shapes (H, d, h), (H, h, d)[, (H, d)]."""
        w = (self.w1, self.w2, self.gamma) if hasattr(self, "gamma") else (self.w1, self.w2)
        return tuple(t.float() for t in w)

    def weight_names(self) -> tuple[str, ...]:
        return ("w1", "w2", "gamma") if hasattr(self, "gamma") else ("w1", "w2")

    def state_spec(self, batch: int) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of the layer's memory state (module docstring); a frozen (MAC) memory adds the
        segment-start weights (seg_*) and the conv state of its query stream h (conv_h)."""
        B, H, d, h = batch, self.n_heads, self.head_dim, self.hidden
        shapes = {"w1": (B, H, d, h), "w2": (B, H, h, d), "gamma": (B, H, d)}
        names = self.weight_names()
        out = [(n, shapes[n]) for n in names] + [(f"s_{n}", shapes[n]) for n in names]
        if self.chunk > 1:  # with split_kv a row holds both normalised inputs
            out.append(("buf", (B, self.chunk - 1, self.dim * (2 if self.split_kv else 1))))
        if self.conv_size:
            k1 = self.conv_size - 1
            out += [("conv", (B, k1, 2 * H * d)), ("conv_q", (B, k1, H * d))]
        if self.frozen:
            out += [(f"seg_{n}", shapes[n]) for n in names]
            if self.conv_size:
                out.append(("conv_h", (B, self.conv_size - 1, H * d)))
        return out

    def initial_state(self, batch: int, device: torch.device) -> dict[str, Tensor]:
        spec = self.state_spec(batch)
        st = {n: torch.zeros(s, dtype=torch.float32, device=device) for n, s in spec}
        for n, w0 in zip(self.weight_names(), self.initial_weights()):
            w0 = w0.detach().to(device).unsqueeze(0).expand(batch, *w0.shape)
            st[n] = w0.clone()
            if self.frozen:
                st[f"seg_{n}"] = w0.clone()
        return st

    # -- projections

    def _norm_in(self, x: Tensor) -> Tensor:
        """The memory's input norm, in fp32 whatever the model's dtype."""
        return F.rms_norm(as_fp32(x), (x.shape[-1],), as_fp32(self.norm.weight), self.norm.eps)

    def project_parts(self, h: Tensor, hv: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Normalised inputs h (B,T,D) fp32 -> [keys | values] (B,T,2Hd), [queries | output-gate logits]
        (B,T,Hd+H) and the store-gate logits theta, eta, alpha (B,T,3H), before any conv (weights cast to
        fp32: the path stays fp32 in a bf16-stored model too). With hv (split_kv) the values come from hv."""
        Hd, H = self.n_proj // 3, self.n_heads
        if self._fused is None:
            w_kv, w_g, b_g = self.proj.weight[: 2 * Hd], self.gates.weight[: 3 * H], self.gates.bias[: 3 * H]
        else:
            w_kv, w_g, b_g = self._fused
        if hv is None:
            kv = F.linear(h, as_fp32(w_kv))
        else:
            kv = torch.cat([F.linear(h, as_fp32(w_kv[:Hd])), F.linear(hv, as_fp32(w_kv[Hd:]))], dim=-1)
        return kv, self.query_rows(h), F.linear(h, as_fp32(w_g), as_fp32(b_g))

    def project(self, h: Tensor, hv: Tensor | None = None) -> Tensor:
        """Normalised inputs h (B,T,D) fp32 (and hv, the values' input) -> z (B,T,width): [keys | values |
        queries] (before any conv) and the gate logits."""
        return self.assemble(*self.project_parts(h, hv))

    def assemble(self, kv: Tensor, r: Tensor, g: Tensor) -> Tensor:
        """project_parts' three parts -> z (B,T,width) in `split`'s layout."""
        Hd = self.n_proj // 3
        return torch.cat([kv, r[..., :Hd], g, r[..., Hd:]], dim=-1)

    def features(
        self, x: Tensor, conv_state: Tensor | None = None, xv: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """x (B,T,D) (and xv, the values' input with split_kv) -> z (B,T,width) fp32: [keys | values | queries]
        (after the conv) and the gate logits; and the new conv state (B,k-1,3Hd) (None without conv)."""
        z = self.project(self._norm_in(x), None if xv is None else self._norm_in(xv))
        if not self.conv_size:
            return z, None
        p, state = causal_conv(z[..., : self.n_proj], self.conv.float(), conv_state)
        return torch.cat([p, z[..., self.n_proj :]], dim=-1), state

    def query_rows(self, h: Tensor) -> Tensor:
        """Only what a read needs: normalised inputs h (B,T,D) -> [raw queries | output-gate logits]
        (B,T,Hd+H), one matmul after fuse()."""
        if self._fused_q is not None:
            return linear(h, as_fp32(self._fused_q[0]), as_fp32(self._fused_q[1]))
        Hd, H = self.n_heads * self.head_dim, self.n_heads
        q = linear(h, self.proj.weight[2 * Hd :].float())
        return torch.cat(
            [q, linear(h, self.gates.weight[3 * H :].float(), self.gates.bias[3 * H :].float())], -1
        )

    def query_conv(self, qg: Tensor, conv_state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """[raw queries | gate logits] (B,T,Hd+H) -> the same with the queries through the causal conv (with
        conv), and the new conv state of the query channels (None without conv)."""
        if not self.conv_size:
            return qg, None
        Hd = self.n_heads * self.head_dim
        q, state = causal_conv(qg[..., :Hd], self.conv[2 * Hd :].float(), conv_state)
        return torch.cat([q, qg[..., Hd:]], dim=-1), state

    def query_features(
        self, x: Tensor, conv_state: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Only what a read needs (MAC's query stream): x (B,T,D) -> raw queries (B,T,Hd), output-gate logits
        (B,T,H), the new conv state of the query channels."""
        qg, state = self.query_conv(self.query_rows(self._norm_in(x)), conv_state)
        q, gate = qg.split([self.n_heads * self.head_dim, self.n_heads], dim=-1)
        return q, gate, state

    def read_query(self, q: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
        """Raw queries (B,T,Hd) and gate logits (B,T,H) -> normalised queries (B,H,T,d), gates (B,H,T)."""
        B, T, _ = q.shape
        q = q.view(B, T, self.n_heads, self.head_dim)
        q = F.rms_norm(q, (self.head_dim,), eps=QK_EPS) * (1 + self.qkv_gain[2].float())
        return q.transpose(1, 2), torch.sigmoid(gate).transpose(1, 2)

    def split(self, z: Tensor) -> tuple[Tensor, ...]:
        """z (B,T,width) -> k, v, q (B,H,T,d), theta (B,H,T), eta/alpha logits (B,H,T), out gate (B,H,T).
        Keys and queries (and values with norm_v) are l2-normalised, scaled by sqrt(d) * (1 + gain)."""
        B, T, _ = z.shape
        H, d = self.n_heads, self.head_dim
        qkv = z[..., : self.n_proj].view(B, T, 3, H, d)
        scale = 1 + self.qkv_gain.float()
        normed = F.rms_norm(qkv, (d,), eps=QK_EPS)
        if not self.norm_v:  # the paper normalises keys and queries only
            normed = torch.cat([normed[:, :, :1], qkv[:, :, 1:2], normed[:, :, 2:]], dim=2)
        k, v, q = (normed * scale).permute(2, 0, 3, 1, 4).unbind(0)  # (B,H,T,d) each
        g = z[..., self.n_proj :].reshape(B, T, 4, H).permute(2, 0, 3, 1)  # (4,B,H,T)
        return k, v, q, self.max_lr * torch.sigmoid(g[0]), g[1], g[2], torch.sigmoid(g[3])

    def combine(self, r: Tensor, gate: Tensor) -> Tensor:
        """Retrieved r (B,H,T,d) gated per head (B,H,T) -> (B,T,D)."""
        B, H, T, d = r.shape
        return F.linear(
            (r * gate.unsqueeze(-1)).transpose(1, 2).reshape(B, T, H * d), self.out.weight.float()
        )

    def _base(self, w: Weights, lead: int) -> Weights:
        """The weights gradients are taken at: the current W ("chunk") or W_0 with `lead` broadcast dims."""
        if self.grad_base == "chunk":
            return w
        return tuple(
            t.view((1, t.shape[0], *(1,) * (lead - 2), *t.shape[1:])) for t in self.initial_weights()
        )

    def _start(self, batch: int) -> tuple[Weights, Weights]:
        w = tuple(t.unsqueeze(0).expand(batch, *t.shape) for t in self.initial_weights())
        return w, tuple(torch.zeros_like(t) for t in w)

    # -- the chunk-parallel path (training, MAC segments)

    def forward(
        self, x: Tensor, ctx: Any = None, io: Any = None, read_frozen: bool = False, xv: Tensor | None = None
    ) -> Tensor:
        """x (B,T,D) -> memory output (B,T,D) fp32. Without `io`: a whole sequence from W_0 (store x, read
        x). With `ctx` (state.StepCtx) and `io` (state.StateIO): one call over the state, `step`
        (store and read), or with read_frozen MAC's h (read with the segment-start weights). With split_kv,
        xv is what the values are made of (x: the keys, gates and queries). Decode enters here so that an
        exporter sees every memory op inside this module's forward."""
        if torch.is_autocast_enabled(x.device.type):  # the memory path always runs in fp32
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x, ctx, io, read_frozen, xv)
        return self._forward(x, ctx, io, read_frozen, xv)

    def _forward(self, x: Tensor, ctx: Any, io: Any, read_frozen: bool, xv: Tensor | None) -> Tensor:
        if io is None:
            k, v, q, theta, le, la, gate = self.split(self.features(x, xv=xv)[0])
            w_all, _, _ = self.scan(k, v, theta, le, la, None, None)
            return self.combine(self.retrieve(q, w_all), gate)
        if read_frozen:
            seg = tuple(io.get(f"seg_{n}") for n in self.weight_names())
            if x.shape[1] == 1:  # one token: few ops
                return self.read_one(self._step_query(self._norm_in(x), io, "conv_h"), seg, ctx.cache)
            q, gate, conv_h = self.queries(x, io.get("conv_h") if self.conv_size else None)
            if conv_h is not None:
                io.put("conv_h", conv_h)
            return self.read(q, gate, seg)
        out = self._step(x, ctx, io, xv)
        if self.frozen and ctx.closes_segment:  # the next segment's h reads the memory as this one left it
            for n in self.weight_names():
                io.put(f"seg_{n}", io.get(n))
        return out

    def scan(
        self,
        k: Tensor,
        v: Tensor,
        theta: Tensor,
        le: Tensor,
        la: Tensor,
        w: Weights | None,
        s: Weights | None,
    ) -> tuple[Weights, Weights, Weights]:
        """Chunk-parallel store of T tokens that start at a chunk boundary, from weights w and momentum s
        ((B,H,...) each; None: W_0 and zero). Returns W after 0..n_full completed chunks stacked on dim 2
        ((B,H,n_full+1,...) each) and (W, S) after the last completed chunk; a trailing part-chunk is read
        but not stored."""
        B, H, T, d = k.shape
        C = self.chunk
        n = T // C
        if w is None or s is None:
            w, s = self._start(B)
        ws = [w]
        if n:
            kc, vc = k[:, :, : n * C].reshape(B, H, n, C, d), v[:, :, : n * C].reshape(B, H, n, C, d)
            tc = theta[:, :, : n * C].reshape(B, H, n, C)
            eta = torch.sigmoid(le[:, :, : n * C].reshape(B, H, n, C).mean(-1))  # (B,H,n)
            alpha = torch.sigmoid(la[:, :, : n * C].reshape(B, H, n, C).mean(-1))
            cols = _chunk_columns(n)
            if self.grad_base == "init":  # all chunks' gradients at W_0 in one batch
                g_all, _ = mlp_grad(kc, vc, tc, self._base(w, 3), self.act)
                g_cols = [cols(t) for t in g_all]
            kcs, vcs, tcs, etas, alphas = cols(kc), cols(vc), cols(tc), cols(eta), cols(alpha)
            for j in range(n):
                if self.grad_base == "init":
                    g = tuple(c[j] for c in g_cols)
                else:
                    g, _ = mlp_grad(kcs[j], vcs[j], tcs[j], w, self.act)
                w, s = apply_update(w, s, soft_clamp(g, self.max_grad_norm), etas[j], alphas[j])
                ws.append(w)
        w_all = tuple(torch.stack([wj[i] for wj in ws], dim=2) for i in range(len(w)))
        return w_all, w, s

    def retrieve(self, q: Tensor, w_all: Weights) -> Tensor:
        """Token i (at chunk phase i from a chunk boundary) reads the weights after floor((i + 1) / C) completed
        chunks: shift the queries right by one and read group g with w_all[:, :, g]."""
        B, H, T, d = q.shape
        C, groups = self.chunk, w_all[0].shape[2]
        back = groups * C - (1 + T)
        qg = F.pad(q, (0, 0, 1, back)).view(B, H, groups, C, d)
        r = mlp_forward(qg, w_all, self.act)
        return r.reshape(B, H, groups * C, d)[:, :, 1 : 1 + T]

    def close_chunk(
        self, w: Weights, s: Weights, k: Tensor, v: Tensor, theta: Tensor, le: Tensor, la: Tensor
    ) -> tuple[Weights, Weights]:
        """The update of one whole chunk (k, v (B,H,C,d), theta/logits (B,H,C)): gradient at W_base, then
        momentum and forgetting."""
        g, _ = mlp_grad(k, v, theta, self._base(w, 2), self.act)
        eta, alpha = torch.sigmoid(le.mean(-1)), torch.sigmoid(la.mean(-1))
        return apply_update(w, s, soft_clamp(g, self.max_grad_norm), eta, alpha)

    def queries(self, x: Tensor, conv_state: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """MAC's query stream: x (B,T,D) -> q (B,H,T,d), gate (B,H,T), the new conv state."""
        q, gate, state = self.query_features(x, conv_state)
        return (*self.read_query(q, gate), state)

    def read(self, q: Tensor, gate: Tensor, w: Weights) -> Tensor:
        """Read with fixed weights w ((B,H,...) each): q (B,H,T,d) -> (B,T,D)."""
        return self.combine(mlp_forward(q, w, self.act), gate)

    def store_read(
        self, x: Tensor, w: Weights | None, s: Weights | None, conv_state: Tensor | None,
        xv: Tensor | None = None,
    ) -> tuple[Tensor, Weights, Weights, Tensor | None]:  # fmt: skip
        """Store x (B,T,D) chunk-parallel from (w, s) and read it back (MAC: the attention output of one
        segment; with split_kv the block input, and xv the attention output the values come from) -> (out
        (B,T,D), W, S after its last whole chunk, conv state)."""
        z, conv_state = self.features(x, conv_state, xv)
        k, v, q, theta, le, la, gate = self.split(z)
        w_all, w, s = self.scan(k, v, theta, le, la, w, s)
        return self.combine(self.retrieve(q, w_all), gate), w, s, conv_state

    @torch.no_grad()
    def inner_losses(self, x: Tensor) -> Tensor:
        """Diagnostics: each chunk's mean inner loss mean_d (M_W(k) - v)^2 under the weights the memory holds
        when the chunk arrives (before storing it) -> (B, H, n_chunks). Falls as the memory learns."""
        with torch.autocast(x.device.type, enabled=False):
            k, v, _, theta, le, la, _ = self.split(self.features(x.float())[0])
            w_all, _, _ = self.scan(k, v, theta, le, la, None, None)
            B, H, T, d = k.shape
            n = T // self.chunk
            kc = k[:, :, : n * self.chunk].reshape(B, H, n, self.chunk, d)
            vc = v[:, :, : n * self.chunk].reshape(B, H, n, self.chunk, d)
            p = mlp_forward(kc, tuple(t[:, :, :n] for t in w_all), self.act)
            return (p - vc).pow(2).mean((-1, -2))
