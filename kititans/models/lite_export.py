"""Export wrappers for Lite, pure torch: what the ONNX and CoreML exporters trace.

A family plugs into the exporters through `FamilySpec.formats["onnx"]` / `["coreml"]`: a class that takes
the loaded model and returns an `nn.Module` to trace, and that describes its interface as data (the
attributes below). The exporters read only that description, never a family's name, so Titans supplies
its own wrappers (memory as explicit state) without touching them.

ONNX step wrapper (functional cache, optimum / onnxruntime-genai names):
    forward(input_ids (B,T) int64, attention_mask (B,P+T) int64, position_ids (B,T) int64, *past)
        -> (logits (B,T,V), *present)
    input_names, output_names      graph names, in forward order
    states: list[StateSpec]        past input -> present output, its shape (str = symbolic dim) and the axis
                                   it grows along (a KV cache grows along the sequence; None = fixed size)
    dynamic_shapes()               for torch.onnx.export(dynamo=True)
    example_inputs(batch, seq, past)
    context_length                 the largest position the graph can take (RoPE table rows)

CoreML step wrapper (static cache as registered buffers, which coremltools turns into MLState):
    forward(input_ids (1,T) int32, causal_mask (1,1,T,end) float) -> logits (1,T,V)
    input_names, output_names, state_names, max_len, example_inputs(seq, end)
The position of the T new tokens is end-T..end-1, read from the mask shape (Apple's pattern), so one
graph serves prefill and decode and no position input is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kititans.models.layers import apply_rope


@dataclass(frozen=True)
class StateSpec:
    """One recurrent tensor of an exported step: fed as `input`, returned updated as `output`."""

    input: str
    output: str
    shape: tuple[int | str, ...]  # str entries are symbolic dims ("batch", "past")
    grow_axis: int | None = None  # KV caches grow along the sequence axis; None = fixed size (memory)
    dtype: str = "float32"


def _expand_kv(x: Tensor, rep: int) -> Tensor:
    """(B, Hkv, S, hd) -> (B, Hkv*rep, S, hd), each kv head repeated for its group of query heads."""
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def _attend(layer: nn.Module, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q (B,H,T,hd), k and v (B,Hkv,T,hd) of one Lite attention block, RoPE applied."""
    attn = layer.self_attn
    B, T, _ = h.shape
    q = attn.q_proj(h).view(B, T, attn.n_heads, attn.hd).transpose(1, 2)
    k = attn.k_proj(h).view(B, T, attn.n_kv, attn.hd).transpose(1, 2)
    v = attn.v_proj(h).view(B, T, attn.n_kv, attn.hd).transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class LiteOnnxStep(nn.Module):
    """One decoder step with the KV cache as explicit inputs/outputs (prefill and decode, same graph)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model  # shares the weights; nothing is copied
        cfg = model.config
        self.n_layers, self.n_kv, self.hd = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
        self.rep = cfg.n_heads // cfg.n_kv_heads
        self.context_length = cfg.context_length
        self.states = [
            StateSpec(
                f"past_key_values.{i}.{kind}",
                f"present.{i}.{kind}",
                ("batch", cfg.n_kv_heads, "past_sequence_length", cfg.head_dim),
                grow_axis=2,
            )
            for i in range(cfg.n_layers)
            for kind in ("key", "value")
        ]
        self.input_names = ["input_ids", "attention_mask", "position_ids", *(s.input for s in self.states)]
        self.output_names = ["logits", *(s.output for s in self.states)]

    def example_inputs(self, batch: int = 2, seq: int = 3, past: int = 4) -> tuple[Tensor, ...]:
        ids = torch.zeros(batch, seq, dtype=torch.long)
        mask = torch.ones(batch, past + seq, dtype=torch.long)
        pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
        p = self.model.lm_head.weight
        cache = [
            torch.zeros(batch, self.n_kv, past, self.hd, dtype=p.dtype) for _ in range(2 * self.n_layers)
        ]
        return (ids, mask, pos, *cache)

    def dynamic_shapes(self) -> tuple:
        # the *past varargs must be nested as one tuple (research §1.1)
        kv = {0: "batch", 2: "past_sequence_length"}
        return (
            {0: "batch", 1: "sequence_length"},
            {0: "batch", 1: "total_sequence_length"},
            {0: "batch", 1: "sequence_length"},
            tuple(dict(kv) for _ in range(2 * self.n_layers)),
        )

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, *past: Tensor
    ) -> tuple[Tensor, ...]:
        m = self.model
        T, P = input_ids.shape[1], past[0].shape[2]
        x = m.model.embed_tokens(input_ids)  # (B, T, D)
        cos = m.rope_cos[position_ids].unsqueeze(1).to(x.dtype)  # (B, 1, T, hd): gathered, so padding works
        sin = m.rope_sin[position_ids].unsqueeze(1).to(x.dtype)
        # explicit bottom-right causal + padding mask; is_causal would be wrong with a past
        q_pos = torch.arange(T, device=x.device) + P  # (T,)
        k_pos = torch.arange(P + T, device=x.device)  # (P+T,)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(~allowed, torch.finfo(x.dtype).min)  # (B, 1, T, P+T); finfo.min: no NaN rows
        present: list[Tensor] = []
        for i, layer in enumerate(m.model.layers):
            q, k, v = _attend(layer, layer.input_layernorm(x), cos, sin)
            k = torch.cat([past[2 * i], k], dim=2)  # (B, Hkv, P+T, hd)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            present += [k, v]
            y = F.scaled_dot_product_attention(
                q, _expand_kv(k, self.rep), _expand_kv(v, self.rep), attn_mask=bias
            )  # (B, H, T, hd)
            B = y.shape[0]
            x = x + layer.self_attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = m.lm_head(m.model.norm(x))  # (B, T, V)
        return (logits, *present)


class LiteCoreMLStep(nn.Module):
    """A stateful step for CoreML: K/V caches (L, 1, Hkv, max_len, hd) as buffers updated in place."""

    input_names = ("input_ids", "causal_mask")
    output_names = ("logits",)
    state_names = ("key_cache", "value_cache")

    def __init__(self, model: nn.Module, max_len: int | None = None):
        super().__init__()
        self.model = model
        cfg = model.config
        self.max_len = min(max_len or cfg.context_length, cfg.context_length)
        self.rep = cfg.n_heads // cfg.n_kv_heads
        shape = (cfg.n_layers, 1, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        dtype = model.lm_head.weight.dtype
        self.register_buffer("key_cache", torch.zeros(shape, dtype=dtype))
        self.register_buffer("value_cache", torch.zeros(shape, dtype=dtype))

    def reset(self) -> None:
        self.key_cache.zero_()
        self.value_cache.zero_()

    def example_inputs(self, seq: int = 1, end: int = 8) -> tuple[Tensor, Tensor]:
        ids = torch.zeros(1, seq, dtype=torch.int32)
        return ids, causal_mask(seq, end, self.key_cache.dtype)

    def forward(self, input_ids: Tensor, causal_mask: Tensor) -> Tensor:
        m = self.model
        T, end = input_ids.shape[1], causal_mask.shape[-1]
        start = end - T
        x = m.model.embed_tokens(input_ids)  # (1, T, D)
        cos, sin = m.rope_cos[start:end].to(x.dtype), m.rope_sin[start:end].to(x.dtype)  # (T, hd)
        mask = causal_mask.to(x.dtype)
        for i, layer in enumerate(m.model.layers):
            q, k, v = _attend(layer, layer.input_layernorm(x), cos, sin)
            # slice updates of the state: read_state -> slice_update -> coreml_update_state in MIL
            self.key_cache[i : i + 1, :, :, start:end] = k.unsqueeze(0).to(self.key_cache.dtype)
            self.value_cache[i : i + 1, :, :, start:end] = v.unsqueeze(0).to(self.value_cache.dtype)
            keys = self.key_cache[i, :, :, :end].to(x.dtype)  # (1, Hkv, end, hd)
            values = self.value_cache[i, :, :, :end].to(x.dtype)
            y = F.scaled_dot_product_attention(
                q, _expand_kv(keys, self.rep), _expand_kv(values, self.rep), attn_mask=mask
            )  # (1, H, T, hd)
            x = x + layer.self_attn.o_proj(y.transpose(1, 2).reshape(1, T, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return m.lm_head(m.model.norm(x))  # (1, T, V)


def causal_mask(seq: int, end: int, dtype: torch.dtype = torch.float16, fill: float = -1e4) -> Tensor:
    """The additive CoreML mask (1, 1, seq, end) for `seq` new tokens at positions end-seq..end-1.
    -1e4 rather than -inf: exp underflows to 0 in fp16 and no row can turn into NaN."""
    q_pos = torch.arange(end - seq, end)[:, None]
    allowed = torch.arange(end)[None, :] <= q_pos  # (seq, end)
    return torch.zeros(seq, end, dtype=dtype).masked_fill(~allowed, fill)[None, None]
