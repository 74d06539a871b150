"""Export wrappers for Lite, pure torch: what the ONNX and CoreML exporters trace.

A family plugs into the exporters through `FamilySpec.formats["onnx"]` / `["coreml"]`: a class that takes
the loaded model and returns an `nn.Module` to trace, and that describes its interface as data (the
attributes below). The exporters read only that description, never a family's name, so Titans supplies
its own wrappers (memory as explicit state) without touching them.

ONNX step wrapper (functional cache, optimum / onnxruntime-genai names), built as `cls(model, fused=...)`:
    forward(input_ids (B,T) int64, attention_mask (B,P+T) int64, position_ids (B,T) int64, *past)
        -> (logits (B,T,V), *present)
    input_names, output_names      graph names, in forward order
    states: list[StateSpec]        past input -> present output, its shape (str = symbolic dim) and the axis
                                   it grows along (a KV cache grows along the sequence; None = fixed size)
    dynamic_shapes()               for torch.onnx.export(dynamo=True)
    example_inputs(batch, seq, past)
    opset                          the ONNX opset the forward needs (23 when it uses torch.onnx.ops)
    context_length                 the largest position the graph can take (RoPE table rows)

CoreML step wrapper (static cache as registered buffers, which coremltools turns into MLState), built as
`cls(model, max_len=..., prefill_len=...)`:
    forward(input_ids (1,T) int32, causal_mask (1,1,T,end) float) -> logits (1,T,V)
    input_names, output_names, state_names, max_len, prefill_len, reset()
    input_dtypes, required_ops     numpy dtype per input; MIL ops every function must contain
    feeds(ids, start), check_plan() forward's inputs for tokens at start..; the calls the export check runs
    functions()                    {"decode": (example, dynamic_shapes), "prefill": (...)}: one torch.export
                                   each, merged into one multifunction package with shared weights
    keep_float                     parts of const names compression must leave in fp16 (RoPE, norms)
The position of the T new tokens is end-T..end-1, read from the mask shape (Apple's pattern), so no
position input is needed and the same forward serves prefill and decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

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
    """One decoder step with the KV cache as explicit inputs/outputs (prefill and decode, same graph).

    fused=True writes attention, RoPE and RMSNorm as the ONNX opset-23 ops (torch.onnx.ops: Attention with
    past_key/past_value, RotaryEmbedding, RMSNormalization) and packs q/k/v and gate/up into one MatMul each
    (one weight read, and one int8 quantization of the input under MatMulNBits accuracy level 4): about 14
    nodes a layer. fused=False decomposes them into opset-18 primitives for runtimes that lack opset 23.
    Both compute the same function.
    """

    def __init__(self, model: nn.Module, fused: bool = True):
        super().__init__()
        self.model = model  # shares the weights; only the packed projections below are new tensors
        self.fused = fused
        self.opset = 23 if fused else 18
        cfg = model.config
        self.n_layers, self.n_heads, self.n_kv, self.hd = (
            cfg.n_layers,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.head_dim,
        )
        self.rep = cfg.n_heads // cfg.n_kv_heads
        self.context_length = cfg.context_length
        self.states = [
            StateSpec(
                f"past_key_values.{i}.{kind}",
                f"present.{i}.{kind}",
                ("batch", cfg.n_kv_heads, "past_sequence_length", cfg.head_dim),
                grow_axis=2,
                dtype=str(model.lm_head.weight.dtype).removeprefix("torch."),
            )
            for i in range(cfg.n_layers)
            for kind in ("key", "value")
        ]
        self.input_names = ["input_ids", "attention_mask", "position_ids", *(s.input for s in self.states)]
        self.output_names = ["logits", *(s.output for s in self.states)]
        if fused:  # (H+2Hkv)*hd x D and 2F x D; the originals stay unused and are not exported
            pack = lambda *ws: nn.Parameter(torch.cat([w.detach() for w in ws]), requires_grad=False)  # noqa: E731
            layers = model.model.layers
            self.qkv = nn.ParameterList(
                pack(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
                for a in (ly.self_attn for ly in layers)
            )
            self.gate_up = nn.ParameterList(
                pack(ly.mlp.gate_proj.weight, ly.mlp.up_proj.weight) for ly in layers
            )

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
        # explicit bottom-right causal + padding mask; is_causal would be wrong with a past
        q_pos = torch.arange(T, device=x.device) + P  # (T,)
        k_pos = torch.arange(P + T, device=x.device)  # (P+T,)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
        attend = self._fused_attention if self.fused else self._plain_attention
        rope = self._rope_tables(position_ids, x.dtype)
        present: list[Tensor] = []
        for i, layer in enumerate(m.model.layers):
            y, k, v = attend(i, layer, layer.input_layernorm(x), rope, allowed, past[2 * i], past[2 * i + 1])
            present += [k, v]
            x = x + layer.self_attn.o_proj(y)
            h = layer.post_attention_layernorm(x)
            if self.fused:
                gate, up = F.linear(h, self.gate_up[i]).chunk(2, dim=-1)  # (B, T, F) each
                x = x + layer.mlp.down_proj(F.silu(gate) * up)
            else:
                x = x + layer.mlp(h)
        logits = m.lm_head(m.model.norm(x))  # (B, T, V)
        return (logits, *present)

    def _rope_tables(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, ...]:
        m = self.model
        if self.fused:  # RotaryEmbedding takes the half tables (ctx, hd/2) and gathers by position itself
            half = self.hd // 2
            return m.rope_cos[:, :half].to(dtype), m.rope_sin[:, :half].to(dtype), position_ids
        # gathered by position_ids, so left padding and past offsets work: (B, 1, T, hd)
        cos, sin = m.rope_cos[position_ids], m.rope_sin[position_ids]
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)

    def _fused_attention(
        self, i: int, layer: nn.Module, h: Tensor, rope: tuple, allowed: Tensor, pk: Tensor, pv: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """y (B,T,H*hd) and the grown caches (B,Hkv,P+T,hd) via RotaryEmbedding + Attention (opset 23)."""
        ops = torch.onnx.ops
        cos, sin, pos = rope
        qkv = F.linear(h, self.qkv[i])  # (B, T, (H + 2 Hkv) hd)
        q, k, v = qkv.split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], dim=-1)
        q = ops.rotary_embedding(q, cos, sin, pos, num_heads=self.n_heads)  # (B, T, H*hd)
        k = ops.rotary_embedding(k, cos, sin, pos, num_heads=self.n_kv)  # (B, T, Hkv*hd)
        y, k_all, v_all, _ = ops.attention(
            q, k, v, allowed, pk, pv, q_num_heads=self.n_heads, kv_num_heads=self.n_kv
        )
        return y, k_all, v_all

    def _plain_attention(
        self, i: int, layer: nn.Module, h: Tensor, rope: tuple, allowed: Tensor, pk: Tensor, pv: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The same with SDPA and an additive mask (opset 18)."""
        B, T, _ = h.shape
        q, k, v = _attend(layer, h, *rope)
        k = torch.cat([pk, k], dim=2)  # (B, Hkv, P+T, hd)
        v = torch.cat([pv, v], dim=2)
        bias = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device)
        bias = bias.masked_fill(~allowed, torch.finfo(h.dtype).min)  # finfo.min, not -inf: no NaN rows
        y = F.scaled_dot_product_attention(
            q, _expand_kv(k, self.rep), _expand_kv(v, self.rep), attn_mask=bias
        )
        return y.transpose(1, 2).reshape(B, T, -1), k, v


class LiteCoreMLStep(nn.Module):
    """A stateful step for CoreML: K/V caches (L, 1, Hkv, max_len+1, hd) as buffers updated in place."""

    input_names = ("input_ids", "causal_mask")
    output_names = ("logits",)
    input_dtypes: ClassVar[dict[str, str]] = {"input_ids": "int32", "causal_mask": "float16"}
    state_names = ("key_cache", "value_cache")
    required_ops = ("read_state", "write_state", "scaled_dot_product_attention")
    keep_float = ("rope_cos", "rope_sin", "norm")  # const-name parts that stay fp16 when compressing

    def __init__(self, model: nn.Module, max_len: int | None = None, prefill_len: int = 128):
        super().__init__()
        self.model = model
        cfg = model.config
        self.max_len = min(max_len or cfg.context_length, cfg.context_length)  # positions the cache holds
        self.prefill_len = max(2, min(prefill_len, self.max_len))
        self.rep = cfg.n_heads // cfg.n_kv_heads
        # one spare row: torch.export cannot slice a dynamic end up to the buffer's full size
        shape = (cfg.n_layers, 1, cfg.n_kv_heads, self.max_len + 1, cfg.head_dim)
        dtype = model.lm_head.weight.dtype
        self.register_buffer("key_cache", torch.zeros(shape, dtype=dtype))
        self.register_buffer("value_cache", torch.zeros(shape, dtype=dtype))

    def reset(self) -> None:
        self.key_cache.zero_()
        self.value_cache.zero_()

    def functions(self) -> dict[str, tuple[tuple[Tensor, Tensor], tuple]]:
        """Function name -> (example inputs, torch.export dynamic_shapes): decode takes one token, prefill
        1..prefill_len; both any end position 1..max_len (given by the mask's last dim)."""
        end = torch.export.Dim("end", min=1, max=self.max_len)
        seq = torch.export.Dim("seq", min=1, max=self.prefill_len)
        e = min(8, self.max_len)
        dtype = self.key_cache.dtype
        ids = lambda t: torch.zeros(1, t, dtype=torch.int32)  # noqa: E731
        return {
            "decode": ((ids(1), causal_mask(1, e, dtype)), (None, {3: end})),
            "prefill": ((ids(2), causal_mask(2, e, dtype)), ({1: seq}, {2: seq, 3: end})),
        }

    def feeds(self, ids: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """forward's inputs for tokens `ids` (1, T) at positions start..start+T-1."""
        return ids.to(torch.int32), causal_mask(ids.shape[1], start + ids.shape[1], self.key_cache.dtype)

    def check_plan(self, prompt: int = 9, decode: int = 6) -> list[tuple[int, int]]:
        """(start, tokens) calls the export check runs: a `prompt`-token prefill, then single-token decodes."""
        n = min(prompt + decode, self.max_len)
        return [(0, min(prompt, n))] + [(t, 1) for t in range(prompt, n)]

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
