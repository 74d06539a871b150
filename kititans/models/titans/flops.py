"""Titans' training FLOPs per token (FamilySpec.flops_per_token), for MFU.

Parameters: 6 per nn.Linear weight (the attention, FFN and memory projections, the head). The memory's
learned initial weights W_0 are parameters but act as state: their work is counted with the memory's below.
Attention: every query also sees the n_persistent learned slots; `mal`/`mag` attend a causal sliding window;
`mac` attends within segments of `window` tokens, memory layers over [persistent ; h ; segment] with h one row
per segment token (so twice the segment's causal keys), the other layers over [persistent ; segment].
Memory, per memory layer and head (head dim d, hidden h = mem_hidden_mult x d), per token: a read is the
2-layer MLP, 2 matmuls of d x h (4dh FLOPs); the closed-form update of a token's key is its forward (4dh) and
the backward to both weight matrices and through the hidden layer (6dh); `mac` reads twice (h, and the output
gate on y). Training differentiates through all of it: x3, as for parameters.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kititans.models.flops import attention_flops, causal_keys, linear_params


def titans_flops_per_token(model: nn.Module, cfg: Any, seq_len: int) -> float:
    mem_layers = len(cfg.memory_set)
    plain_layers = cfg.n_layers - mem_layers
    if cfg.block == "mac":  # segment attention: causal within a segment of `window` tokens
        seg = causal_keys(min(seq_len, cfg.window))
        attn = attention_flops(mem_layers, cfg.dim, cfg.n_persistent + 2 * seg)
        attn += attention_flops(plain_layers, cfg.dim, cfg.n_persistent + seg)
    else:
        keys = cfg.n_persistent + causal_keys(seq_len, cfg.window)
        attn = attention_flops(cfg.n_layers, cfg.dim, keys)
    d = cfg.head_dim
    h = cfg.mem_hidden_mult * d
    reads = 2 if cfg.block == "mac" else 1
    memory = 3.0 * mem_layers * cfg.n_heads * (4 * reads + 10) * d * h
    return 6.0 * linear_params(model) + attn + memory
