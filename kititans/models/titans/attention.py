"""Titans attention: learned persistent K/V (no RoPE) in front of RoPE'd keys, either a sliding window (mal,
mag: a token sees itself and the window-1 tokens before it) or segments (mac: a token sees the tokens of its
own segment of `window` tokens up to itself, and in memory layers also the memory's h rows of those tokens).
Keys and values travel as (B, S, H*hd) rows, the layout of the decode rings (state.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kititans.models.layers import apply_linear
from kititans.models.titans.state import StateIO, StepCtx
from kititans.models.titans.windowed import local_attention, segment_h_attention


class TitansAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_persistent: int, window: int, segment: bool):
        super().__init__()
        self.n_heads, self.hd, self.window, self.segment = n_heads, dim // n_heads, window, segment
        self.kind = "segment" if segment else "sliding"  # windowed.KINDS: what a whole sequence attends
        self.n_persistent = n_persistent
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.persistent_k = nn.Parameter(torch.empty(n_heads, n_persistent, self.hd))
        self.persistent_v = nn.Parameter(torch.empty(n_heads, n_persistent, self.hd))

    def ring_rows(self, streams: int) -> int:
        """Rows of this layer's decode ring: persistent + `streams` x window (MAC memory layers: 2)."""
        return self.n_persistent + streams * self.window

    def persistent(self, batch: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The persistent K/V as rows (B, n_p, H*hd)."""
        n, D = self.n_persistent, self.n_heads * self.hd
        k = self.persistent_k.transpose(0, 1).reshape(1, n, D).to(dtype).expand(batch, -1, -1)
        v = self.persistent_v.transpose(0, 1).reshape(1, n, D).to(dtype).expand(batch, -1, -1)
        return k, v

    def project(self, u: Tensor, ctx: StepCtx) -> tuple[Tensor, Tensor, Tensor]:
        """u (B,T,D) normalised -> q, k (RoPE'd), v (B,T,D)."""
        qkv = self.qkv(u)
        D = qkv.shape[-1] // 3
        qk = ctx.rope(qkv[..., : 2 * D], heads=2 * self.n_heads)  # one RoPE for both
        return qk[..., :D], qk[..., D:], qkv[..., 2 * D :]

    def project_kv(self, h: Tensor, ctx: StepCtx, start: int = 0) -> tuple[Tensor, Tensor]:
        """MAC: keys (RoPE'd, at the positions of the tokens they come from) and values of h rows (B,T',D)."""
        D = h.shape[-1]
        k, v = F.linear(h, self.qkv.weight[D:]).chunk(2, dim=-1)
        return ctx.rope(k, start), v

    def _rows(self, ctx: StepCtx, which: int, *parts: Tensor) -> Tensor:
        """The rows a call writes into its ring k (which 0) or v (1): (the persistent rows and) its new rows."""
        if ctx.refresh_persistent:
            parts = (self.persistent(parts[0].shape[0], parts[0].dtype)[which], *parts)
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def forward(self, u: Tensor, ctx: StepCtx, io: StateIO | None) -> Tensor:
        """Attention of layers without MAC's h rows: u (B,T,D) normalised -> (B,T,D)."""
        B, T, _ = u.shape
        if ctx.stateful and T == 1:
            return apply_linear(self.o_proj, self.step_one(u, ctx, io))
        q, k, v = self.project(u, ctx)
        if not ctx.stateful:  # the whole sequence: no (T, T) mask (windowed.py)
            pk, pv = self.persistent(B, k.dtype)
            y = local_attention(q, k, v, pk, pv, self.n_heads, self.window, self.kind)
        elif self.segment:
            y = self.segment_step(q, k, v, ctx, io)
        else:  # a chunk: read the ring as it was (its oldest rows are still in the first tokens' windows)
            n, m = self.n_persistent, min(T, self.window)
            rk, rv = io.get("k").to(k.dtype), io.get("v").to(v.dtype)
            if ctx.refresh_persistent:  # the ring's own persistent rows may not be written yet
                pk, pv = self.persistent(B, k.dtype)
                rk, rv = torch.cat([pk, rk[:, n:]], 1), torch.cat([pv, rv[:, n:]], 1)
            y = ctx.attend(q, torch.cat([rk, k], 1), torch.cat([rv, v], 1), ctx.sliding_mask(read_first=True))
            idx = ctx.ring_slots(self.window, 1, m)
            io.put_rows("k", idx, self._rows(ctx, 0, k[:, T - m :]))
            io.put_rows("v", idx, self._rows(ctx, 1, v[:, T - m :]))
        return self.o_proj(y)

    def step_one(self, rows: Tensor, ctx: StepCtx, io: StateIO) -> Tensor:
        """One token over the ring (decode, eager, exported or compiled): rows (B, streams, D) normalised, all at
        the token's position, are the ring's streams: the token (B,1,D), or MAC's [h row ; token]. One q/k/v
        matmul and one RoPE for every row (each row's q and k ride as heads of one row; the h row's query is
        computed and unused), the ring write, the token's attention -> (B,1,D) before o_proj."""
        B, streams, D = rows.shape
        qkv = apply_linear(self.qkv, rows)  # (B, streams, 3D)
        qk = qkv[..., : 2 * D] if streams == 1 else qkv[..., : 2 * D].reshape(B, 1, streams * 2 * D)
        qk = ctx.rope(qk, heads=streams * 2 * self.n_heads).view(B, streams, 2 * D)
        idx = ctx.ring_slots(self.window, streams, 1)
        rk = io.put_rows("k", idx, self._rows(ctx, 0, qk[..., D:]))  # an overwritten row has left the window
        rv = io.put_rows("v", idx, self._rows(ctx, 1, qkv[..., 2 * D :]))
        if rk.dtype != qk.dtype:  # a bf16 autocast step over an fp32 ring
            rk, rv = rk.to(qk.dtype), rv.to(qk.dtype)
        if self.segment:
            mask = ctx.segment_mask(streams)
        else:
            mask = None if ctx.ring_full else ctx.sliding_mask(read_first=False)
        return ctx.attend(qk[:, streams - 1 :, :D], rk, rv, mask)

    def segment_step(
        self, q: Tensor, k: Tensor, v: Tensor, ctx: StepCtx, io: StateIO, hk: Tensor | None = None,
        hv: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """A MAC call over the ring (T tokens of one segment): write [persistent ; h ; tokens], then read."""
        T = q.shape[1]
        streams = 1 if hk is None else 2
        idx = ctx.ring_slots(self.window, streams, T)
        rk = io.put_rows("k", idx, self._rows(ctx, 0, *([hk] if hk is not None else []), k))
        rv = io.put_rows("v", idx, self._rows(ctx, 1, *([hv] if hv is not None else []), v))
        return ctx.attend(q, rk.to(q.dtype), rv.to(q.dtype), ctx.segment_mask(streams))

    def segment_parallel(
        self, q: Tensor, k: Tensor, v: Tensor, hk: Tensor, hv: Tensor, ctx: StepCtx
    ) -> Tensor:
        """MAC training: one segment's queries over [persistent ; its h rows ; its tokens], causal over both
        (B,L,D) each -> (B,L,D) before o_proj."""
        pk, pv = self.persistent(q.shape[0], k.dtype)
        return segment_h_attention(q, k, v, hk, hv, pk, pv, self.n_heads)
