"""Lite's multi-sequence decode step: one new token for each of B sequences, each at its own position and
with its own KV cache, in one pass through the layers (the server's continuous batching).

Batch-invariant by construction, so a sequence decoded among others gets the very logits it gets alone
(bit for bit, fp32 on CPU), and a seeded request answers what `kititans generate` answers:
- every matmul runs as a batched matmul of B (1 x D) rows (`torch.bmm` over the expanded weight): each row
  goes through the same one-row kernel as a lone decode, where one (B x D) GEMM would pick another kernel
  and reduction order (measured: up to 6e-5 apart at B = 8);
- attention runs per sequence, over its own cache, through the same `attention()` call as a lone decode;
- norms, RoPE, SiLU and the residual adds are row-wise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kititans.models.layers import apply_rope, attention


def _rows(x: Tensor, weight: Tensor) -> Tensor:
    """x (B, 1, D) @ weight.T (N, D) as B one-row matmuls -> (B, 1, N)."""
    B = x.shape[0]
    return torch.bmm(x, weight.t().unsqueeze(0).expand(B, -1, -1))


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
    pos_t = torch.tensor(list(positions), dtype=torch.long, device=dev)
    cos, sin = model.rope_cos[pos_t][:, None, None], model.rope_sin[pos_t][:, None, None]  # (B,1,1,hd)
    x = model.model.embed_tokens(torch.tensor([[int(t)] for t in ids], dtype=torch.long, device=dev))
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        qkv = _rows(h, _qkv_weight(attn)).view(B, 1, H + 2 * Hkv, hd).transpose(1, 2)  # (B, H+2Hkv, 1, hd)
        qk = apply_rope(qkv[:, : H + Hkv], cos, sin)
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv :]
        ys = []
        for b, (cache, pos) in enumerate(zip(caches, positions)):
            kb, vb = cache.k[i], cache.v[i]  # (1, Hkv, max_len, hd)
            kb[:1, :, pos : pos + 1] = k[b : b + 1]
            vb[:1, :, pos : pos + 1] = v[b : b + 1]
            ys.append(attention(q[b : b + 1], kb[:1, :, : pos + 1], vb[:1, :, : pos + 1], past=pos))
        y = torch.cat(ys).transpose(1, 2).reshape(B, 1, H * hd)
        x = x + _rows(y, attn.o_proj.weight)
        h = layer.post_attention_layernorm(x)
        mlp = layer.mlp
        if mlp.gate_up_weight is not None:
            gate, up = _rows(h, mlp.gate_up_weight).chunk(2, dim=-1)
        else:
            gate, up = _rows(h, mlp.gate_proj.weight), _rows(h, mlp.up_proj.weight)
        x = x + _rows(F.silu(gate) * up, mlp.down_proj.weight)
    for cache in caches:
        cache.pos += 1
    return _rows(model.model.norm(x), model.lm_head.weight)[:, 0]  # (B, V)
