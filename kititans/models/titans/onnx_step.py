"""The Titans ONNX steps: one graph per kind of call (`TitansModel.kinds()`), each reading only the state it needs
and returning only the state it changes (research/titans.md §4.5-4.6). Batch 1, fixed shapes.

  model.onnx               a token inside a memory chunk: writes its K/V ring rows and its row of the memory
                           buffer (its normalised input; and the query conv state); reads the memory weights
                           through its query rows alone, changes none
  decode_close.onnx        the token that closes a chunk: the chunk's update (the buffered rows and its own
                           projected in one matmul, the closed form over them), then its read; returns the new
                           weights and momentum
  prefill.onnx             a whole chunk at a chunk boundary (prompt processing)
  decode_segment.onnx,     mac only: as decode_close / prefill, for the call that also closes a segment (it
  prefill_segment.onnx     also returns the segment-start weights the next segment's h reads)
Every graph takes input_ids (1, T) int64 and position (1,) int64, the position of its first token; state
tensors are `past_<name>` inputs and `present_<name>` outputs. The runtime picks the graph from the position
(manifest `steps`: tokens, every: the graph whose `every` divides position + tokens, the largest), and a graph
called at a position that is not its own returns NaN logits rather than silently wrong ones. A ring write
is one ScatterND on the ring's only consumer, so a runtime may bind that output to the input's own buffer
(manifest `inplace`): the ring is then written in place, not copied. Attention, RoPE and the norms use the
opset-23 fused ops (Attention, RotaryEmbedding, RMSNormalization), as Lite's graph does (`--opset 18`:
plain ops for older runtimes).

The exporter reads the attributes below (see kititans/models/lite_export.py for the contract); `graphs` is
what makes it export one file per kind and `step_table` what tells the runtime which to call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kititans.models.lite_export import StateSpec


def graph_file(kind_name: str) -> str:
    return "model.onnx" if kind_name == "decode" else f"{kind_name}.onnx"


class _KindStep(nn.Module):
    """One kind's graph: (input_ids, position, *its past tensors) -> (logits, *its present tensors)."""

    def __init__(self, parent: TitansOnnxStep, kind):
        super().__init__()
        self.model = parent.model
        self.kind = kind
        self.opset, self.fused = parent.opset, parent.fused
        self.names = parent.names  # state names in state_spec order (without pos)
        self.reads: list[str] = []
        self.writes: list[str] = []
        self.kinds = parent.model.kinds()

    def _layers(self, state: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """{"layers.{i}.{key}": t} -> per layer {key: t}."""
        layers: list[dict[str, Tensor]] = [{} for _ in self.model.layers]
        for name, t in state.items():
            i, key = name.split(".", 2)[1:]
            layers[int(i)][key] = t
        return layers

    def run(self, input_ids: Tensor, position: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict]:
        logits, ios = self.model.step_io(
            input_ids, position, self._layers(state), self.kind, fused=self.fused
        )
        new = {f"layers.{i}.{k}": io.tensors[k] for i, io in enumerate(ios) for k in io.written}
        return logits, new

    def discover(self, example_state: dict[str, Tensor]) -> None:
        """Which state tensors this kind reads and writes (run once in eager on example inputs)."""
        ids = torch.zeros(1, self.kind.tokens, dtype=torch.long)
        pos = torch.tensor([self.kind.every - self.kind.tokens], dtype=torch.int64)
        with torch.no_grad():
            _, ios = self.model.step_io(ids, pos, self._layers(example_state), self.kind)
        read = {f"layers.{i}.{k}" for i, io in enumerate(ios) for k in io.read}
        written = {f"layers.{i}.{k}" for i, io in enumerate(ios) for k in io.written}
        self.reads = [n for n in self.names if n in read]
        self.writes = [n for n in self.names if n in written]

    def forward(self, input_ids: Tensor, position: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        logits, new = self.run(input_ids, position, dict(zip(self.reads, past, strict=True)))
        return (self.guard(logits, position), *(new[n] for n in self.writes))

    def guard(self, logits: Tensor, position: Tensor) -> Tensor:
        """NaN logits when this graph is not the one for `position` (a misaligned prefill, a chunk-closing
        graph inside a chunk, ...): a wrong call shows instead of decoding garbage."""
        k = self.kind
        end = position + k.tokens
        checks = []
        if k.every > 1:
            checks.append(torch.remainder(end, k.every) == 0)
        if k.tokens > 1:
            checks.append(torch.remainder(position, k.tokens) == 0)
        # a kind with the same size and a larger period would take this position; of those periods only the
        # ones no smaller one divides need a check (off a chunk boundary is off a segment boundary too)
        larger: list[int] = []
        for e in sorted(o.every for o in self.kinds if o.tokens == k.tokens and o.every > k.every):
            if all(e % f for f in larger):
                larger.append(e)
                checks.append(torch.remainder(end, e) != 0)
        if not checks:
            return logits
        ok = checks[0]
        for c in checks[1:]:
            ok = ok & c
        return torch.where(ok, logits, torch.full_like(logits, float("nan")))


class TitansOnnxStep(nn.Module):
    """The set of Titans step graphs over one fixed-size state (batch 1)."""

    kind = "recurrent"  # the state is carried whole from call to call; it has no attention_mask/positions

    def __init__(self, model: nn.Module, fused: bool = True):
        super().__init__()
        self.fused = fused  # opset 23: Attention, RotaryEmbedding, RMSNormalization; else opset-18 primitives
        self.opset = 23 if fused else 18
        self.model = model.fuse_for_inference()  # the export copy: one matmul for memory projections + gates
        cfg = model.config
        self.chunk = cfg.mem_chunk
        self.context_length = cfg.context_length  # the trained length; the state allows more
        spec = model.state_spec(1)[1:]  # without pos: the position is an input
        self.names = [n for n, _, _ in spec]
        self.states = [
            StateSpec(f"past_{n}", f"present_{n}", tuple(shape), None, str(dtype).removeprefix("torch."))
            for n, shape, dtype in spec
        ]
        example = dict(zip(self.names, self.model.state_to_tensors(self.model.new_state(1))[1:]))
        self.steps: dict[str, _KindStep] = {}
        for k in self.model.kinds():
            step = _KindStep(self, k)
            step.discover(example)
            self.steps[graph_file(k.name)] = step
        first = self.steps["model.onnx"]
        self.input_names = ["input_ids", "position", *(f"past_{n}" for n in first.reads)]
        self.output_names = ["logits", *(f"present_{n}" for n in first.writes)]

    def graphs(self) -> dict[str, dict]:
        """File name -> what the exporter traces: the module, its example inputs, graph input/output names."""
        init = self.initial_state()
        out = {}
        for file, step in self.steps.items():
            ids = torch.zeros(1, step.kind.tokens, dtype=torch.long)
            pos = torch.tensor([step.kind.every - step.kind.tokens], dtype=torch.int64)
            out[file] = {
                "module": step,
                "example": (ids, pos, *(init[f"past_{n}"] for n in step.reads)),
                "dynamic_shapes": None,
                "inputs": ["input_ids", "position", *(f"past_{n}" for n in step.reads)],
                "outputs": ["logits", *(f"present_{n}" for n in step.writes)],
            }
        return out

    def step_table(self) -> list[dict]:
        """What the runtime needs to pick and drive each graph (recorded in the manifest as `steps`)."""
        table = []
        for file, step in self.steps.items():
            rings = {
                n for n in step.writes if n.rsplit(".", 1)[1] in ("k", "v", "buf") and step.kind.tokens == 1
            }
            table.append(
                {
                    "file": file,
                    "name": step.kind.name,
                    "tokens": step.kind.tokens,
                    "every": step.kind.every,
                    "inputs": ["input_ids", "position", *(f"past_{n}" for n in step.reads)],
                    "outputs": ["logits", *(f"present_{n}" for n in step.writes)],
                    # ring / buffer rows written by one ScatterND: the output may share the input's buffer
                    "inplace": [f"present_{n}" for n in step.writes if n in rings],
                }
            )
        return table

    def example_inputs(self, batch: int = 1, seq: int = 1, past: int = 0) -> tuple[Tensor, ...]:
        step = self.steps["model.onnx"]
        init = self.initial_state()
        return (
            torch.zeros(1, 1, dtype=torch.long),
            torch.zeros(1, dtype=torch.int64),
            *(init[f"past_{n}"] for n in step.reads),
        )

    def initial_state(self) -> dict[str, Tensor]:
        """past_<name> -> the state a sequence starts from (rings with their persistent rows, memory at W_0)."""
        tensors = self.model.state_to_tensors(self.model.new_state(1))[1:]
        return {s.input: t.detach().contiguous() for s, t in zip(self.states, tensors, strict=True)}

    def dynamic_shapes(self) -> None:
        return None

    def forward(self, input_ids: Tensor, position: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        return self.steps["model.onnx"](input_ids, position, *state)
