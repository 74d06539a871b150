"""The three Titans blocks of the paper (arXiv 2501.00663 §4), chosen by `model.block`. In each, N is the layer's
neural memory (memory.py), SWA sliding-window attention over [persistent K/V ; the last `window` tokens]:

  mal  memory as a layer:   x += N(x);  x += SWA(norm(x))                  (the memory stores and reads x)
  mag  memory as a gate:    u = norm(x);  x += SWA(u) * sigmoid(N(u))      (both branches on the same u)
  mac  memory as context:   segments of S = window tokens; per segment (the defaults, revision 2)
         h    = N*(q(u))    read with the memory frozen at the segment start (one h row per token)
         y    = Attn(norm(u) over [persistent ; norm(h) ; segment]), causal over h and over the segment
         N   <- u           the memory stores the block input (chunk by chunk, as everywhere)
         x   += y * (1 + g * tanh(N(u))) + h   read with the updated memory; g per channel, 0 at init
       The paper's ambiguities (research/titans.md §2.1) are settled so: (a) h has one row per token (no
       separate N_l long-term tokens); (b) token i sees h_j only for j <= i of its own segment, so h never leaks
       the future; (c) no extra learned normalisations beyond the memory's own RMSNorm and per-head gains.
MAC's options (config `mac_*`, measured one at a time in docs/titans.md; revision 1's values, the first MAC
block, in brackets): the layers without memory attend over a sliding window or within segments
(mac_attention, [segment]); the gate y * (1 + g * tanh(N)), open at init, or y * sigmoid(N) (mac_gate,
[sigmoid]); h as attention rows or not (mac_h_rows); the memory's keys, gates and queries from the block input
u or from the attention output y (mac_keys, [y]), its values from u or y (mac_values, [y]); h also added to the
residual stream (mac_h_residual, [no]). With revision 1's values information crosses segments only through the
memory, which stores y, and the first mac did not learn pass-key beyond a segment; the defaults did (96% at 4x
the window). MAG's gate is SWA(u) * sigmoid(N(u)).
Layers in `global_layers` attend causally over everything before them (a sliding window of context_length).
Every block ends with x += SwiGLU(norm(x)); layers without memory are attention + SwiGLU only (mac: segment
attention, or with mac_attention=sliding a window). Every block trains chunk-parallel over a whole sequence
(mac: one segment after another, since each segment's h needs the memory the previous one left) and steps
token by token over a fixed-size state (state.py), equal to the parallel forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from kititans.models.layers import HyperConnection, RMSNorm, SwiGLU, apply_linear
from kititans.models.titans.attention import TitansAttention
from kititans.models.titans.memory import NeuralMemory
from kititans.models.titans.state import StateIO, StepCtx


def _fp32(x: Tensor) -> torch.autocast:
    """The memory path runs in fp32, also under bf16 autocast."""
    return torch.autocast(x.device.type, enabled=False)


def _like(t: Tensor, like: Tensor) -> Tensor:
    return t if t.dtype == like.dtype else t.to(like.dtype)


class TitansLayer(nn.Module):
    def __init__(self, cfg, index: int):
        super().__init__()
        self.block = cfg.block
        mac = cfg.block == "mac"
        self.h_rows = mac and cfg.mac_h_rows and index in cfg.memory_set  # h as attention rows
        self.h_residual = mac and cfg.mac_h_residual and index in cfg.memory_set  # h added to the stream
        self.memory: NeuralMemory | None = None
        if index in cfg.memory_set:
            self.memory = NeuralMemory(
                cfg.dim,
                cfg.n_heads,
                cfg.head_dim,
                cfg.mem_hidden_mult * cfg.head_dim,
                cfg.mem_chunk,
                act=cfg.mem_act,
                residual_norm=cfg.mem_residual_norm,
                grad_base=cfg.mem_grad_base,
                max_lr=cfg.mem_max_lr,
                max_grad_norm=cfg.mem_max_grad_norm,
                norm_eps=cfg.norm_eps,
                conv=cfg.mem_conv,
                norm_v=cfg.mem_norm_v,
                forget=cfg.mem_forget_bias,
                frozen=self.h_rows or self.h_residual,
                split_kv=mac and cfg.mac_keys != cfg.mac_values,
            )
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        # a global layer: a window as long as the training context (full causal attention within it)
        self.is_global = index in cfg.global_set
        window = cfg.context_length if self.is_global else cfg.window
        segment = mac and not self.is_global and (self.memory is not None or cfg.mac_attention == "segment")
        self.attn = TitansAttention(cfg.dim, cfg.n_heads, cfg.n_persistent, window, segment)
        # the open MAC gate y * (1 + g * tanh(N(y))), per channel, g = 0 at init (init_weights)
        # MAC: where the memory's keys (and gates, queries) and its values come from, "y" or "u"
        self.mac_sources = (cfg.mac_keys, cfg.mac_values)
        # (only where the gate is used: a layer without memory has no MAC gate, and an unused parameter would
        # have no optimizer state to checkpoint)
        has_gate = mac and self.memory is not None and cfg.mac_gate == "tanh"
        self.gate_scale = nn.Parameter(torch.zeros(cfg.dim)) if has_gate else None
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_dim)
        self.hc: nn.ModuleList | None = None
        if cfg.hyper_streams > 1:
            n_branch = 3 if self.memory is not None and self.block == "mal" else 2
            self.hc = nn.ModuleList(
                HyperConnection(cfg.dim, cfg.hyper_streams, 3 * index + j, cfg.norm_eps)
                for j in range(n_branch)
            )

    @property
    def frozen(self) -> bool:
        """A MAC memory layer that reads h: segment-start weights in the state."""
        return self.memory is not None and self.memory.frozen

    def state_spec(self, batch: int, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        ring = (batch, self.attn.ring_rows(2 if self.h_rows else 1), self.attn.o_proj.in_features)
        spec = [("k", ring, dtype), ("v", ring, dtype)]
        if self.memory is not None:
            spec += [(n, s, torch.float32) for n, s in self.memory.state_spec(batch)]
        return spec

    def new_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        st = {n: torch.zeros(s, dtype=d, device=device) for n, s, d in self.state_spec(batch, dtype)[:2]}
        n = self.attn.n_persistent
        with torch.no_grad():  # the persistent rows sit at the front of the ring
            st["k"][:, :n], st["v"][:, :n] = self.attn.persistent(batch, dtype)
        if self.memory is not None:
            st.update(self.memory.initial_state(batch, device))
        return st

    def forward(self, h: Tensor, ctx: StepCtx, io: StateIO | None) -> Tensor:
        for j, fn in enumerate(self.branches(ctx, io)):
            h = self.hc[j](h, fn) if self.hc is not None else h + fn(h)
        return h

    def attn_ctx(self, ctx: StepCtx) -> StepCtx:
        """The call's context as this layer's attention sees it: a global layer's window is its own (one
        derived context per call, shared by the global layers; the in-place decode's masks for it are cached
        apart from the sliding layers')."""
        if not self.is_global:
            return ctx
        key = ("global_ctx", self.attn.window)
        if key not in ctx._memo:
            cache = None if ctx.cache is None else ctx.cache.setdefault(key, {})
            ctx._memo[key] = dataclasses.replace(ctx, window=self.attn.window, cache=cache, _memo={})
        return ctx._memo[key]

    def branches(self, ctx: StepCtx, io: StateIO | None) -> list[Callable[[Tensor], Tensor]]:
        actx = self.attn_ctx(ctx)
        attn = lambda u: self.attn(self.attn_norm(u), actx, io)  # noqa: E731
        ffn = lambda u: self.ffn(self.ffn_norm(u))  # noqa: E731
        if self.memory is None:
            return [attn, ffn]
        if self.block == "mal":
            return [lambda u: _like(self._memory(u, ctx, io), u), attn, ffn]
        if self.block == "mag":
            return [lambda u: self._mag(u, ctx, io), ffn]
        return [lambda u: self._mac(u, ctx, io), ffn]

    def _memory(self, x: Tensor, ctx: StepCtx, io: StateIO | None) -> Tensor:
        """Store x and read it back: the whole sequence, or one call over the state."""
        return self.memory(x) if not ctx.stateful else self.memory(x, ctx, io)

    def _mag(self, u: Tensor, ctx: StepCtx, io: StateIO | None) -> Tensor:
        un = self.attn_norm(u)
        a = self.attn(un, self.attn_ctx(ctx), io)
        return a * _like(torch.sigmoid(self._memory(un, ctx, io)), a)

    def _gate(self, y: Tensor, m: Tensor) -> Tensor:
        """MAC's output: y gated by the memory's read m (fp32)."""
        if self.gate_scale is None:
            return y * _like(torch.sigmoid(m), y)
        return y * (1 + self.gate_scale * _like(torch.tanh(m), y))

    def _store(self, u: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """MAC: what the memory stores (its keys, gates, queries) and, when the values come from the other
        one, the values' input (None: the same)."""
        k, v = (u if src == "u" else y for src in self.mac_sources)
        return k, (v if self.memory.split_kv else None)

    def _mac(self, u: Tensor, ctx: StepCtx, io: StateIO | None) -> Tensor:
        if ctx.stateful:
            return self._mac_step(u, ctx, io)
        mem, attn = self.memory, self.attn
        if not self.frozen:  # no h at all: segment attention, then the memory over the whole sequence
            y = attn(self.attn_norm(u), ctx, None)
            xk, xv = self._store(u, y)
            with _fp32(u):
                m = mem(xk, xv=xv)
            return self._gate(y, m)
        if self.h_rows:
            q, k, v = attn.project(self.attn_norm(u), ctx)
        else:  # attention does not depend on h: the whole sequence at once
            y_all = attn(self.attn_norm(u), ctx, None)
        with _fp32(u):
            qm, gm, _ = mem.queries(u)  # (B,H,T,d), (B,H,T): the segment-independent part of h
        B, T, _ = u.shape
        w = s = conv = None
        outs = []
        for a in range(0, T, attn.window):
            b = min(a + attn.window, T)
            with _fp32(u):
                h = mem.read(qm[:, :, a:b], gm[:, :, a:b], w if w is not None else mem._start(B)[0])
            if self.h_rows:
                hk, hv = attn.project_kv(self.attn_norm(_like(h, u)), ctx, a)
                y = attn.o_proj(attn.segment_parallel(q[:, a:b], k[:, a:b], v[:, a:b], hk, hv, ctx))
            else:
                y = y_all[:, a:b]
            xk, xv = self._store(u[:, a:b], y)
            with _fp32(u):
                m, w, s, conv = mem.store_read(xk, w, s, conv, xv=xv)
            out = self._gate(y, m)
            outs.append(out + _like(h, out) if self.h_residual else out)
        return torch.cat(outs, 1)

    def _mac_step(self, u: Tensor, ctx: StepCtx, io: StateIO) -> Tensor:
        mem, attn = self.memory, self.attn
        h = mem(u, ctx, io, read_frozen=True) if self.frozen else None  # with the segment-start weights
        if not self.h_rows:
            y = attn(self.attn_norm(u), ctx, io)
        elif u.shape[1] == 1:  # [h ; token] normalised together, one q/k/v matmul, one attention call
            rows = self.attn_norm(torch.cat([_like(h, u), u], 1))
            y = apply_linear(attn.o_proj, attn.step_one(rows, ctx, io))
        else:
            hn = self.attn_norm(_like(h, u))
            q, k, v = attn.project(self.attn_norm(u), ctx)
            hk, hv = attn.project_kv(hn, ctx)
            y = attn.o_proj(attn.segment_step(q, k, v, ctx, io, hk, hv))
        # store y (or u, or u -> y), read it back (a segment's end also moves the segment-start weights)
        xk, xv = self._store(u, y)
        m = mem(xk, ctx, io, xv=xv)
        out = self._gate(y, m)
        return out + _like(h, out) if self.h_residual else out
