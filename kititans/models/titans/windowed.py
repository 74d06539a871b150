"""Titans attention over a whole sequence without a dense (T, T) mask (training, the parallel forward).

Every query sees the learned persistent K/V rows (a prefix, no RoPE) and, among the tokens, one of:
    sliding   itself and the window-1 tokens before it (mal, mag)
    segment   the tokens of its own segment of `window` tokens up to itself (mac)
    causal    every token up to itself (a global layer; also a sliding window at least as long as the sequence)
Three implementations compute the same numbers (fp32: within 1e-5 of each other):
    masked    the reference: one SDPA call over [persistent ; all T tokens] with a (T, n_p + T) boolean mask,
              O(T^2) work and memory whatever the window
    blocked   any device: sliding: query blocks of `block` tokens, each attending only to the key rows of its
              window (the `window` tokens before the block and the block itself, gathered by one unfold) with
              one small band mask shared by every block; segment: one batched call per segment (the segments
              become batch rows); causal: SDPA's own causal kernel (queries padded in front so the persistent
              rows stay visible). O(T * (window + block)) work, no (T, T) tensor.
    flex      CUDA: torch FlexAttention with a block mask cached per (kind, shape, device) and shared across
              layers, compiled once per process. FlexAttention has no CPU/MPS backward (torch 2.13), so
              elsewhere it is never picked; a first-contact probe (a small forward and backward) that fails
              falls back to `blocked` with a one-line warning.
`auto` (the default) is flex on CUDA where the probe passes, else blocked. Choose with the environment variable
KITITANS_TITANS_ATTENTION=auto|masked|blocked|flex or `with attention_impl("masked"): ...` (benchmarks, tests).

Interface (what every Titans block calls): `local_attention(q, k, v, pk, pv, n_heads, window, kind)` with q, k,
v rows (B, T, H*hd) of one sequence from position 0 (RoPE applied) and pk, pv (B, n_p, H*hd), returning (B, T,
H*hd) before the output projection; `segment_h_attention` is MAC's per-segment call over [persistent ; h rows ;
tokens].
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

IMPLS = ("auto", "masked", "blocked", "flex")
KINDS = ("sliding", "segment", "causal")
_log = logging.getLogger("kititans")
_setting = {"impl": os.environ.get("KITITANS_TITANS_ATTENTION", "auto")}
_masks: dict[tuple, Tensor] = {}  # small band / causal masks, per shape and device, shared across layers
_flex: dict = {"ok": {}, "fn": None, "block_masks": {}}


@contextmanager
def attention_impl(name: str) -> Iterator[None]:
    """Use implementation `name` (IMPLS) for local attention inside the block."""
    if name not in IMPLS:
        raise ValueError(f"unknown attention implementation {name!r}; valid: {', '.join(IMPLS)}")
    old = _setting["impl"]
    _setting["impl"] = name
    try:
        yield
    finally:
        _setting["impl"] = old


def resolve_impl(device: torch.device) -> str:
    """The implementation a call on `device` uses: masked, blocked or flex."""
    impl = _setting["impl"]
    if impl not in IMPLS:
        raise ValueError(f"KITITANS_TITANS_ATTENTION={impl!r} is not one of {', '.join(IMPLS)}")
    if impl == "masked":
        return "masked"
    if impl in ("auto", "flex") and device.type == "cuda" and flex_available(device):
        return "flex"
    if impl == "flex" and not _flex.get("told"):
        _flex["told"] = True
        _log.warning(
            "FlexAttention trains only on CUDA (here: %s); Titans uses the blocked attention", device
        )
    return "blocked"


def _heads(x: Tensor, n_heads: int) -> Tensor:
    """(..., S, H*hd) -> (..., H, S, hd)."""
    *lead, S, D = x.shape
    return x.view(*lead, S, n_heads, D // n_heads).transpose(-2, -3)


def _rows(y: Tensor) -> Tensor:
    """(..., H, S, hd) -> (..., S, H*hd)."""
    *lead, H, S, hd = y.shape
    return y.transpose(-2, -3).reshape(*lead, S, H * hd)


def local_attention(
    q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, n_heads: int, window: int, kind: str
) -> Tensor:
    """Attention of a whole sequence (module docstring): q, k, v (B,T,D), pk, pv (B,n_p,D) -> (B,T,D)."""
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; valid: {', '.join(KINDS)}")
    impl = resolve_impl(q.device)
    if impl == "masked":
        return masked_attention(q, k, v, pk, pv, n_heads, window, kind)
    if (
        kind == "sliding" and window >= q.shape[1]
    ):  # a window as long as the sequence (a global layer): causal
        kind = "causal"
    if impl == "flex":
        return flex_local_attention(q, k, v, pk, pv, n_heads, window, kind)
    if kind == "sliding":
        return blocked_sliding(q, k, v, pk, pv, n_heads, window)
    if kind == "segment":
        return blocked_segments(q, k, v, pk, pv, n_heads, window)
    return causal_attention(q, k, v, pk, pv, n_heads)


# ----------------------------------------------------------------------------- the reference


def allowed(kind: str, T: int, window: int, device: torch.device) -> Tensor:
    """The reference mask over the tokens (T, T), True = may attend."""
    i = torch.arange(T, device=device)
    rel = i[:, None] - i[None, :]
    if kind == "sliding":
        return (rel >= 0) & (rel < window)
    if kind == "segment":
        return (rel >= 0) & (i[:, None] // window == i[None, :] // window)
    return rel >= 0


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, n_heads: int, window: int, kind: str
) -> Tensor:
    """The reference: [persistent ; tokens] under a dense (T, n_p + T) mask."""
    T, n = q.shape[1], pk.shape[1]
    ones = torch.ones(T, n, dtype=torch.bool, device=q.device)
    mask = torch.cat([ones, allowed(kind, T, window, q.device)], -1)
    y = F.scaled_dot_product_attention(
        _heads(q, n_heads), _heads(torch.cat([pk, k], 1), n_heads), _heads(torch.cat([pv, v], 1), n_heads),
        attn_mask=mask,
    )  # fmt: skip
    return _rows(y)


# ----------------------------------------------------------------------------- blocked (any device)


def block_size(window: int, T: int) -> int:
    """Query rows per block of the sliding path: a quarter window (measured fastest on CPU at window 512,
    T 2048), at least 16, at most the sequence."""
    return max(1, min(T, max(16, window // 4)))


def _cached(key: tuple, make: Callable[[], Tensor]) -> Tensor:
    if key not in _masks:
        if len(_masks) > 64:  # shapes come and go (eval lengths); keep the cache small
            _masks.clear()
        _masks[key] = make()
    return _masks[key]


def _band_mask(nb: int, blk: int, window: int, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(nb, 1, blk, n + window + blk) additive mask of the sliding blocks: block j's query r (position
    j*blk + r) over [persistent ; key c at position j*blk - window + c]: allowed when 0 <= r + window - c <
    window and the key's position is >= 0."""

    def make() -> Tensor:
        r = torch.arange(blk, device=device)[:, None]
        c = torch.arange(window + blk, device=device)[None, :]
        d = r + window - c
        band = (d >= 0) & (d < window)  # (blk, window + blk)
        start = torch.arange(nb, device=device)[:, None, None] * blk - window
        ok = band[None] & (start + c[None] >= 0)  # (nb, blk, window + blk)
        ok = torch.cat([torch.ones(nb, blk, n, dtype=torch.bool, device=device), ok], -1)
        return torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill(~ok, float("-inf"))[:, None]

    return _cached(("band", nb, blk, window, n, device, dtype), make)


def blocked_sliding(
    q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, n_heads: int, window: int
) -> Tensor:
    """Sliding-window attention by query blocks: (B,T,D) -> (B,T,D), O(T (window + block))."""
    B, T, D = q.shape
    n, H, hd = pk.shape[1], n_heads, D // n_heads
    blk = block_size(window, T)
    nb = math.ceil(T / blk)
    pad = nb * blk - T
    span = window + blk

    def gather(x: Tensor, p: Tensor) -> Tensor:  # (B,T,D) -> (B*nb, H, n + span, hd)
        rows = F.pad(x, (0, 0, window, pad)).unfold(1, span, blk)  # (B, nb, D, span), a view
        rows = rows.view(B, nb, H, hd, span).transpose(-1, -2)  # (B, nb, H, span, hd)
        pre = p.view(B, 1, n, H, hd).permute(0, 1, 3, 2, 4).expand(B, nb, H, n, hd)
        return torch.cat([pre, rows], 3).view(B * nb, H, n + span, hd)

    qb = F.pad(q, (0, 0, 0, pad)).view(B, nb, blk, H, hd).transpose(2, 3).reshape(B * nb, H, blk, hd)
    mask = _band_mask(nb, blk, window, n, q.device, q.dtype)  # (nb, 1, blk, n + span)
    mask = mask.unsqueeze(0).expand(B, -1, -1, -1, -1).reshape(B * nb, 1, blk, n + span)
    y = F.scaled_dot_product_attention(qb, gather(k, pk), gather(v, pv), attn_mask=mask)
    return y.view(B, nb, H, blk, hd).transpose(2, 3).reshape(B, nb * blk, D)[:, :T]


def _prefix_causal_mask(L: int, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(L, n + L) additive: every query sees the n persistent rows, then causal."""

    def make() -> Tensor:
        ok = torch.ones(L, n + L, dtype=torch.bool, device=device)
        ok[:, n:] = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        return torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill(~ok, float("-inf"))

    return _cached(("prefix_causal", L, n, device, dtype), make)


def blocked_segments(
    q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, n_heads: int, segment: int
) -> Tensor:
    """Segment attention with the segments as batch rows: (B,T,D) -> (B,T,D), O(T * segment)."""
    B, T, D = q.shape
    n, H, hd = pk.shape[1], n_heads, D // n_heads
    S = min(segment, T)
    ns = math.ceil(T / S)
    pad = ns * S - T  # a trailing part-segment: padded rows are in every real query's future

    def seg(x: Tensor, p: Tensor | None) -> Tensor:  # (B,T,D) -> (B*ns, H, [n +] S, hd)
        rows = F.pad(x, (0, 0, 0, pad)).view(B, ns, S, H, hd).transpose(2, 3)
        if p is None:
            return rows.reshape(B * ns, H, S, hd)
        pre = p.view(B, 1, n, H, hd).permute(0, 1, 3, 2, 4).expand(B, ns, H, n, hd)
        return torch.cat([pre, rows], 3).view(B * ns, H, n + S, hd)

    mask = _prefix_causal_mask(S, n, q.device, q.dtype)
    y = F.scaled_dot_product_attention(seg(q, None), seg(k, pk), seg(v, pv), attn_mask=mask)
    return y.view(B, ns, H, S, hd).transpose(2, 3).reshape(B, ns * S, D)[:, :T]


def causal_attention(q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, n_heads: int) -> Tensor:
    """Full causal attention with a persistent prefix through SDPA's causal kernel: n_p zero queries in front
    align its top-left causal rule (query i sees keys 0..i) with [persistent ; tokens]."""
    n = pk.shape[1]
    qq = F.pad(q, (0, 0, n, 0)) if n else q
    y = F.scaled_dot_product_attention(
        _heads(qq, n_heads), _heads(torch.cat([pk, k], 1), n_heads), _heads(torch.cat([pv, v], 1), n_heads),
        is_causal=True,
    )  # fmt: skip
    return _rows(y)[:, n:]


def segment_h_attention(
    q: Tensor, k: Tensor, v: Tensor, hk: Tensor, hv: Tensor, pk: Tensor, pv: Tensor, n_heads: int
) -> Tensor:
    """MAC's memory layers, one segment: queries (B,L,D) over [persistent ; h rows ; tokens], causal over the h
    rows and over the tokens -> (B,L,D). The (L, n + 2L) mask is per segment (not per sequence), cached."""
    L, n = q.shape[1], pk.shape[1]
    if resolve_impl(q.device) == "flex":
        return flex_segment_h(q, k, v, hk, hv, pk, pv, n_heads)

    def make() -> Tensor:
        causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        ones = torch.ones(L, n, dtype=torch.bool, device=q.device)
        return torch.cat([ones, causal, causal], dim=-1)

    mask = _cached(("segment_h", L, n, q.device), make)
    y = F.scaled_dot_product_attention(
        _heads(q, n_heads), _heads(torch.cat([pk, hk, k], 1), n_heads),
        _heads(torch.cat([pv, hv, v], 1), n_heads), attn_mask=mask,
    )  # fmt: skip
    return _rows(y)


# ----------------------------------------------------------------------------- FlexAttention (CUDA)


def mask_mod(kind: str, window: int, n: int, L: int = 0) -> Callable:
    """FlexAttention's mask_mod over keys [persistent (n) ; tokens] (segment_h: [persistent ; h (L) ; tokens
    (L)] of one segment)."""

    def sliding(b, h, qi, kv):
        j = kv - n
        return (kv < n) | ((qi >= j) & (qi - j < window))

    def segment(b, h, qi, kv):
        j = kv - n
        return (kv < n) | ((qi >= j) & (qi // window == j // window))

    def causal(b, h, qi, kv):
        return (kv < n) | (qi >= kv - n)

    def segment_h(b, h, qi, kv):
        j = torch.remainder(kv - n, L)
        return (kv < n) | (qi >= j)

    return {"sliding": sliding, "segment": segment, "causal": causal, "segment_h": segment_h}[kind]


def _flex_fn() -> Callable:
    if _flex["fn"] is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex["fn"] = torch.compile(flex_attention, dynamic=False)
    return _flex["fn"]


@torch.compiler.disable  # made eagerly and cached, also when first met inside a compiled forward
def _block_mask(kind: str, window: int, n: int, T: int, S: int, device: torch.device, L: int = 0):
    key = (kind, window, n, T, S, L, str(device))
    if key not in _flex["block_masks"]:
        from torch.nn.attention.flex_attention import create_block_mask

        _flex["block_masks"][key] = create_block_mask(
            mask_mod(kind, window, n, L), None, None, T, S, device=device
        )
    return _flex["block_masks"][key]


def flex_rows(
    q: Tensor, k: Tensor, v: Tensor, n_heads: int, kind: str, window: int, n: int, L: int = 0,
    compiled: bool = True,
) -> Tensor:  # fmt: skip
    """FlexAttention on rows: q (B,T,D) over k, v (B,S,D) (S = the persistent rows + the rest) -> (B,T,D)."""
    T, S = q.shape[1], k.shape[1]
    bm = _block_mask(kind, window, n, T, S, q.device, L)
    if compiled and not torch.compiler.is_compiling():
        fn = _flex_fn()
    else:  # inside a compiled model its compiler fuses flex_attention itself
        from torch.nn.attention.flex_attention import flex_attention as fn
    return _rows(fn(_heads(q, n_heads), _heads(k, n_heads), _heads(v, n_heads), block_mask=bm))


def flex_local_attention(
    q: Tensor, k: Tensor, v: Tensor, pk: Tensor, pv: Tensor, n_heads: int, window: int, kind: str
) -> Tensor:
    return flex_rows(q, torch.cat([pk, k], 1), torch.cat([pv, v], 1), n_heads, kind, window, pk.shape[1])


def flex_segment_h(
    q: Tensor, k: Tensor, v: Tensor, hk: Tensor, hv: Tensor, pk: Tensor, pv: Tensor, n_heads: int
) -> Tensor:
    L = q.shape[1]
    keys, values = torch.cat([pk, hk, k], 1), torch.cat([pv, hv, v], 1)
    return flex_rows(q, keys, values, n_heads, "segment_h", L, pk.shape[1], L)


@torch.compiler.disable  # a probe runs eagerly, also when first met inside a compiled forward
def flex_available(device: torch.device) -> bool:
    """Whether FlexAttention trains here: a small compiled forward and backward on `device`, once per
    process and device. A failure (no Triton, no compiler, an old GPU, ...) logs one line and returns False."""
    key = str(device)
    if key not in _flex["ok"]:
        if device.type != "cuda":  # torch 2.13: no FlexAttention backward on CPU or MPS
            _flex["ok"][key] = False
            return False
        try:
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(1, 256, 128, device=device, generator=g, requires_grad=True)
            p = torch.randn(1, 4, 128, device=device, generator=g)
            y = flex_local_attention(x, x, x, p, p, 2, 64, "sliding")
            ref = blocked_sliding(x, x, x, p, p, 2, 64)
            y.sum().backward()
            err = (y - ref).abs().max().item()
            if not err < 1e-3:
                raise RuntimeError(f"its output differs from the blocked attention by {err:.3g}")
            _flex["ok"][key] = True
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            _log.warning(
                "FlexAttention is unavailable on %s (%s); Titans attention uses the blocked windowed path",
                key, reason,
            )  # fmt: skip
            _flex["ok"][key] = False
    return _flex["ok"][key]
