"""What one Titans call shares across its layers (`StepCtx`: positions, RoPE rows, masks, ring slots, which
chunk or segment it closes) and how a layer reads and writes its decode state (`StateIO`).

The state is fixed-size. Attention keeps a ring of K/V rows per layer, (B, n_persistent + slots, dim):
    sliding (mal, mag)  [persistent | window slots]            slot of position p: p % window
    segment (mac)       [persistent | h slots | token slots]   slot of position p: p % segment
(non-memory layers of a mac model: [persistent | token slots]). The persistent rows are rewritten with every
write (a few rows), so a ring that starts as zeros needs no set-up. A call is one token, or one memory chunk
at a chunk boundary ("prefill"); what it writes:
    a token inside a chunk    its ring rows, its row of the memory buffer (+ the conv state)
    a call closing a chunk    its ring rows, the memory weights and momentum (+ the conv state)
    a call closing a segment  the same + MAC's segment-start weights
Every other state tensor is only read, so an exported graph neither recomputes nor returns it.

`StateIO` writes in place (the torch runtime, CoreML buffers) or out of place, recording what it wrote (the
functional step that ONNX traces). Row writes are `index_put` (ONNX ScatterND, CoreML scatter_nd).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kititans.models.layers import apply_rope, apply_rope_rolled, signed_sin


class StateIO:
    """One layer's state tensors during a call: `get`, `put` (a whole tensor) and `put_rows` (rows along
    dim 1 of a (B, rows, F) ring or buffer). `read` and `written` say what the call used and changed."""

    def __init__(self, tensors: dict[str, Tensor], in_place: bool):
        self.tensors = tensors
        self.in_place = in_place
        self.read: set[str] = set()
        self.written: list[str] = []

    def get(self, name: str) -> Tensor:
        if name not in self.written:
            self.read.add(name)
        return self.tensors[name]

    def put(self, name: str, value: Tensor) -> None:
        self.tensors[name] = value
        self._mark(name)

    def put_rows(self, name: str, index: Tensor, rows: Tensor) -> Tensor:
        """Write rows (B, m, F) at row indices index (m,), or (B, m) for rows of their own (rows.py), and
        return the updated tensor."""
        self.read.add(name)
        t = self.tensors[name]
        if rows.dtype != t.dtype:
            rows = rows.to(t.dtype)
        if index.dim() == 2:
            batch = torch.arange(t.shape[0], device=t.device)[:, None]
            if self.in_place:
                t.index_put_((batch, index), rows)
            else:
                t = self.tensors[name] = t.index_put((batch, index), rows)
        elif self.in_place:
            t.index_copy_(1, index, rows)
        else:  # index_put with a batch index exports as one ScatterND on the row axis (index_copy transposes)
            batch = torch.arange(t.shape[0], device=t.device)[:, None]  # (B, 1)
            t = t.index_put((batch, index[None, :]), rows)
            self.tensors[name] = t
        self._mark(name)
        return t

    def _mark(self, name: str) -> None:
        if name not in self.written:
            self.written.append(name)


def rope_rows(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin (T, hd) with duplicated halves (the rotate-half convention of layers.rope_tables)."""
    ang = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos(), emb.sin()


@dataclass
class StepCtx:
    """Positions pos..pos+T-1 (pos an int, or a (1,) int64 tensor inside an exported graph)."""

    T: int
    pos: int | Tensor
    cos: Tensor  # (T, hd)
    sin: Tensor
    n_heads: int
    n_persistent: int
    window: int  # the sliding window, and MAC's segment
    chunk: int
    stateful: bool = False  # False: one whole sequence from position 0 (training); True: a call over a state
    closes_chunk: bool = False
    closes_segment: bool = False
    fused: bool = False  # ONNX opset-23 Attention and RotaryEmbedding
    # rewrite the persistent ring rows with every write (CoreML: its states start as zeros); else they are
    # written once, by new_state / the exported initial state
    refresh_persistent: bool = False
    cache: dict | None = None  # in-place decode: masks and slots by position class, shared across calls
    _memo: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # in-place decode: masks and slots depend on the position only through its phase in the window and
        # the chunk, and (while the ring fills) on the position itself
        self._cls: tuple | None = None
        if self.cache is not None and isinstance(self.pos, int):
            period = math.lcm(self.window, self.chunk)
            self._cls = (self.T, self.pos % period, min(self.pos, self.window + self.T))

    # -- positions

    def _arange(self, n: int) -> Tensor:
        # a constant, not arange: coremltools converts a static arange to floats, which index_put refuses
        return torch.tensor(list(range(n)), dtype=torch.int64, device=self.cos.device)

    def _at(self, offsets: Tensor) -> Tensor:
        """pos + offsets as a tensor."""
        return self.pos + offsets if isinstance(self.pos, Tensor) else offsets + self.pos

    def _memoized(self, key: tuple, make) -> Tensor:
        """Per call, and for in-place decode across calls (keyed by the position class)."""
        if key in self._memo:
            return self._memo[key]
        if self._cls is not None:
            cls = key + self._cls
            if cls not in self.cache:
                self.cache[cls] = make()
            value = self.cache[cls]
        else:
            value = make()
        self._memo[key] = value
        return value

    @property
    def eager_decode(self) -> bool:
        """The in-place torch decode (a cache, a python position): fast paths with fewer, fused ops apply."""
        return self._cls is not None and not self.fused and not self.refresh_persistent

    @property
    def ring_full(self) -> bool:
        """In-place decode past the first window: every sliding ring slot is in the window (no mask needed)."""
        return isinstance(self.pos, int) and self.T == 1 and self.pos >= self.window - 1 and not self.fused

    @property
    def chunk_slots(self) -> Tensor:
        """(1,): the memory-buffer row of a token inside a chunk."""
        return self._memoized(("chunk",), lambda: torch.remainder(self._at(self._arange(1)), self.chunk))

    def ring_slots(self, size: int, streams: int, last: int) -> Tensor:
        """Ring rows written by this call: (with refresh_persistent, the persistent rows, then) for each of
        `streams` streams (MAC: h and tokens) the rows of the last `last` new tokens, `size` slots per stream."""

        def make() -> Tensor:
            n = self.n_persistent
            slot = torch.remainder(self._at(self._arange(last) + (self.T - last)), size)
            rows = [n + j * size + slot for j in range(streams)]
            return torch.cat([self._arange(n), *rows] if self.refresh_persistent else rows)

        return self._memoized(("ring", size, streams, last), make)

    # -- masks (True = may attend)

    def _held(self, size: int, last: Tensor) -> Tensor:
        """(size,): the position each ring slot holds after positions up to `last` were written (< 0: none)."""
        return last - torch.remainder(last - self._arange(size), size)

    def sliding_mask(self, read_first: bool) -> Tensor:
        """A sliding-window call over the ring. read_first (T > 1): keys [persistent ; ring before the call ;
        the T new tokens] (T, n_p + W + T); else the ring after the write (1, n_p + W)."""

        def make() -> Tensor:
            W, T, n = self.window, self.T, self.n_persistent
            q = self._at(self._arange(T))  # (T,)
            ones = torch.ones(T, n, dtype=torch.bool, device=self.cos.device)
            if not read_first:
                return torch.cat([ones, (self._held(W, self._at(self._arange(1)))[None, :] >= 0)], dim=-1)
            held = self._held(W, self._at(self._arange(1) - 1))  # positions before the call
            old = (held[None, :] >= 0) & (q[:, None] - held[None, :] < W)
            rel = self._arange(T)[:, None] - self._arange(T)[None, :]
            return torch.cat([ones, old, (rel >= 0) & (rel < W)], dim=-1)

        return self._memoized(("sliding", read_first), make)

    def segment_mask(self, streams: int) -> Tensor:
        """A MAC call over the ring after its write: (T, n_p + streams * S); a token sees the h and token slots
        of its own segment up to itself."""

        def make() -> Tensor:
            S, T = self.window, self.T
            q = self._at(self._arange(T))
            held = self._held(S, self._at(self._arange(1) + (T - 1)))  # (S,)
            start = q - torch.remainder(q, S)
            see = (held[None, :] >= start[:, None]) & (held[None, :] <= q[:, None])
            ones = torch.ones(T, self.n_persistent, dtype=torch.bool, device=self.cos.device)
            return torch.cat([ones, *([see] * streams)], dim=-1)

        return self._memoized(("segment", streams), make)

    # -- ops

    def rope(self, x: Tensor, start: int = 0, heads: int | None = None) -> Tensor:
        """RoPE on x (B,T',heads*hd) (heads: n_heads by default) at positions pos+start .. pos+start+T'-1."""
        B, T, D = x.shape
        heads = heads or self.n_heads
        cos, sin = self.cos[start : start + T], self.sin[start : start + T]
        if self.fused:
            half = cos.shape[-1] // 2
            c = cos[None, :, :half].to(x.dtype).expand(B, -1, -1)
            s = sin[None, :, :half].to(x.dtype).expand(B, -1, -1)
            return torch.onnx.ops.rotary_embedding(x, c, s, num_heads=heads)
        x4 = x.view(B, T, heads, D // heads)
        key = ("rope", start, T, x.dtype)
        if key not in self._memo:  # (T, 1, hd): broadcast over the heads, once per call
            c, s = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
            self._memo[key] = (c, signed_sin(s) if self.eager_decode else s)
        c, s = self._memo[key]
        # the in-place decode rotates in 3 ops (the per-op cost dominates a decode step); the same rotation
        y = apply_rope_rolled(x4, c, s) if self.eager_decode else apply_rope(x4, c, s)
        return y.reshape(B, T, D)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """q (B,T,D) over k, v (B,S,D) with a boolean mask (T,S) -> (B,T,D)."""
        H = self.n_heads
        if self.fused:
            return torch.onnx.ops.attention(q, k, v, mask[None, None], q_num_heads=H, kv_num_heads=H)[0]
        return attend(q, k, v, mask, H)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, n_heads: int) -> Tensor:
    """Multi-head SDPA on (B,T,D) / (B,S,D) rows with a boolean (T,S) mask (None: all) -> (B,T,D)."""
    B, T, D = q.shape
    S, hd = k.shape[1], D // n_heads
    y = F.scaled_dot_product_attention(
        q.view(B, T, n_heads, hd).transpose(1, 2),
        k.view(B, S, n_heads, hd).transpose(1, 2),
        v.view(B, S, n_heads, hd).transpose(1, 2),
        attn_mask=mask,
    )  # (B,H,T,hd)
    return y.transpose(1, 2).reshape(B, T, D)


@dataclass(frozen=True)
class StepKind:
    """One shape of stateful call: `tokens` new tokens whose last one closes a chunk (`closes_chunk`) and/or a
    MAC segment (`closes_segment`). A call at position pos takes the kind with that many tokens whose `every`
    divides pos + tokens, the largest such `every` (1: any position)."""

    name: str
    tokens: int
    every: int
    closes_chunk: bool
    closes_segment: bool


def long_prefill(chunk: int, window: int, segment: bool) -> int:
    """Tokens of the long prefill call: MAC a whole segment (`window` tokens), else the whole chunks that fit
    in the window, at most 512 (the exported graph unrolls one memory update per chunk)."""
    if segment:
        return window
    return chunk * max(1, min(window, 512) // chunk)


def step_kinds(chunk: int, segment: int | None, long: int | None = None) -> list[StepKind]:
    """The calls a model needs: a token inside a chunk, a token closing a chunk, a chunk prefill at a chunk
    boundary; for MAC (`segment` tokens per segment) also the calls that close a segment. With `long` (a
    multiple of the chunk that divides the segment, if any): a prefill of `long` tokens at a multiple of it
    (prompts in fewer, larger calls)."""
    kinds = []
    closes = lambda every: segment is not None and every % segment == 0  # noqa: E731
    if chunk > 1:
        kinds.append(StepKind("decode", 1, 1, False, False))
    if segment is None or segment != chunk:
        kinds.append(StepKind("decode_close" if chunk > 1 else "decode", 1, chunk, True, closes(chunk)))
    if segment is not None:
        kinds.append(StepKind("decode_segment", 1, segment, True, True))
    if chunk > 1:
        if segment is None or segment != chunk:
            kinds.append(StepKind("prefill", chunk, chunk, True, closes(chunk)))
        if segment is not None:
            kinds.append(StepKind("prefill_segment", chunk, segment, True, True))
    if long is not None and long > chunk and long % chunk == 0 and (segment is None or segment % long == 0):
        if segment is None or segment != long:
            kinds.append(StepKind("prefill_long", long, long, True, closes(long)))
        if segment is not None:
            kinds.append(StepKind("prefill_long_segment", long, segment, True, True))
    return kinds


def plan(n: int, pos: int, sizes: list[int] | int) -> list[tuple[int, int]]:
    """(offset, length) calls for n tokens after `pos`: the largest call size (`sizes`: the kinds' token
    counts) that starts at a multiple of itself and fits, else single tokens (the rule of
    runtimes.base.plan_chunks, which the exported runtimes follow)."""
    sizes = sorted({sizes} if isinstance(sizes, int) else set(sizes), reverse=True)
    out, at = [], 0
    while at < n:
        take = next((c for c in sizes if c > 1 and (pos + at) % c == 0 and n - at >= c), 1)
        out.append((at, take))
        at += take
    return out


def pick_kind(kinds: list[StepKind], pos: int, tokens: int) -> StepKind:
    """The kind a call of `tokens` tokens at position `pos` must use (ValueError: none can take it)."""
    fits = [k for k in kinds if k.tokens == tokens and (pos + tokens) % k.every == 0]
    if tokens > 1 and pos % tokens:
        fits = []
    if not fits:
        sizes = sorted({k.tokens for k in kinds} - {1})
        calls = "1 token" + "".join(
            f", or {n} tokens{' (a memory chunk)' if i == 0 else ''}" for i, n in enumerate(sizes)
        )
        where = " at a multiple of their size" if sizes else ""
        raise ValueError(f"no step takes {tokens} tokens at position {pos}: calls are {calls}{where}")
    return max(fits, key=lambda k: k.every)
