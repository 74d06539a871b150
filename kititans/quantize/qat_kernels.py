"""Quantize -> dequantize in PyTorch, written to give the exact float32 values each exporter's own quantizer
stores, so a fine-tune that sees these values sees what the device will run (docs/qat.md):

    q8_0, q4_0        gguf-py's numpy quantizers (byte-identical to llama.cpp's, research §5.1): fp16 scale
                      d = absmax/127 (q8_0, rounded half away from zero) or d = (signed extreme)/-8 (q4_0,
                      q = trunc(x/d + 8.5) clamped to 0..15), blocks of 32 along each row
    q4_k, q6_k        llama.cpp's reference K-quants (quantize_row_q4_K_ref / q6_K_ref): super-blocks of 256,
                      per sub-block scales (and mins) found by a weighted least-squares search, stored as 6-bit
                      (q4_k) or int8 (q6_k) multiples of one fp16 scale per super-block
    mlas              onnxruntime's MatMulNBits quantizer (MLAS, symmetric): per block of 32 along K one fp32
                      scale s = (signed extreme)/-2^(bits-1), q = roundf(x*(1/s) + 2^(bits-1)) clamped, value
                      (q - 2^(bits-1)) * s
    coreml            coremltools' linear_symmetric on the fp16 weights: scale = 2*absmax/(2*qmax) in fp16,
                      q = round-half-even(w/scale) clamped to +-qmax, value fp16(q * scale)

Every function takes a float32 (rows, cols) tensor and returns the values the format stores, as float32.
Rows are output channels (nn.Linear / nn.Embedding weights), blocks run along a row, so concatenating or
permuting rows (fused q/k/v, llama.cpp's RoPE permutation) never changes a row's result.
K-quant search sums run element by element in llama.cpp's order, so the float32 rounding is the same.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

QK = 32  # q8_0 / q4_0 block
QK_K = 256  # K-quant super-block
GROUP_MAX_EPS = 1e-15


def _blocks(w: Tensor, size: int) -> Tensor:
    rows, cols = w.shape
    if cols % size:
        raise ValueError(f"row length {cols} is not a multiple of the block size {size}")
    return w.reshape(rows, cols // size, size)


def _fp16(x: Tensor) -> Tensor:
    """Round float32 to the nearest fp16 and back (what GGML_FP32_TO_FP16 then _FP16_TO_FP32 give)."""
    return x.to(torch.float16).to(torch.float32)


def _roundf(x: Tensor) -> Tensor:
    """C roundf: half away from zero (gguf-py's np_roundf, MLAS std::roundf)."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def _signed_extreme(b: Tensor) -> Tensor:
    """The value of largest magnitude in each block (the first one on ties, like argmax), sign kept."""
    idx = b.abs().argmax(dim=-1, keepdim=True)
    return torch.gather(b, -1, idx)


# ------------------------------------------------------------------------------------------ gguf-py


def q8_0(w: Tensor) -> Tensor:
    b = _blocks(w.float(), QK)
    d = b.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _roundf(b * inv)
    return (q * _fp16(d)).reshape(w.shape)


def q4_0(w: Tensor) -> Tensor:
    b = _blocks(w.float(), QK)
    d = _signed_extreme(b) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(b * inv + 8.5).clamp(0, 15)  # gguf-py casts to uint8 and clips at 15
    return (_fp16(d) * (q - 8)).reshape(w.shape)


# ------------------------------------------------------------------------------------------ K-quants


def _seq_sum(terms: Tensor) -> Tensor:
    """terms[0] + terms[1] + ... over the leading axis, left to right (a C loop's float32 accumulation)."""
    acc = terms[0].clone()
    for i in range(1, terms.shape[0]):
        acc += terms[i]
    return acc


def _make_qkx2(
    x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[Tensor, Tensor]:
    """llama.cpp's make_qkx2_quants for every sub-block at once: x, w (n, M) element-major -> (scale, -min)
    (M,). Elementwise steps run on the whole tensor; only the sums keep the C loop's order."""
    lo = x.amin(0).clamp(max=0.0)
    hi = x.amax(0)
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    flat = hi == lo
    one = torch.ones_like(hi)

    def error(sc: Tensor, m: Tensor, ls: Tensor) -> Tensor:
        diff = sc * ls + m - x
        return _seq_sum(w * (diff * diff))

    iscale = nmax / torch.where(flat, one, hi - lo)
    scale = 1 / iscale
    mn = lo
    best = error(scale, mn, torch.round(iscale * (x - mn)).clamp(0, nmax))
    for step in range(nstep + 1):
        span = torch.where(flat, one, hi - mn)  # C divides by (max - min) with min as updated
        isc = (_f32(rmin) + _f32(rdelta) * step + nmax) / span  # float32 like the C expression
        ls = torch.round(isc * (x - mn)).clamp(0, nmax)
        wl = w * ls
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * ls), _seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = torch.where(ok, det, one)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 == 0, one, sum_l2), this_scale)
        better = ok & (error(this_scale, this_min, ls) < best)
        best = torch.where(better, error(this_scale, this_min, ls), best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -torch.where(flat, lo, mn)


def _element_major(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """(..., n) -> (n, M) contiguous, so each element of every sub-block is one contiguous slice."""
    return x.reshape(-1, x.shape[-1]).t().contiguous(), x.shape[:-1]


def q4_k_parts(w: Tensor) -> dict[str, Tensor]:
    """What a Q4_K row stores: d, dmin (rows, S) fp16 values; ls, lm (rows, S, 8) 6-bit; q (rows, S, 8, 32)."""
    x = _blocks(w.float(), QK_K).reshape(w.shape[0], -1, 8, 32)  # (rows, supers, sub, 32)
    xe, lead = _element_major(x)
    av_x = torch.sqrt(_seq_sum(xe * xe) / 32)
    scales, mins = _make_qkx2(xe, av_x + xe.abs(), 15, -1.0, 0.1, 20)
    scales, mins = scales.reshape(lead), mins.reshape(lead)  # (rows, supers, 8)
    max_scale = scales.amax(-1).clamp(min=0.0)
    max_min = mins.amax(-1).clamp(min=0.0)
    inv_scale = torch.where(max_scale > 0, 63.0 / torch.where(max_scale > 0, max_scale, 1.0), 0.0)
    inv_min = torch.where(max_min > 0, 63.0 / torch.where(max_min > 0, max_min, 1.0), 0.0)
    ls = torch.round(inv_scale.unsqueeze(-1) * scales)
    ls = torch.where(ls < 0, 63.0, ls.clamp(max=63))  # C stores it in a uint8: a negative one wraps past 63
    lm = torch.round(inv_min.unsqueeze(-1) * mins).clamp(max=63)
    d, dmin = _fp16(max_scale / 63.0), _fp16(max_min / 63.0)
    sd, sm = d.unsqueeze(-1) * ls, dmin.unsqueeze(-1) * lm  # (rows, supers, 8)
    safe = torch.where(sd == 0, torch.ones_like(sd), sd).unsqueeze(-1)
    q = torch.round((x + sm.unsqueeze(-1)) / safe).clamp(0, 15)
    q = torch.where((sd == 0).unsqueeze(-1), torch.zeros_like(q), q)  # d*q is 0 whatever q is
    return {"d": d, "dmin": dmin, "ls": ls, "lm": lm, "q": q}


def q4_k(w: Tensor) -> Tensor:
    """llama.cpp's Q4_K: x = d*sc*q - dmin*m, q in 0..15, sc/m 6-bit per 32 weights, d/dmin fp16 per 256."""
    return q4_k_values(q4_k_parts(w), w.shape)


def q4_k_values(p: dict[str, Tensor], shape: torch.Size) -> Tensor:
    sd = (p["d"].unsqueeze(-1) * p["ls"]).unsqueeze(-1)
    sm = (p["dmin"].unsqueeze(-1) * p["lm"]).unsqueeze(-1)
    return (sd * p["q"] - sm).reshape(shape)


def q4_k_requant(w: Tensor, p: dict[str, Tensor]) -> Tensor:
    """Q4_K values of w with the scales and mins of an earlier q4_k_parts (the costly search skipped)."""
    x = _blocks(w.float(), QK_K).reshape(w.shape[0], -1, 8, 32)
    sd = p["d"].unsqueeze(-1) * p["ls"]
    sm = (p["dmin"].unsqueeze(-1) * p["lm"]).unsqueeze(-1)
    q = torch.round((x + sm) / torch.where(sd == 0, torch.ones_like(sd), sd).unsqueeze(-1)).clamp(0, 15)
    return (sd.unsqueeze(-1) * q - sm).reshape(w.shape)


def _make_qx(x: Tensor, nmax: int) -> Tensor:
    """llama.cpp's make_qx_quants(rmse_type=1, no importance) for every sub-block: x (n, M) -> scale (M,)."""
    mx = torch.gather(x, 0, x.abs().argmax(0, keepdim=True)).squeeze(0)  # the first largest |x|, signed
    zero = x.abs().amax(0) < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x

    def sums(isc: Tensor) -> tuple[Tensor, Tensor]:
        ls = torch.round(isc * x).clamp(-nmax, nmax - 1)
        return _seq_sum(w * x * ls), _seq_sum(w * ls * ls)

    sumlx, suml2 = sums(-nmax / mx)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s]:
        sumlx, suml2 = sums(-(_f32(0.1) * step + nmax) / mx)  # C: -(nmax + 0.1f*is) / max
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new = sumlx / torch.where(suml2 > 0, suml2, 1.0)
        scale = torch.where(better, new, scale)
        best = torch.where(better, new * sumlx, best)
    return torch.where(zero, torch.zeros_like(scale), scale)


def _f32(v: float) -> Tensor:
    return torch.tensor(v, dtype=torch.float32)


def q6_k_parts(w: Tensor) -> dict[str, Tensor]:
    """What a Q6_K row stores: d (rows, S) fp16 values; sc (rows, S, 16) int8; q (rows, S, 16, 16) in -32..31."""
    x = _blocks(w.float(), QK_K).reshape(w.shape[0], -1, 16, 16)  # (rows, supers, sub, 16)
    xe, lead = _element_major(x)
    scales = _make_qx(xe, 32).reshape(lead)  # (rows, supers, 16)
    max_scale = _signed_extreme(scales).squeeze(-1)  # (rows, supers)
    empty = max_scale.abs() < GROUP_MAX_EPS
    iscale = -128.0 / torch.where(empty, torch.ones_like(max_scale), max_scale)
    d = torch.where(empty, torch.zeros_like(max_scale), _fp16(1 / iscale))
    sc = torch.where(empty.unsqueeze(-1), 0.0, torch.round(iscale.unsqueeze(-1) * scales).clamp(max=127))
    dd = d.unsqueeze(-1) * sc  # (rows, supers, 16)
    safe = torch.where(dd == 0, torch.ones_like(dd), dd).unsqueeze(-1)
    q = torch.round(x / safe).clamp(-32, 31)
    q = torch.where((dd == 0).unsqueeze(-1), torch.zeros_like(q), q)
    return {"d": d, "sc": sc, "q": q}


def q6_k(w: Tensor) -> Tensor:
    """llama.cpp's Q6_K: x = d*sc*q, q in -32..31, sc int8 per 16 weights, d fp16 per 256."""
    return q6_k_values(q6_k_parts(w), w.shape)


def q6_k_values(p: dict[str, Tensor], shape: torch.Size) -> Tensor:
    return ((p["d"].unsqueeze(-1) * p["sc"]).unsqueeze(-1) * p["q"]).reshape(shape)


def q6_k_requant(w: Tensor, p: dict[str, Tensor]) -> Tensor:
    """Q6_K values of w with the scales of an earlier q6_k_parts (the costly search skipped)."""
    x = _blocks(w.float(), QK_K).reshape(w.shape[0], -1, 16, 16)
    dd = p["d"].unsqueeze(-1) * p["sc"]
    q = torch.round(x / torch.where(dd == 0, torch.ones_like(dd), dd).unsqueeze(-1)).clamp(-32, 31)
    return (dd.unsqueeze(-1) * q).reshape(w.shape)


# ------------------------------------------------------------------------------------------ onnxruntime


def mlas(w: Tensor, bits: int = 4, block: int = 32) -> Tensor:
    """MatMulNBits' symmetric block quantizer; w is the torch (out, in) weight, blocks run along `in` (K).
    A partial last block is padded with zeros, as the quantizer pads K."""
    rows, cols = w.shape
    pad = -cols % block
    x = torch.nn.functional.pad(w.float(), (0, pad)) if pad else w.float()
    b = _blocks(x, block)
    mid = 1 << (bits - 1)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    s = torch.where(hi.abs() > lo.abs(), hi, lo) / -mid  # MLAS range2scale: the min on a tie
    inv = torch.where(s == 0, torch.zeros_like(s), 1 / s)
    q = _roundf(b * inv + mid).clamp(0, 2 * mid - 1)  # MLAS adds the zero point before rounding, in fp32
    return ((q - mid) * s).reshape(rows, cols + pad)[:, :cols]


# ------------------------------------------------------------------------------------------ coremltools


def coreml(w: Tensor, bits: int, block: int | None, dtype: torch.dtype = torch.float16) -> Tensor:
    """linear_symmetric on the weight as the converted model stores it (fp16, or fp32 for an op kept in fp32):
    per block of `block` inputs (None: one scale per output row), arithmetic in that dtype as numpy does it."""
    w16 = w.to(dtype)
    b = _blocks(w16, block) if block else w16.unsqueeze(1)
    qmax = (1 << (bits - 1)) - 1
    absmax = b.abs().amax(-1, keepdim=True)
    scale = (absmax - (-absmax)) / (2 * qmax)  # fp16 arithmetic, as numpy does on the fp16 consts
    q = torch.round(b / scale).clamp(-qmax, qmax)  # an all-zero block: 0/0 -> nan -> clamp -> nan
    q = torch.nan_to_num(q, nan=0.0)
    out = (q.float() * scale.float()).to(dtype)
    return out.reshape(w.shape).float()


# ------------------------------------------------------------------------------------------ K-quant bytes


def pack_q4_k(w: Tensor) -> np.ndarray:
    """The Q4_K bytes (rows, 144 per 256 weights) of q4_k(w), laid out as ggml's block_q4_K; gguf-py (and
    llama.cpp) dequantize them to exactly q4_k(w)."""
    p = q4_k_parts(w)
    rows, supers = p["d"].shape
    d = p["d"].numpy().astype(np.float16).view(np.uint8).reshape(rows, supers, 2)
    dmin = p["dmin"].numpy().astype(np.float16).view(np.uint8).reshape(rows, supers, 2)
    ls = p["ls"].numpy().astype(np.uint8)  # (rows, supers, 8)
    lm = p["lm"].numpy().astype(np.uint8)
    sc = np.zeros((rows, supers, 12), dtype=np.uint8)
    sc[..., 0:4] = ls[..., 0:4] | ((ls[..., 4:8] >> 4) << 6)
    sc[..., 4:8] = lm[..., 0:4] | ((lm[..., 4:8] >> 4) << 6)
    sc[..., 8:12] = (ls[..., 4:8] & 0xF) | ((lm[..., 4:8] & 0xF) << 4)
    q = p["q"].numpy().astype(np.uint8).reshape(rows, supers, 4, 2, 32)  # pairs of sub-blocks share bytes
    qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(rows, supers, 128)
    return np.concatenate([d, dmin, sc, qs], axis=-1).reshape(rows, supers * 144)


def pack_q6_k(w: Tensor) -> np.ndarray:
    """The Q6_K bytes (rows, 210 per 256 weights) of q6_k(w), laid out as ggml's block_q6_K."""
    p = q6_k_parts(w)
    rows, supers = p["d"].shape
    L = (
        (p["q"].numpy().astype(np.int16) + 32).astype(np.uint8).reshape(rows, supers, 2, 4, 32)
    )  # halves of 128
    ql = np.concatenate(
        [L[..., 0, :] & 0xF | ((L[..., 2, :] & 0xF) << 4), L[..., 1, :] & 0xF | ((L[..., 3, :] & 0xF) << 4)],
        axis=-1,
    )
    qh = (
        (L[..., 0, :] >> 4)
        | ((L[..., 1, :] >> 4) << 2)
        | ((L[..., 2, :] >> 4) << 4)
        | ((L[..., 3, :] >> 4) << 6)
    )
    sc = p["sc"].numpy().astype(np.int8).view(np.uint8)  # (rows, supers, 16)
    d = p["d"].numpy().astype(np.float16).view(np.uint8).reshape(rows, supers, 2)
    out = [ql.reshape(rows, supers, 128), qh.reshape(rows, supers, 64), sc, d]
    return np.concatenate(out, axis=-1).reshape(rows, supers * 210)
