"""The Titans CoreML step: `TitansModel`'s calls with every state tensor as an fp16 `MLState` (research/titans.md
§4.5-4.6). Pure torch: kititans/export/coreml.py converts it, kititans/runtimes/coreml.py runs it.

One multifunction package, one function per kind of call (`TitansModel.kinds()`), all over the same states:
  decode            a token inside a memory chunk         input_ids (1, 1) int32, position (1,) int32
  decode_close      the token that closes a chunk          the same
  prefill           a whole chunk at a chunk boundary      input_ids (1, mem_chunk) int32, position
  decode_segment,   mac only: the calls that also close a segment
  prefill_segment
-> logits (1, T, V). `position` is the absolute position of the first new token (a state, fp16 only in
coremltools 9, could not count past 2048 exactly); the runtime picks the function from it (manifest `steps`:
the function whose `every` divides position + tokens, the largest).

States, one per tensor of `TitansModel.state_spec` (names with "_" for "."). What a function writes:
  decode            its ring rows (a scatter of one row + the persistent rows) and its memory-buffer row
  the others        the same, plus the memory weights and momentum (+ segment weights), once per chunk
A state a function only reads gets a one-element write of itself, so that every function carries every state
(coremltools keeps only written buffers as states); `state_writes` measures this in a converted program.
So a token inside a chunk rewrites no memory state: the spec check (`check_program`) fails a package whose
decode function writes more than a few rows of any state.

The memory weights are stored as their change from the learned W_0 and read as W_0 + keep * state, with
keep = 0 in a sequence's first chunk (first segment for the segment weights), and momentum as keep * state;
ring slots before position 0 are masked out and their persistent rows rewritten with every write. So a state
Core ML creates (zeros) is a fresh sequence, and a call at position 0 starts one whatever the state holds.

Precision: traced in fp32 and converted with fp16 compute, except (`fp32_compute`) the neural memory's state
math (everything traced in memory.py but its linear projections, the W_0 + keep * state reads
included) and the RoPE angles; weights are stored in fp16 (or compressed), states in fp16. `fp16_copy()` is a
torch stand-in for these numerics (benchmarks/titans_coreml_drift.py measures the drift on a trained model).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kititans.models.titans.memory_math import stored_read, stored_write
from kititans.models.titans.state import StateIO, StepKind, pick_kind

MEMORY_WEIGHTS = ("w1", "w2", "gamma")


class CoreMLIO(StateIO):
    """One layer's state as the wrapper's buffers: reads cast up (memory weights rebuilt from W_0), writes in
    place (rows by index_put, whole tensors at chunk ends)."""

    def __init__(self, step: TitansCoreMLStep, layer: int, pos: Tensor, ring_dtype: torch.dtype):
        super().__init__({}, in_place=True)
        prefix = f"layers_{layer}_"
        self.buffers = {n[len(prefix) :]: getattr(step, n) for n in step.state_names if n.startswith(prefix)}
        memory = step.model.layers[layer].memory
        self.base = dict(zip(memory.weight_names(), memory.initial_weights())) if memory is not None else {}
        self.pos, self.ring_dtype = pos, ring_dtype
        self.chunk, self.segment = step.chunk, step.window

    def _keep(self, name: str) -> Tensor | None:
        """The factor a stored value is read with: 0 where it belongs to an earlier sequence."""
        if name.startswith("seg_"):
            return (self.pos >= self.segment).float()
        if name.startswith("s_") or name in MEMORY_WEIGHTS:
            return (self.pos >= self.chunk).float()
        if name.startswith("conv"):
            # row j holds position start - (k-1) + j: start = pos for the per-token query histories (conv_q,
            # conv_h), the open chunk's start for the keys and values (conv, written when a chunk closes)
            k1 = self.buffers[name].shape[1]
            start = self.pos - torch.remainder(self.pos, self.chunk) if name == "conv" else self.pos
            rows = start + torch.arange(k1, device=self.pos.device) - k1
            return (rows >= 0).float().view(1, k1, 1)
        return None

    def _base(self, name: str) -> Tensor | None:
        return self.base.get(name.removeprefix("seg_"))  # (H, ...): broadcast, so W_0 stays one named const

    def get(self, name: str) -> Tensor:
        if name in self.tensors:  # written earlier in this call
            return self.tensors[name]
        self.read.add(name)
        buf = self.buffers[name]
        if name in ("k", "v"):
            return buf.to(self.ring_dtype)
        return stored_read(buf, self._keep(name), self._base(name))

    def put(self, name: str, value: Tensor) -> None:
        self.tensors[name] = value
        buf = self.buffers[name]
        buf[:] = stored_write(value, self._base(name)).to(buf.dtype)  # slice assignment: a state write
        self._mark(name)

    def put_rows(self, name: str, index: Tensor, rows: Tensor) -> Tensor:
        self.read.add(name)
        buf = self.buffers[name]
        batch = index[None, :] * 0  # from the int index (a zeros() const would be typed float), not broadcast
        buf.index_put_((batch, index[None, :]), rows.to(buf.dtype))  # scatter_nd into the state
        self._mark(name)
        return buf.to(self.ring_dtype if name in ("k", "v") else torch.float32)


class TitansCoreMLStep(nn.Module):
    """The calls of a TitansModel over states that live in fp16 buffers updated in place."""

    kind = "recurrent"  # the state is fixed-size and carried whole; no length limit, no mask
    input_names = ("input_ids", "position")
    output_names = ("logits",)
    input_dtypes: ClassVar[dict[str, str]] = {"input_ids": "int32", "position": "int32"}
    required_ops = ("read_state", "write_state", "scaled_dot_product_attention")
    prefill_exact = True  # prefill takes exactly prefill_len tokens at a multiple of prefill_len
    # fp32 compute for the neural memory's state math (closed-form gradient, chunk update, retrieval through
    # the memory MLP, the W_0 + keep * state reads of memory.stored_read) but not its input/output
    # projections (linear), and for the RoPE angles: position * frequency loses whole radians in fp16 past a
    # few hundred positions.
    fp32_compute: ClassVar[dict] = {
        "code": ("titans/memory.py",),
        "except_ops": ("linear",),
        "angles": True,
    }
    # small parameters coremltools folds into derived consts (expanded, scaled, sliced into linear biases): not
    # stored under their names (the memory's projections are used in row blocks, which the report places)
    folded_params = (
        "persistent_k",
        "persistent_v",
        "qkv_gain",
        "memory.conv",
        "memory.gates.bias",
        "gate_scale",
    )
    # const-name parts compression leaves in fp16: norms, the memory's W_0, gates and per-head gains (small,
    # and they steer what the memory stores), persistent K/V
    keep_float = (
        "norm", "memory_w1", "memory_w2", "memory_gamma", "memory_conv", "gates", "qkv_gain", "persistent",
        "rope",
    )  # fmt: skip

    def __init__(self, model: nn.Module, max_len: int | None = None, prefill_len: int | None = None):
        super().__init__()
        self.model = model
        cfg = model.config
        self.chunk = cfg.mem_chunk
        self.prefill_len = cfg.mem_chunk  # fixed by the memory: chunk prefill only (requested length ignored)
        self.context_length = cfg.context_length  # the trained length; the state allows more
        self.max_len = max_len or cfg.context_length  # recorded for the manifest; the graph has no limit
        self.window = cfg.window
        self.call_kind: StepKind | None = None  # set on the copies function() returns; None: by position
        self.state_names: list[str] = []
        for name, shape, _ in model.state_spec(1)[1:]:
            key = name.replace(".", "_")
            self.register_buffer(key, torch.zeros(shape))  # fp32 here; Core ML stores every state in fp16
            self.state_names.append(key)

    def reset(self) -> None:
        for name in self.state_names:
            getattr(self, name).zero_()

    def forward(self, input_ids: Tensor, position: Tensor) -> Tensor:
        """input_ids (1, T) int32 (T = 1 or mem_chunk), position (1,) int32 -> logits (1, T, V)."""
        m = self.model
        pos, T = position.to(torch.int64), input_ids.shape[1]
        kinds = m.kinds(long=False)  # no long prefill: prompts go in memory chunks
        kind = self.call_kind or pick_kind(kinds, int(pos[0]), T)  # eager: from the position's value
        ring_dtype = m.embed.weight.dtype
        ios = [CoreMLIO(self, i, pos, ring_dtype) for i in range(len(m.layers))]
        ctx = m.ctx(pos, T, kind)
        ctx.refresh_persistent = True  # a state Core ML creates holds zeros
        logits = m._run(input_ids.to(torch.int64), ctx, ios)
        zero = pos * 0  # an int index (a zeros() const would be typed float)
        for io in ios:  # every function must write every state to carry it: one element, with itself
            for name in sorted(set(io.buffers) - set(io.written)):
                buf = io.buffers[name]
                corner = (zero,) * buf.ndim
                buf.index_put_(corner, buf[corner] * 1)
        return logits

    # -- what the exporter reads

    def functions(self) -> dict[str, tuple[tuple[Tensor, Tensor], None]]:
        """Function name -> (example inputs, dynamic shapes): all fixed."""
        out = {}
        for k in self.model.kinds(long=False):
            ids = torch.zeros(1, k.tokens, dtype=torch.int32)
            out[k.name] = ((ids, torch.tensor([k.every - k.tokens], dtype=torch.int32)), None)
        return out

    def function(self, name: str) -> TitansCoreMLStep:
        """The module to convert for function `name`: this wrapper (same model, same buffers) fixed to that
        kind of call."""
        step = copy.copy(self)  # shares parameters and buffers
        step.call_kind = next(k for k in self.model.kinds(long=False) if k.name == name)
        return step

    def step_table(self) -> list[dict[str, Any]]:
        """Which function serves which call (manifest `steps`)."""
        return [
            {"function": k.name, "tokens": k.tokens, "every": k.every} for k in self.model.kinds(long=False)
        ]

    def feeds(self, ids: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """forward's inputs for tokens `ids` (1, T) at positions start..start+T-1."""
        return ids.to(torch.int32), torch.tensor([start], dtype=torch.int32)

    def check_plan(self) -> list[tuple[int, int]]:
        """(start, tokens) calls the export check runs against the parallel forward: chunk prefills past the
        attention window (the ring wraps, a mac segment ends) and over more than two memory chunks, decode
        across a chunk end, a prefill after decoding, decode again."""
        C = self.chunk
        n_pre = max(2, math.ceil(self.window / C)) + 1
        plan = [(j * C, C) for j in range(n_pre)]
        at = n_pre * C
        plan += [(at + t, 1) for t in range(C)]  # one whole chunk token by token
        plan.append((at + C, C))
        plan += [(at + 2 * C + t, 1) for t in range(3)]
        return plan

    def check_program(self, program: Any) -> list[str]:
        """Problems with a converted program: its decode function (a token inside a chunk) must write at most
        a few rows of any state (no per-token rewrite of the memory)."""
        if "decode" not in program.functions or self.chunk == 1:
            return []
        cfg = self.model.config
        rows = cfg.n_persistent + max(2, cfg.mem_conv - 1)  # its ring rows, or the conv state's k-1 rows
        problems = []
        for name, (written, size, last) in state_writes(program.functions["decode"]).items():
            if written > max(1, rows * last) and written * 2 > size:
                problems.append(f"decode rewrites {written} of the {size} values of state {name} per token")
        return problems

    def session_layout(self) -> dict[str, Any]:
        """How a session file (kititans/runtimes/session.py, the torch state layout) maps onto the package's
        states, for the manifest: canonical name -> state name and shape, which states hold their change from
        W_0 (`relative`, rebuilt with memory_base()), and the chunk and segment sizes the keep factors use."""
        spec = self.model.state_spec(1)
        states = {n: n.replace(".", "_") for n, _, _ in spec[1:]}
        relative = [n for n in states if n.rsplit(".", 1)[1].removeprefix("seg_") in MEMORY_WEIGHTS]
        return {
            "layout": {n: list(shape) for n, shape, _ in spec},
            "states": states,
            "relative": relative,
            "chunk": self.chunk,
            "segment": self.window,
        }

    def memory_base(self) -> dict[str, Tensor]:
        """W_0 (fp32, batch 1) of every state the package stores as its change from W_0, by canonical name."""
        out = {}
        for name in self.session_layout()["relative"]:
            i, key = name.split(".")[1], name.rsplit(".", 1)[1].removeprefix("seg_")
            memory = self.model.layers[int(i)].memory
            w0 = dict(zip(memory.weight_names(), memory.initial_weights()))[key]
            out[name] = w0.detach().float().unsqueeze(0).clone()  # seg_* and the weights: one W_0, two copies
        return out

    def fp16_state_copy(self) -> nn.Module:
        """This wrapper with the package's fp16 state storage (fp32 compute): what fp16 states alone cost."""
        step = copy.deepcopy(self)
        for name in step.state_names:
            setattr(step, name, getattr(step, name).half())
        return step

    def fp16_copy(self) -> nn.Module:
        """A torch stand-in for the package's numerics: the model in fp16 except what stays fp32 in the
        graph (the memory path casts to fp32 itself; the RoPE frequencies are kept fp32 here)."""
        step = self.fp16_state_copy()
        inv_freq = step.model.rope_inv_freq.float()
        step.model.half()
        step.model.rope_inv_freq = inv_freq
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


def state_writes(function: Any) -> dict[str, tuple[int, int, int]]:
    """Per state written by a MIL function: (values one call writes, the state's size, its last dim). A write
    whose value is a slice_update or scatter_nd of the state writes only its update."""
    producers = {out.name: op for op in function.operations for out in op.outputs}
    out: dict[str, tuple[int, int, int]] = {}
    for op in function.operations:
        if op.op_type not in ("coreml_update_state", "write_state"):
            continue
        state = op.inputs.get("state", op.inputs.get("input"))
        value = op.inputs.get("value", op.inputs.get("data"))
        shape = [int(d) for d in value.shape]
        size = math.prod(shape)
        written = size
        src = producers.get(value.name)
        while src is not None and src.op_type in ("slice_update", "scatter_nd", "cast"):
            if src.op_type == "cast":
                src = producers.get(src.inputs["x"].name)
                continue
            update = src.inputs["update"] if src.op_type == "slice_update" else src.inputs["updates"]
            written = math.prod(int(d) for d in update.shape)
            inner = producers.get(update.name)  # a slice_update of a slice: only its own update is new
            if inner is None or inner.op_type != "slice_update":
                break
            src = inner
        name = state.name
        prev = out.get(name, (0, size, shape[-1]))
        out[name] = (prev[0] + written, size, shape[-1])
    return out
