"""Titans' training FLOPs per token (FamilySpec.flops_per_token), for MFU.

Parameters: 6 per nn.Linear weight (the attention, FFN and memory projections, the head). The memory's
learned initial weights W_0 are parameters but act as state: their work is counted with the memory's below.
Attention: every query also sees the n_persistent learned slots; `mal`/`mag` attend a causal sliding window;
`mac` attends within segments of `window` tokens, memory layers over [persistent ; h ; segment] with h one row
per segment token (so twice the segment's causal keys; with mac_h_rows off once), the other layers over
[persistent ; segment] (mac_attention sliding: a window); global_layers attend causally over the whole context.
Memory, per memory layer and head (head dim d, hidden h = mem_hidden_mult x d), per token: a read is the
2-layer MLP, 2 matmuls of d x h (4dh FLOPs); the closed-form update of a token's key is its forward (4dh) and
the backward to both weight matrices and through the hidden layer (6dh); `mac` reads twice (h, and the output
gate on y) unless it reads no h (mac_h_rows and mac_h_residual off). Training differentiates through all of it: x3, as for parameters.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kititans.models.flops import attention_flops, causal_keys, linear_params


def titans_flops_per_token(model: nn.Module, cfg: Any, seq_len: int) -> float:
    attn = 0.0
    for i in range(cfg.n_layers):
        memory, mac = i in cfg.memory_set, cfg.block == "mac"
        if i in cfg.global_set:  # causal over the whole context
            keys = causal_keys(seq_len, cfg.context_length)
        elif mac and (memory or cfg.mac_attention == "segment"):  # causal within a segment of `window` tokens
            seg = causal_keys(min(seq_len, cfg.window))
            keys = 2 * seg if memory and cfg.mac_h_rows else seg  # h rows: one per segment token
        else:
            keys = causal_keys(seq_len, cfg.window)
        attn += attention_flops(1, cfg.dim, cfg.n_persistent + keys)
    mem_layers = len(cfg.memory_set)
    d = cfg.head_dim
    h = cfg.mem_hidden_mult * d
    reads = 2 if cfg.block == "mac" and (cfg.mac_h_rows or cfg.mac_h_residual) else 1
    memory = 3.0 * mem_layers * cfg.n_heads * (4 * reads + 10) * d * h
    return 6.0 * linear_params(model) + attn + memory
