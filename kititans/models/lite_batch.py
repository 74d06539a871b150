"""Lite's multi-sequence decode step: one new token for each of B sequences, each at its own position and
with its own KV cache, in one pass through the layers (the server's continuous batching).

Batch-invariant, so a sequence decoded among others gets the very logits it gets alone (bit for bit, fp32
on CPU), and a seeded request answers what `kititans generate` answers (the torch runtime decodes single
tokens through this same function, B = 1):
- a BLAS picks its GEMM kernel by the number of rows M (MKL here: one kernel for M = 1, another for 2-3,
  another for M >= 4; rows 6e-5 apart between them), and with several threads the rows of a partial tile
  can take another path. So the rows are padded to a multiple of 4 and one GEMM runs (the weights are read
  once for the whole batch), after a probe on this model's own weight shapes shows that a row's result does
  not depend on M or on where it sits; where the probe fails, every row runs as its own one-row matmul
  (`torch.bmm` over the expanded weight: always the one-row kernel, the weights read once per row);
- attention runs per sequence, over its own cache, through the same `attention()` call as a lone decode;
- norms, RoPE, SiLU and the residual adds are row-wise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kititans.models.layers import apply_rope, attention

PAD = 4  # rows are padded to a multiple of this for the batch GEMM


def _padded(x: Tensor, weight: Tensor) -> Tensor:
    """x (B, 1, D) @ weight.T with the rows padded to a multiple of PAD: one GEMM -> (B, 1, N)."""
    B = x.shape[0]
    rows = x.reshape(B, -1)
    if B % PAD:
        rows = torch.cat([rows, rows.new_zeros(PAD - B % PAD, rows.shape[1])])
    return F.linear(rows, weight)[:B].unsqueeze(1)


def _one_by_one(x: Tensor, weight: Tensor) -> Tensor:
    """x (B, 1, D) @ weight.T as B one-row matmuls -> (B, 1, N)."""
    return torch.bmm(x, weight.t().unsqueeze(0).expand(x.shape[0], -1, -1))


def _weights(model: torch.nn.Module) -> list[Tensor]:
    out = [model.lm_head.weight]
    for layer in model.model.layers:
        mlp = layer.mlp
        out += [_qkv_weight(layer.self_attn), layer.self_attn.o_proj.weight, mlp.down_proj.weight]
        out += (
            [mlp.gate_up_weight]
            if mlp.gate_up_weight is not None
            else [mlp.gate_proj.weight, mlp.up_proj.weight]
        )
    return out


def rows_are_independent(model: torch.nn.Module) -> bool:
    """Whether a padded GEMM gives every row the same result whatever the batch size and the row's place in
    it, for each of the model's weight shapes, with the current threads (checked bit for bit)."""
    g = torch.Generator().manual_seed(0)
    seen = set()
    for w in _weights(model):
        if tuple(w.shape) in seen:
            continue
        seen.add(tuple(w.shape))
        x = torch.randn(1, 1, w.shape[1], generator=g).to(w)
        ref = _padded(x, w)[0]
        for m in (PAD, 2 * PAD, 4 * PAD):
            for at in range(m):
                batch = torch.randn(m, 1, w.shape[1], generator=g).to(w)
                batch[at] = x[0]
                if not torch.equal(_padded(batch, w)[at], ref):
                    return False
    return True


def _rows(model: torch.nn.Module) -> Any:
    """The matmul decode_rows uses for this model (probed once, then kept on the model)."""
    if getattr(model, "_rows_padded", None) is None:
        with torch.inference_mode():
            model._rows_padded = rows_are_independent(model)
    return _padded if model._rows_padded else _one_by_one


def _qkv_weight(attn: torch.nn.Module) -> Tensor:
    if attn.qkv_weight is not None:
        return attn.qkv_weight
    return torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])


def decode_rows(
    model: torch.nn.Module, ids: Sequence[int], caches: Sequence, positions: Sequence[int]
) -> Tensor:
    """ids[i] at position positions[i] of the sequence whose KVCache (batch 1) is caches[i]; each cache
    gets its token's K/V and advances by one. Returns logits (B, V)."""
    cfg = model.config
    B, H, Hkv, hd = len(ids), cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    dev = model.lm_head.weight.device
    for cache, pos in zip(caches, positions):
        if pos + 1 > cache.max_len or cache.pos != pos:
            raise ValueError(
                f"a sequence at position {pos} cannot take a token (its cache holds {cache.pos})"
            )
    rows = _rows(model)
    pos_t = torch.tensor(list(positions), dtype=torch.long, device=dev)
    cos, sin = model.rope_cos[pos_t][:, None, None], model.rope_sin[pos_t][:, None, None]  # (B,1,1,hd)
    x = model.model.embed_tokens(torch.tensor([[int(t)] for t in ids], dtype=torch.long, device=dev))
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        qkv = rows(h, _qkv_weight(attn)).view(B, 1, H + 2 * Hkv, hd).transpose(1, 2)  # (B, H+2Hkv, 1, hd)
        qk = apply_rope(qkv[:, : H + Hkv], cos, sin)
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv :]
        ys = []
        for b, (cache, pos) in enumerate(zip(caches, positions)):
            kb, vb = cache.k[i], cache.v[i]  # (1, Hkv, max_len, hd)
            kb[:1, :, pos : pos + 1] = k[b : b + 1]
            vb[:1, :, pos : pos + 1] = v[b : b + 1]
            ys.append(attention(q[b : b + 1], kb[:1, :, : pos + 1], vb[:1, :, : pos + 1], past=pos))
        y = torch.cat(ys).transpose(1, 2).reshape(B, 1, H * hd)
        x = x + rows(y, attn.o_proj.weight)
        h = layer.post_attention_layernorm(x)
        mlp = layer.mlp
        if mlp.gate_up_weight is not None:
            gate, up = rows(h, mlp.gate_up_weight).chunk(2, dim=-1)
        else:
            gate, up = rows(h, mlp.gate_proj.weight), rows(h, mlp.up_proj.weight)
        x = x + rows(F.silu(gate) * up, mlp.down_proj.weight)
    for cache in caches:
        cache.pos += 1
    return rows(model.model.norm(x), model.lm_head.weight)[:, 0]  # (B, V)
