"""Titans: a memory-as-context transformer whose neural long-term memory learns at test time.

Per layer (research/titans.md §2.3): on memory layers (default 2, 4, ...) the retrieved memory is gated into the
residual stream, x += NM(x); then sliding-window causal attention over [N_p learned persistent K/V (no RoPE) ;
the last `window` tokens (RoPE)], x += SWA(RMSNorm(x)); then x += SwiGLU(RMSNorm(x)). Optional hyper-connections
(n residual streams, static + dynamic, Zhu et al.) replace the plain residual. Training and prefill process whole
sequences chunk-parallel (titans_memory.py); decode processes one token at a time with a fixed-size state.

Decode, two ways that share one state layout:
  * in place: `state = model.new_state(B)`, then `model(ids, state=state)` for any T >= 1 (a prompt, then single
    tokens); state.pos counts the tokens consumed. T == 1 takes the per-token path, T > 1 the chunk path.
  * functional, for ONNX/CoreML: `model.step(ids, *tensors) -> (logits, *new_tensors)`, with
    `model.state_spec(B)` = [(name, shape, dtype)], `model.state_to_tensors(state)` and
    `model.state_from_tensors(tensors)`. ids is (B, 1) (decode) or (B, mem_chunk) (chunk prefill: pos must be a
    multiple of mem_chunk, so feed a prompt in mem_chunk-sized calls and its remainder one token at a time).
    Fixed shapes, no autograd, no Python branch on tensor values (chunk ends are arithmetic selects, ring writes
    are one-hot matmuls). The tensors, in order:
      pos                          (1,) int64              tokens consumed so far
      layers.{i}.k, layers.{i}.v   (B, H, window, hd)      RoPE'd K/V ring buffer; slot = position % window
      layers.{i}.{w1,w2,gamma}     (B,H,d,h) (B,H,h,d) (B,H,d)   memory weights (memory layers only; fp32)
      layers.{i}.s_*, layers.{i}.g_*                       momentum, open-chunk gradient accumulator
      layers.{i}.sum_eta, layers.{i}.sum_alpha (B, H)      gate logits summed over the open chunk
    The ring dtype follows the model's; memory tensors are always fp32. Checked: `torch.onnx.export(...,
    dynamo=True, opset_version=18)` of a module calling `step` runs in ONNX Runtime matching torch to < 1e-4
    for both graphs (tests/models/test_titans_export.py, slow); the TorchScript exporter (dynamo=False) stops
    at aten::rms_norm of the shared RMSNorm.
  The in-place path keeps the open chunk's memory inputs pending and folds them into the accumulator at the
  chunk end (NeuralMemory.lazy_step; state_to_tensors folds them first), so it costs less per token than
  `step`, which must add every token's gradient to fixed-shape tensors.
RoPE angles past the precomputed table are computed from positions on the fly, so decoding may run past
`context_length` (the length the model was trained for): the state does not grow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kititans.models.layers import HyperConnection, RMSNorm, SwiGLU, apply_rope
from kititans.models.spec import FamilySpec, Unsupported, register
from kititans.models.titans_config import PRESETS, TitansConfig, titans_component, titans_param_roles
from kititans.models.titans_coreml import TitansCoreMLStep
from kititans.models.titans_memory import NeuralMemory
from kititans.models.titans_onnx import TitansOnnxStep


def _rope_rows(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin (T, hd) with duplicated halves (the rotate-half convention of layers.rope_tables)."""
    ang = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos(), emb.sin()


@dataclass
class TitansState:
    """Decode state: per layer a dict of tensors (attention ring "k"/"v"; memory weights, momentum, open-chunk
    gradient, gate sums; on the in-place path also "pending", the open chunk's inputs not yet folded into the
    gradient accumulator, see NeuralMemory.lazy_step), and the number of tokens consumed."""

    layers: list[dict[str, Tensor]]
    pos: int = 0


@dataclass
class StepCtx:
    """What every layer of one call shares: RoPE rows, the attention mask, the position, ring write slots."""

    cos: Tensor  # (T, hd)
    sin: Tensor
    mask: Tensor  # (T, n_persistent [+ window] + T) bool
    pos: int | Tensor  # absolute position of the first token
    write_idx: Tensor | None = None  # (m,) ring slots for the last m = min(T, window) new tokens
    write_onehot: Tensor | None = None  # (m, window) for the functional (out-of-place) write
    write_slot: int | None = None  # in-place decode of one token: its ring slot


class SlidingAttention(nn.Module):
    def __init__(self, cfg: TitansConfig):
        super().__init__()
        self.n_heads, self.hd, self.window = cfg.n_heads, cfg.head_dim, cfg.window
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.persistent_k = nn.Parameter(torch.empty(cfg.n_heads, cfg.n_persistent, cfg.head_dim))
        self.persistent_v = nn.Parameter(torch.empty(cfg.n_heads, cfg.n_persistent, cfg.head_dim))

    def forward(self, x: Tensor, ctx: StepCtx, st: dict[str, Tensor] | None) -> Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.hd).permute(2, 0, 3, 1, 4)  # (3,B,H,T,hd)
        q, k = apply_rope(qkv[:2], ctx.cos, ctx.sin).unbind(0)
        v = qkv[2]
        keys = [self.persistent_k.to(k.dtype).expand(B, -1, -1, -1)]
        vals = [self.persistent_v.to(v.dtype).expand(B, -1, -1, -1)]
        if st is not None:
            keys.append(st["k"].to(k.dtype))
            vals.append(st["v"].to(v.dtype))
        y = F.scaled_dot_product_attention(
            q, torch.cat([*keys, k], dim=2), torch.cat([*vals, v], dim=2), attn_mask=ctx.mask
        )  # (B,H,T,hd)
        if st is not None:
            self._write(st, k, v, ctx)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))

    def _write(self, st: dict[str, Tensor], k: Tensor, v: Tensor, ctx: StepCtx) -> None:
        """Store the last min(T, window) keys/values in the ring (in place, or out of place by one-hot)."""
        if ctx.write_slot is not None:
            st["k"][:, :, ctx.write_slot] = k[:, :, 0]
            st["v"][:, :, ctx.write_slot] = v[:, :, 0]
            return
        m = ctx.write_idx.shape[0]
        for name, new in (("k", k[:, :, -m:]), ("v", v[:, :, -m:])):
            ring = st[name]
            new = new.to(ring.dtype)
            if ctx.write_onehot is None:
                ring.index_copy_(2, ctx.write_idx, new)
            else:
                oh = ctx.write_onehot.to(ring.dtype)  # (m, W)
                st[name] = ring * (1 - oh.sum(0)).unsqueeze(-1) + oh.transpose(0, 1) @ new


class TitansLayer(nn.Module):
    def __init__(self, cfg: TitansConfig, index: int):
        super().__init__()
        self.memory: NeuralMemory | None = None
        if index in cfg.memory_set:
            self.memory = NeuralMemory(
                cfg.dim,
                cfg.n_heads,
                cfg.head_dim,
                cfg.mem_hidden_mult * cfg.head_dim,
                cfg.mem_chunk,
                act=cfg.mem_act,
                residual_norm=cfg.mem_residual_norm,
                grad_base=cfg.mem_grad_base,
                max_lr=cfg.mem_max_lr,
                max_grad_norm=cfg.mem_max_grad_norm,
                norm_eps=cfg.norm_eps,
            )
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = SlidingAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_dim)
        self.hc: nn.ModuleList | None = None
        if cfg.hyper_streams > 1:
            n_branch = 3 if self.memory is not None else 2
            self.hc = nn.ModuleList(
                HyperConnection(cfg.dim, cfg.hyper_streams, 3 * index + j, cfg.norm_eps)
                for j in range(n_branch)
            )

    def forward(self, h: Tensor, ctx: StepCtx, st: dict[str, Tensor] | None) -> Tensor:
        fns: list[Callable[[Tensor], Tensor]] = []
        if self.memory is not None:
            fns.append(lambda u: self.memory(u, st, ctx.pos).to(u.dtype))
        fns.append(lambda u: self.attn(self.attn_norm(u), ctx, st))
        fns.append(lambda u: self.ffn(self.ffn_norm(u)))
        for j, fn in enumerate(fns):
            h = self.hc[j](h, fn) if self.hc is not None else h + fn(h)
        return h


class TitansModel(nn.Module):
    component = staticmethod(titans_component)  # parameter name -> component, for the size table

    def __init__(self, cfg: TitansConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TitansLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("rope_inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.register_buffer("rope_cos", torch.empty(cfg.context_length, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.context_length, cfg.head_dim), persistent=False)
        self._mask_cache: dict = {}  # in-place decode masks by (device, position class)
        self.activation_checkpointing = False
        self.init_weights()
        self.init_buffers()

    def init_buffers(self) -> None:
        """Fill the non-persistent RoPE frequencies and tables (fp32) on the model's device."""
        if self.rope_inv_freq.device.type == "meta":
            return
        hd, dev = self.config.head_dim, self.rope_inv_freq.device
        inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        self.rope_inv_freq = inv.to(dev)
        self.rope_cos, self.rope_sin = _rope_rows(
            torch.arange(self.config.context_length, device=dev), inv.to(dev)
        )
        self._mask_cache = {}

    def init_weights(self) -> None:
        """Embeddings and input projections normal(0, std); output projections std / sqrt(2 n_layers);
        persistent K/V at the scale of projected keys; gains 1; memory and HC by their own rules."""
        cfg = self.config
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        nn.init.normal_(self.embed.weight, 0.0, std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, std)
        for layer in self.layers:
            for lin in (layer.attn.qkv, layer.ffn.gate_proj, layer.ffn.up_proj):
                nn.init.normal_(lin.weight, 0.0, std)
            for lin in (layer.attn.o_proj, layer.ffn.down_proj):
                nn.init.normal_(lin.weight, 0.0, out_std)
            nn.init.normal_(layer.attn.persistent_k, 0.0, std * math.sqrt(cfg.dim))
            nn.init.normal_(layer.attn.persistent_v, 0.0, std * math.sqrt(cfg.dim))
            nn.init.ones_(layer.attn_norm.weight)
            nn.init.ones_(layer.ffn_norm.weight)
            if layer.memory is not None:
                layer.memory.init_weights(std, out_std)
            for hc in layer.hc or []:
                hc.reset()
        nn.init.ones_(self.norm.weight)

    # -- state

    def state_spec(self, batch_size: int = 1) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """Names, shapes and dtypes of the functional state tensors, in `step` order."""
        cfg, dtype = self.config, self.embed.weight.dtype
        spec: list[tuple[str, tuple[int, ...], torch.dtype]] = [("pos", (1,), torch.int64)]
        ring = (batch_size, cfg.n_heads, cfg.window, cfg.head_dim)
        for i, layer in enumerate(self.layers):
            spec += [(f"layers.{i}.k", ring, dtype), (f"layers.{i}.v", ring, dtype)]
            if layer.memory is not None:
                spec += [
                    (f"layers.{i}.{n}", s, torch.float32) for n, s in layer.memory.state_spec(batch_size)
                ]
        return spec

    def new_state(
        self, batch_size: int = 1, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> TitansState:
        """A fresh decode state (rings zero, memory at its learned W_0). max_len is accepted for the runtime
        contract and ignored: the state has a fixed size whatever the length."""
        cfg, p = self.config, self.embed.weight
        ring = (batch_size, cfg.n_heads, cfg.window, cfg.head_dim)
        layers = []
        for layer in self.layers:
            st = {n: torch.zeros(ring, dtype=dtype or p.dtype, device=p.device) for n in ("k", "v")}
            if layer.memory is not None:
                st.update(layer.memory.initial_state(batch_size, p.device))
            layers.append(st)
        return TitansState(layers, 0)

    def _state_names(self) -> list[tuple[int, str]]:
        return [(int(n.split(".")[1]), n.split(".", 2)[2]) for n, _, _ in self.state_spec(1)[1:]]

    def state_to_tensors(self, state: TitansState) -> tuple[Tensor, ...]:
        """(pos (1,) int64, *tensors in state_spec order); the tensors are the state's own (not copies)."""
        for layer, st in zip(self.layers, state.layers):
            if layer.memory is not None:
                layer.memory.flush(st)  # pending tokens of the in-place path -> the gradient accumulator
        pos = torch.tensor([state.pos], dtype=torch.int64, device=self.embed.weight.device)
        return (pos, *(state.layers[i][key] for i, key in self._state_names()))

    def _layer_states(self, tensors: tuple[Tensor, ...] | list[Tensor]) -> list[dict[str, Tensor]]:
        layers: list[dict[str, Tensor]] = [{} for _ in self.layers]
        for (i, key), t in zip(self._state_names(), tensors, strict=True):
            layers[i][key] = t
        return layers

    def state_from_tensors(self, tensors: tuple[Tensor, ...] | list[Tensor]) -> TitansState:
        """The in-place state object over the given tensors (pos first, as state_to_tensors returns)."""
        return TitansState(self._layer_states(tensors[1:]), int(tensors[0].reshape(-1)[0].item()))

    # -- forward

    def _rope(self, pos: int | Tensor, T: int) -> tuple[Tensor, Tensor]:
        """cos, sin (T, hd) for positions pos..pos+T-1: table rows where the table reaches, else computed
        the same way on the fly (so decoding can run past context_length)."""
        if isinstance(pos, int) and pos + T <= self.rope_cos.shape[0]:
            return self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        p = pos if isinstance(pos, Tensor) else torch.tensor([pos], device=self.rope_inv_freq.device)
        return _rope_rows(p + torch.arange(T, device=p.device), self.rope_inv_freq)

    def _ctx(self, pos: int | Tensor, T: int, cached: bool, functional: bool) -> StepCtx:
        """RoPE rows, attention mask and ring slots for tokens pos..pos+T-1 (pos an int or a (1,) tensor)."""
        cfg, dev = self.config, self.rope_inv_freq.device
        W = cfg.window
        cos, sin = self._rope(pos, T)
        if cached and not functional and T == 1:  # in-place decode: the mask depends only on pos (mod W)
            key = (dev, pos if pos < W else W + pos % W)
            if key not in self._mask_cache:
                self._mask_cache[key] = self._ctx(torch.tensor([pos], device=dev), 1, True, True).mask
            return StepCtx(cos, sin, self._mask_cache[key], pos, write_slot=pos % W)
        p = pos if isinstance(pos, Tensor) else torch.tensor([pos], dtype=torch.int64, device=dev)
        ar = torch.arange(T, device=dev)
        qpos = p + ar  # (T,)
        rel = ar[:, None] - ar[None, :]
        parts = [torch.ones(T, cfg.n_persistent, dtype=torch.bool, device=dev)]
        write_idx = onehot = None
        if cached:
            a = p - 1 - torch.remainder(p - 1 - torch.arange(W, device=dev), W)  # position held by each slot
            parts.append((a[None, :] >= 0) & (qpos[:, None] - a[None, :] < W))
            m = min(T, W)
            write_idx = torch.remainder(p + (T - m) + torch.arange(m, device=dev), W)
            if functional:
                onehot = (write_idx[:, None] == torch.arange(W, device=dev)[None, :]).float()
        parts.append((rel >= 0) & (rel < W))
        return StepCtx(cos, sin, torch.cat(parts, dim=-1), pos, write_idx, onehot)

    def _run(self, input_ids: Tensor, ctx: StepCtx, states: list[dict[str, Tensor]] | None) -> Tensor:
        x = self.embed(input_ids)  # (B,T,D)
        n = self.config.hyper_streams
        h = x.unsqueeze(-2).expand(*x.shape[:2], n, x.shape[-1]).contiguous() if n > 1 else x
        for i, layer in enumerate(self.layers):
            st = states[i] if states is not None else None
            if self.activation_checkpointing and self.training and st is None:
                h = checkpoint(layer, h, ctx, None, use_reentrant=False)
            else:
                h = layer(h, ctx, st)
        x = h.sum(-2) if n > 1 else h
        return self.lm_head(self.norm(x))

    def forward(self, input_ids: Tensor, state: TitansState | None = None) -> Tensor:
        """input_ids (B, T) -> logits (B, T, vocab). With `state`, continues the sequence in place."""
        T = input_ids.shape[1]
        pos = state.pos if state is not None else 0
        ctx = self._ctx(pos, T, cached=state is not None, functional=False)
        logits = self._run(input_ids, ctx, state.layers if state is not None else None)
        if state is not None:
            state.pos = pos + T
        return logits

    def step(self, input_ids: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        """Functional decode: (ids (B,1) or (B,mem_chunk), *state tensors) -> (logits (B,T,V), *new state).
        Inputs are not modified. A mem_chunk-sized call must start at a multiple of mem_chunk."""
        T = input_ids.shape[1]
        if T not in (1, self.config.mem_chunk):
            raise ValueError(f"step takes 1 or mem_chunk={self.config.mem_chunk} tokens, got {T}")
        pos, layers = state[0], self._layer_states(state[1:])  # fresh dicts: results are rebound, not written
        logits = self._run(input_ids, self._ctx(pos, T, cached=True, functional=True), layers)
        return (logits, pos + T, *(layers[i][key] for i, key in self._state_names()))

    def loss(self, input_ids: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        from kititans.models.lite import lm_loss

        return lm_loss(self(input_ids), targets, mask)


SPEC = register(
    FamilySpec(
        name="titans",
        config_cls=TitansConfig,
        model_cls=TitansModel,
        presets=PRESETS,
        description="Titans MAC: neural memory that learns at test time + sliding-window attention",
        formats={
            "gguf": Unsupported(
                "llama.cpp has no Titans architecture (it would need a custom graph with recurrent memory "
                "state); use onnx or coreml"
            ),
            "onnx": TitansOnnxStep,
            "coreml": TitansCoreMLStep,
        },
        param_roles=titans_param_roles,
    )
)
