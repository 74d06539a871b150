"""The per-token path of a Titans memory layer (models/titans/memory.py NeuralMemory, which inherits it): one
token, or one whole chunk at a chunk boundary, stored into and read from a decode state.

Decode state of one memory layer (B = batch, H = heads, d = head dim, h = hidden, C = chunk, D = model dim):
    w1, w2, gamma        (B,H,d,h) (B,H,h,d) (B,H,d)   current weights W (gamma only with residual_norm)
    s_w1, s_w2, s_gamma  same shapes                    momentum S
    buf                  (B, C-1, D)                    the open chunk's normalised inputs, one row per token
    conv                 (B, k-1, 2Hd)                  with conv: the key/value projections of the k-1 tokens
                                                        before the open chunk (written when a chunk closes)
    conv_q               (B, k-1, Hd)                   with conv: the last k-1 query projections
A token inside a chunk writes its row of `buf` and reads W through its query alone (one (Hd + H) x D matmul:
what a read needs); the token that closes the chunk (or a C-token prefill at a chunk boundary) projects the
chunk's rows in one matmul, runs the closed form once over the chunk and rewrites W and S. So the key, value
and gate rows of the projection are read once per chunk, not once per token.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kititans.models.layers import linear
from kititans.models.titans.memory_math import ACT_ONLY, LN_EPS, QK_EPS, Weights, as_fp32, causal_conv


class MemoryStep:
    """NeuralMemory's decode methods; they use its projections, scan and parameters (memory.py)."""

    def _step_query(self, h: Tensor, io: Any, conv: str, qg: Tensor | None = None) -> Tensor:
        """One token's [queries | gate logits] (B,1,Hd+H) from its normalised input h (or its projected rows
        qg), through the conv over the query history in state `conv` (updated)."""
        qg = self.query_rows(h) if qg is None else qg
        if not self.conv_size:
            return qg
        qg, state = self.query_conv(qg, io.get(conv))
        io.put(conv, state)
        return qg

    def _step(self, x: Tensor, ctx: Any, io: Any, xv: Tensor | None = None) -> Tensor:
        """x (B,T,D) with T = 1, or T = chunk at a chunk boundary (and xv, the values' input with split_kv).
        A token inside a chunk writes its normalised input(s) into `buf` and reads W through its query alone;
        a call that closes the chunk projects the chunk's rows, updates W and S once, and its last token reads
        the new W."""
        names = self.weight_names()
        w = tuple(io.get(n) for n in names)
        Hd = self.n_heads * self.head_dim
        if x.shape[1] == 1:
            h = self._norm_in(x)  # (B,1,D)
            row = h if xv is None else torch.cat([h, self._norm_in(xv)], dim=-1)
            if not ctx.closes_chunk:
                io.put_rows("buf", ctx.chunk_slots, row)
                return self.read_one(self._step_query(h, io, "conv_q"), w, ctx.cache)
            rows = torch.cat([io.get("buf"), row], dim=1) if self.chunk > 1 else row
            if xv is None:
                kv, r, g = self.project_parts(rows)
            else:
                kv, r, g = self.project_parts(rows[..., : self.dim], rows[..., self.dim :])
            qg = self._step_query(h, io, "conv_q", r[:, -1:])  # the closing token's read
            if self.conv_size:  # keys and values through the conv over the chunk's rows and the k-1 before
                kv, state = causal_conv(kv, self.conv[: 2 * Hd].float(), io.get("conv"))
                io.put("conv", state)
            k, v, _, theta, le, la, _ = self.split(self.assemble(kv, r, g))
            w_new, s_new = self.close_chunk(w, self._momentum(io), k, v, theta, le, la)
            self._put_weights(io, w_new, s_new)
            return self.read_one(qg, w_new, ctx.cache)
        state = torch.cat([io.get("conv"), io.get("conv_q")], dim=-1) if self.conv_size else None
        z, state = self.features(x, state, xv)  # a whole chunk at a chunk boundary
        if state is not None:
            io.put("conv", state[..., : 2 * Hd])
            io.put("conv_q", state[..., 2 * Hd :])
        k, v, q, theta, le, la, gate = self.split(z)  # whole chunks: one update each, in order
        w_all, w_new, s_new = self.scan(k, v, theta, le, la, w, self._momentum(io))
        self._put_weights(io, w_new, s_new)
        return self.combine(self.retrieve(q, w_all), gate)

    def _momentum(self, io: Any) -> Weights:
        return tuple(io.get(f"s_{n}") for n in self.weight_names())

    def _put_weights(self, io: Any, w: Weights, s: Weights) -> None:
        for n, a, b in zip(self.weight_names(), w, s):
            io.put(n, a)
            io.put(f"s_{n}", b)

    def read_one(self, qg: Tensor, w: Weights, cache: dict | None = None) -> Tensor:
        """One token's read from its [queries | output-gate logits] qg (B,1,Hd+H) with weights w -> (B,1,D):
        the few ops a decode step runs (`cache`, the in-place decode's, keeps the query gain between calls)."""
        B, H, d = qg.shape[0], self.n_heads, self.head_dim
        gain, key = None, None
        if cache is not None:
            try:  # the parameter's version: an optimizer step changes it in place
                key = ("q_gain", id(self), self.qkv_gain.data_ptr(), self.qkv_gain._version)
            except RuntimeError:  # an inference tensor (made under inference_mode) is never changed
                key = ("q_gain", id(self), self.qkv_gain.data_ptr())
            gain = cache.get(key)
        if gain is None:
            gain = (1 + self.qkv_gain[2].float()).view(H, 1, d)
            if key is not None:
                cache[key] = gain
        q = F.rms_norm(qg[..., : H * d].view(B, H, 1, d), (d,), eps=QK_EPS) * gain  # (B,H,1,d)
        y = ACT_ONLY[self.act](q @ w[0]) @ w[1]
        if len(w) == 3:
            y = F.layer_norm(y, (d,), eps=LN_EPS) * (1 + w[2].unsqueeze(-2)) + q
        gate = torch.sigmoid(qg[..., H * d :]).view(B, H, 1, 1)
        return linear((y * gate).view(B, 1, H * d), as_fp32(self.out.weight))
