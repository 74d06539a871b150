"""The Titans CoreML step: `TitansModel.step` with every state tensor as an fp16 `MLState` (research/titans.md
§4.5-4.6). Pure torch: kititans/export/coreml.py converts it, kititans/runtimes/coreml.py runs it.

One multifunction package, two functions over the same states:
  decode   input_ids (1, 1) int32,         position (1,) int32  -> logits (1, 1, V)
  prefill  input_ids (1, mem_chunk) int32, position (1,) int32  -> logits (1, mem_chunk, V);
           position must be a multiple of mem_chunk, so a prompt goes in mem_chunk-sized calls and its
           remainder token by token.
`position` is the absolute position of the first new token: a state (fp16 only, in coremltools 9) could not
count past 2048 exactly. A call at position 0 starts a new sequence: the memory weights restart from the
learned W_0, momentum, accumulator and gate sums from zero (multiplied by 0, so the state must hold finite
values; Apple documents makeState() buffers as zero-initialized), and ring slots before position 0 are
masked out; so a new or a reused MLState both work.

States, one per tensor of `TitansModel.state_spec` (names with "_" for "."): layers_{i}_k / _v, the RoPE'd K/V
ring of the attention window; on memory layers layers_{i}_{w1,w2,gamma} (memory weights), _s_* (momentum),
_g_* (open-chunk gradient accumulator), _sum_eta / _sum_alpha (gate logits of the open chunk). Each is read,
cast up, advanced by the functional step and written back whole (`buf[:] = new`: read_state ->
coreml_update_state in MIL). The state never grows: a Titans package decodes past its training length.

Precision: traced in fp32 and converted with fp16 compute, except (`fp32_compute`) the neural memory's state
math (everything traced inside NeuralMemory.forward but its linear projections) and the RoPE angles (sin/cos
and what feeds them); weights are stored in fp16 (or compressed), states in fp16. `fp16_copy()` is a torch
stand-in for these numerics (benchmarks/titans_coreml_drift.py measures the drift on a trained model).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import Tensor, nn


class TitansCoreMLStep(nn.Module):
    """Decode / chunk-prefill step of a TitansModel whose state lives in fp16 buffers updated in place."""

    kind = "recurrent"  # the state is fixed-size and carried whole; no length limit, no mask
    input_names = ("input_ids", "position")
    output_names = ("logits",)
    input_dtypes: ClassVar[dict[str, str]] = {"input_ids": "int32", "position": "int32"}
    required_ops = ("read_state", "write_state", "scaled_dot_product_attention")
    prefill_exact = True  # prefill takes exactly prefill_len tokens at a multiple of prefill_len
    # fp32 compute for the neural memory's state math (closed-form gradient, chunk update, retrieval through
    # the memory MLP) but not its input/output projections (linear), and for the RoPE angles: position *
    # frequency loses whole radians in fp16 past a few hundred positions. Everything else computes in fp16.
    fp32_compute: ClassVar[dict] = {"code": ("titans_memory.py",), "except_ops": ("linear",), "angles": True}
    # small parameters coremltools folds into derived consts (expanded, scaled): not stored under their names
    folded_params = ("persistent_k", "persistent_v", "qkv_gain")
    # const-name parts compression leaves in fp16: norms, the memory's W_0, gates and per-head gains (small,
    # and they steer what the memory stores), persistent K/V
    keep_float = ("norm", "memory_w1", "memory_w2", "memory_gamma", "gates", "qkv_gain", "persistent", "rope")

    def __init__(self, model: nn.Module, max_len: int | None = None, prefill_len: int | None = None):
        super().__init__()
        self.model = model
        cfg = model.config
        self.chunk = cfg.mem_chunk
        self.prefill_len = cfg.mem_chunk  # fixed by the memory: chunk prefill only (requested length ignored)
        self.context_length = cfg.context_length  # the trained length; the state allows more
        self.max_len = max_len or cfg.context_length  # recorded for the manifest; the graph has no limit
        self.window = cfg.window
        self.state_names: list[str] = []
        self._memory: list[bool] = []  # memory tensors compute in fp32, rings in the model's dtype
        for name, shape, _ in model.state_spec(1)[1:]:
            key = name.replace(".", "_")
            self.register_buffer(key, torch.zeros(shape, dtype=torch.float16))  # CoreML states are fp16
            self.state_names.append(key)
            self._memory.append(name.rsplit(".", 1)[1] not in ("k", "v"))

    def reset(self) -> None:
        for name in self.state_names:
            getattr(self, name).zero_()

    def _initial_weights(self) -> list[Tensor | None]:
        """Per state tensor, the learned W_0 (H, ...) it starts from (memory weights), else None."""
        init: dict[str, Tensor] = {}
        for i, layer in enumerate(self.model.layers):
            if layer.memory is not None:
                for n, w0 in zip(layer.memory.weight_names(), layer.memory.initial_weights()):
                    init[f"layers_{i}_{n}"] = w0
        return [init.get(name) for name in self.state_names]

    def forward(self, input_ids: Tensor, position: Tensor) -> Tensor:
        """input_ids (1, T) int32 (T = 1 or mem_chunk), position (1,) int32 -> logits (1, T, V)."""
        pos = position.to(torch.int64)
        fresh = pos == 0  # (1,): a new sequence starts from W_0 and empty sums, whatever the state holds
        keep = (~fresh).float()  # (1,)
        ring_dtype = self.model.embed.weight.dtype
        state: list[Tensor] = [pos]
        for name, w0, memory in zip(self.state_names, self._initial_weights(), self._memory):
            buf = getattr(self, name)
            if not memory:  # ring slots before position 0 are masked out: no reset needed
                state.append(buf.to(ring_dtype))
            elif w0 is not None:  # (1, H, ...): select on (H, ...) so W_0 stays one const under its own name
                state.append(torch.where(fresh, w0, buf[0].float()).unsqueeze(0))
            else:  # momentum, gradient accumulator, gate sums; a multiply, not a select against a full-size
                state.append(buf.float() * keep)  # zero const, which coremltools would store in the weights
        logits, _, *new = self.model.step(input_ids, *state)
        for name, t in zip(self.state_names, new):
            buf = getattr(self, name)
            buf[:] = t.to(buf.dtype)  # `copy_` does not convert; slice assignment becomes a state write
        return logits

    # -- what the exporter reads

    def functions(self) -> dict[str, tuple[tuple[Tensor, Tensor], None]]:
        """Function name -> (example inputs, dynamic shapes): both fixed."""
        pos = torch.zeros(1, dtype=torch.int32)
        ids = lambda t: torch.zeros(1, t, dtype=torch.int32)  # noqa: E731
        return {"decode": ((ids(1), pos), None), "prefill": ((ids(self.chunk), pos), None)}

    def feeds(self, ids: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """forward's inputs for tokens `ids` (1, T) at positions start..start+T-1."""
        return ids.to(torch.int32), torch.tensor([start], dtype=torch.int32)

    def check_plan(self) -> list[tuple[int, int]]:
        """(start, tokens) calls the export check runs against the parallel forward: chunk prefills past the
        attention window (the ring wraps) and over more than two memory chunks, decode across a chunk end,
        a prefill after decoding, decode again."""
        C = self.chunk
        n_pre = max(2, math.ceil(self.window / C)) + 1
        plan = [(j * C, C) for j in range(n_pre)]
        at = n_pre * C
        plan += [(at + t, 1) for t in range(C)]  # one whole chunk token by token
        plan.append((at + C, C))
        plan += [(at + 2 * C + t, 1) for t in range(3)]
        return plan

    def fp16_copy(self) -> nn.Module:
        """A torch stand-in for the package's numerics: the model in fp16 except what stays fp32 in the
        graph (the memory path casts to fp32 itself; the RoPE frequencies are kept fp32 here)."""
        step = copy.deepcopy(self)
        inv_freq = step.model.rope_inv_freq.float()
        step.model.half()
        step.model.rope_inv_freq = inv_freq
        for name in step.state_names:
            setattr(step, name, getattr(step, name).half())
        return step

    @staticmethod
    @contextmanager
    def numerics(dtype: torch.dtype, *modules: nn.Module) -> Iterator[None]:
        """For float64 checks: the memory path casts to fp32 by design (`.float()`) and the RoPE tables were
        computed in fp32; make those casts reach float64 and recompute the tables of the models in `modules`,
        so a float64 comparison shows the same math rather than fp32 rounding."""
        if dtype != torch.float64:
            yield
            return
        original = torch.Tensor.float
        torch.Tensor.float = lambda self, *a, **k: self.to(torch.float64)  # type: ignore[method-assign]
        try:
            for module in modules:
                for sub in module.modules():
                    if hasattr(sub, "init_buffers") and hasattr(sub, "rope_inv_freq"):
                        sub.init_buffers()
            yield
        finally:
            torch.Tensor.float = original  # type: ignore[method-assign]
