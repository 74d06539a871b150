"""Titans: a transformer whose neural long-term memory learns at test time (arXiv 2501.00663).

Per layer, `model.block` (blocks.py) picks how memory and attention combine: mal (memory as a layer,
the default, and what runs saved before blocks existed are), mag (memory as a gate) or mac (memory as context,
the paper's §4.1, the titans-500m preset). Attention is a sliding window over [N_p learned persistent K/V (no
RoPE) ; the last `window` tokens (RoPE)] (mac: segments of `window` tokens, plus the memory's h rows). Optional
hyper-connections (n residual streams, static + dynamic, Zhu et al.) replace the plain residual. Training
processes whole sequences chunk-parallel (memory.py); decoding steps over a fixed-size state.

Decode, two ways over one state layout (state.py):
  * in place: `state = model.new_state(B)`, then `model(ids, state=state)` for any T >= 1 (a prompt, then single
    tokens); state.pos counts the tokens consumed. A call is split like the exported runtimes split it: whole
    memory chunks where the position is a multiple of mem_chunk, single tokens elsewhere.
  * functional, for ONNX/CoreML: `model.step(ids, *tensors) -> (logits, *new_tensors)`, with
    `model.state_spec(B)` = [(name, shape, dtype)], `model.state_to_tensors(state)` and
    `model.state_from_tensors(tensors)`. ids is (B, 1), or (B, mem_chunk) at a position that is a multiple of
    mem_chunk (anything else is refused: it would be silently wrong). Fixed shapes, no autograd, no Python
    branch on tensor values once the call's kind (`model.kinds()`: inside a chunk, closing a chunk or a
    segment, a chunk prefill) is known; the exporters trace one graph per kind. The tensors, in order:
      pos                              (1,) int64           tokens consumed so far
      layers.{i}.k, layers.{i}.v       (B, rows, dim)       K/V rings (persistent rows first), model dtype
      layers.{i}.{w1,w2,gamma}         memory weights       (memory layers only; fp32, as all memory state)
      layers.{i}.s_*                   momentum
      layers.{i}.buf                   (B, mem_chunk-1, dim) the open chunk's normalised memory inputs
      layers.{i}.conv, layers.{i}.conv_q                    with mem_conv: key/value and query histories
      layers.{i}.seg_*, layers.{i}.conv_h                   mac: segment-start weights, h-stream conv
RoPE angles past the precomputed table are computed from positions on the fly, so decoding may run past
`context_length` (the length the model was trained for): the state does not grow.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kititans.errors import KititansError
from kititans.models.layers import RMSNorm, apply_linear, row_gemms
from kititans.models.spec import FamilySpec, Unsupported, register
from kititans.models.titans import rows
from kititans.models.titans.blocks import TitansLayer
from kititans.models.titans.config import (
    PRESETS,
    TitansConfig,
    titans_component,
    titans_fp32_modules,
    titans_param_roles,
    titans_param_splits,
    upgrade_config,
)
from kititans.models.titans.coreml_step import TitansCoreMLStep
from kititans.models.titans.flops import titans_flops_per_token
from kititans.models.titans.hf import hf_config, run_files
from kititans.models.titans.onnx_step import TitansOnnxStep
from kititans.models.titans.state import (
    StateIO,
    StepCtx,
    StepKind,
    long_prefill,
    pick_kind,
    plan,
    rope_rows,
    step_kinds,
)


@dataclass
class TitansState:
    """Decode state: per layer a dict of tensors (state.py), and the number of tokens consumed."""

    layers: list[dict[str, Tensor]]
    pos: int = 0


class TitansModel(nn.Module):
    component = staticmethod(titans_component)  # parameter name -> component, for the size table

    def __init__(self, cfg: TitansConfig):
        super().__init__()
        self.config = cfg
        self.build(cfg)
        self.init_weights()
        self.init_buffers()

    def build(self, cfg: TitansConfig) -> None:
        """Create the modules and buffers (on whatever device is current; init_weights fills them)."""
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TitansLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("rope_inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.register_buffer("rope_cos", torch.empty(cfg.context_length, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.context_length, cfg.head_dim), persistent=False)
        self._step_cache: dict = {}  # in-place decode: masks and ring slots by position class
        self._compiled: dict | None = None  # compile_decode(): kind name -> compiled single-token step
        self.activation_checkpointing = False

    @property
    def cfg(self) -> TitansConfig:
        """The model's TitansConfig (`config`; the transformers wrapper keeps its own config there)."""
        return self.config

    def init_buffers(self) -> None:
        """Fill the non-persistent RoPE frequencies and tables (fp32) on the model's device."""
        if self.rope_inv_freq.device.type == "meta":
            return
        hd, dev = self.cfg.head_dim, self.rope_inv_freq.device
        inv = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        self.rope_inv_freq = inv.to(dev)
        self.rope_cos, self.rope_sin = rope_rows(
            torch.arange(self.cfg.context_length, device=dev), inv.to(dev)
        )
        self._step_cache = {}

    def init_weights(self) -> None:
        """Embeddings and input projections normal(0, std); output projections std / sqrt(2 n_layers);
        persistent K/V at the scale of projected keys; gains 1; memory and HC by their own rules."""
        cfg = self.cfg
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
            if layer.gate_scale is not None:  # the open MAC gate: y * (1 + 0 * tanh(N(y))) = y at init
                nn.init.zeros_(layer.gate_scale)
        nn.init.ones_(self.norm.weight)

    def fuse_for_inference(self) -> TitansModel:
        """One matmul for the FFN's gate/up and one for a memory's projections + gates (same numbers, same
        state_dict); for decoding, not for training."""
        for layer in self.layers:
            layer.ffn.fuse()
            if layer.memory is not None:
                layer.memory.fuse()
        return self

    # -- state

    def kinds(self, long: bool = True) -> list[StepKind]:
        """The shapes of stateful call this model needs (state.step_kinds); long: with the long prefill."""
        cfg = self.cfg
        mac = cfg.block == "mac"
        size = long_prefill(cfg.mem_chunk, cfg.window, mac) if long else None
        return step_kinds(cfg.mem_chunk, cfg.window if mac else None, size)

    def state_spec(self, batch_size: int = 1) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """Names, shapes and dtypes of the functional state tensors, in `step` order."""
        dtype = self.embed.weight.dtype
        spec: list[tuple[str, tuple[int, ...], torch.dtype]] = [("pos", (1,), torch.int64)]
        for i, layer in enumerate(self.layers):
            spec += [(f"layers.{i}.{n}", s, d) for n, s, d in layer.state_spec(batch_size, dtype)]
        return spec

    def new_state(
        self, batch_size: int = 1, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> TitansState:
        """A fresh decode state (rings zero, memory at its learned W_0). max_len is accepted for the runtime
        contract and ignored: the state has a fixed size whatever the length."""
        p = self.embed.weight
        return TitansState([layer.new_state(batch_size, p.device, dtype or p.dtype) for layer in self.layers])

    def _state_names(self) -> list[tuple[int, str]]:
        return [(int(n.split(".")[1]), n.split(".", 2)[2]) for n, _, _ in self.state_spec(1)[1:]]

    def state_to_tensors(self, state: TitansState) -> tuple[Tensor, ...]:
        """(pos (1,) int64, *tensors in state_spec order); the tensors are the state's own (not copies)."""
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
        return rope_rows(p + torch.arange(T, device=p.device), self.rope_inv_freq)

    def ctx(
        self, pos: int | Tensor, T: int, kind: StepKind | None = None, fused: bool = False,
        cache: dict | None = None,
    ) -> StepCtx:  # fmt: skip
        """What the layers of one call share; kind None: a whole sequence from position 0 (no state)."""
        cfg = self.cfg
        cos, sin = self._rope(pos, T)
        return StepCtx(
            T, pos, cos, sin, cfg.n_heads, cfg.n_persistent, cfg.window, cfg.mem_chunk,
            stateful=kind is not None,
            closes_chunk=kind is not None and kind.closes_chunk,
            closes_segment=kind is not None and kind.closes_segment,
            fused=fused,
            cache=cache,
        )  # fmt: skip

    def _run(self, input_ids: Tensor, ctx: StepCtx, ios: list[StateIO] | None, head: bool = True) -> Tensor:
        x = self.embed(input_ids)  # (B,T,D)
        n = self.cfg.hyper_streams
        h = x.unsqueeze(-2).expand(*x.shape[:2], n, x.shape[-1]).contiguous() if n > 1 else x
        for i, layer in enumerate(self.layers):
            io = ios[i] if ios is not None else None
            if self.activation_checkpointing and self.training and io is None:
                h = checkpoint(layer, h, ctx, None, use_reentrant=False)
            else:
                h = layer(h, ctx, io)
        x = self.norm(h.sum(-2) if n > 1 else h)
        return apply_linear(self.lm_head, x) if head else x

    def forward(self, input_ids: Tensor, state: TitansState | None = None, hidden: bool = False) -> Tensor:
        """input_ids (B, T) -> logits (B, T, vocab). With `state`, continues the sequence in place.
        hidden (training, no state): the final normalised hidden states (B, T, dim) instead; the training loss
        applies the head chunk by chunk (train/loss.py)."""
        T = input_ids.shape[1]
        if state is None:
            return self._run(input_ids, self.ctx(0, T), None, head=not hidden)
        kinds, parts = self.kinds(), []
        for at, n in plan(T, state.pos, [k.tokens for k in kinds]):
            kind, ids = pick_kind(kinds, state.pos, n), input_ids[:, at : at + n]
            if n == 1 and self._compiled is not None:
                parts.append(self._compiled_step(kind)(ids, torch.tensor([state.pos]), state.layers))
            else:
                ctx = self.ctx(state.pos, n, kind, cache=self._step_cache)
                ios = [StateIO(st, in_place=True) for st in state.layers]
                # a decode step multiplies row by row, as a batched step of several sequences does (rows.py)
                with row_gemms() if n == 1 else contextlib.nullcontext():
                    parts.append(self._run(ids, ctx, ios))
            state.pos += n
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def decode_rows(
        self, ids: Sequence[int], states: Sequence[TitansState], positions: Sequence[int]
    ) -> Tensor:
        """One token for each of several sequences (each its own batch-1 state), batched where the rows allow
        (rows.py): logits (B, V)."""
        return rows.decode_rows(self, ids, states, positions)

    def compile_decode(self, **options: object) -> TitansModel:
        """Decode single tokens in place through torch.compile'd fixed-shape steps, one per kind of call
        (each compiles on first use; `options` go to torch.compile). The numbers stay the same."""
        self._compiled = {}
        self._compile_options = {"fullgraph": True, "dynamic": False, **options}
        if self._compile_options.get("backend", "inductor") == "inductor":
            # Inductor (torch 2.13) reuses a still-live buffer in the MAC step's graph: wrong logits from the
            # first decoded token on. A decode step's buffers are small, so none is reused.
            safe = {"allow_buffer_reuse": False, "inplace_buffers": False}
            self._compile_options["options"] = {**safe, **dict(options.get("options") or {})}
        return self

    def _compiled_step(self, kind: StepKind) -> Callable[..., Tensor]:
        if kind.name not in self._compiled:

            def one(ids: Tensor, pos: Tensor, layers: list[dict[str, Tensor]]) -> Tensor:
                return self._run(ids, self.ctx(pos, 1, kind), [StateIO(st, in_place=True) for st in layers])

            # a code object of its own per model and kind: dynamo keeps its graphs per code object, so steps
            # sharing one would recompile it for each model and kind (past dynamo's recompile limit in a
            # process with a few Titans models) and check every graph's guards on each call
            code = one.__code__.replace(co_name=f"titans_{kind.name}_{id(self):x}")
            step = types.FunctionType(code, one.__globals__, code.co_name, None, one.__closure__)
            self._compiled[kind.name] = torch.compile(step, **self._compile_options)
        return self._compiled[kind.name]

    def step_io(
        self, input_ids: Tensor, pos: Tensor, layers: list[dict[str, Tensor]], kind: StepKind,
        fused: bool = False, in_place: bool = False,
    ) -> tuple[Tensor, list[StateIO]]:  # fmt: skip
        """One call of a known kind over layer state dicts (the exporters' entry point): logits and each
        layer's StateIO, whose `tensors` hold the new state and `written` what changed."""
        ios = [StateIO(dict(st), in_place) for st in layers]
        logits = self._run(input_ids, self.ctx(pos, input_ids.shape[1], kind, fused), ios)
        return logits, ios

    def step(self, input_ids: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        """Functional decode: (ids (B,1) or (B,mem_chunk), *state tensors) -> (logits (B,T,V), *new state).
        Inputs are not modified; unchanged tensors come back as they are."""
        T, pos = input_ids.shape[1], int(state[0].reshape(-1)[0].item())
        try:
            kind = pick_kind(self.kinds(), pos, T)
        except ValueError as e:
            raise KititansError(f"titans step: {e}") from None
        logits, ios = self.step_io(input_ids, state[0], self._layer_states(state[1:]), kind)
        return (logits, state[0] + T, *(ios[i].tensors[key] for i, key in self._state_names()))

    def loss(self, input_ids: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        from kititans.models.lite import lm_loss

        return lm_loss(self(input_ids), targets, mask)


SPEC = register(
    FamilySpec(
        name="titans",
        config_cls=TitansConfig,
        model_cls=TitansModel,
        presets=PRESETS,
        description="Titans: neural memory that learns at test time + windowed attention (blocks mal, mac, mag)",
        formats={
            "gguf": Unsupported(
                "llama.cpp has no Titans architecture (it would need a custom graph with recurrent memory "
                "state); use onnx or coreml"
            ),
            "onnx": TitansOnnxStep,
            "coreml": TitansCoreMLStep,
        },
        param_roles=titans_param_roles,
        param_splits=titans_param_splits,
        fp32_modules=titans_fp32_modules,
        hf_config=hf_config,
        run_files=run_files,
        upgrade_config=upgrade_config,
        flops_per_token=titans_flops_per_token,
    )
)
