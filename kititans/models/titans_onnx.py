"""The Titans ONNX step: `TitansModel.step` with every memory and attention state tensor as a graph input
(`past_<name>`) and output (`present_<name>`), fixed shapes (batch 1), research/titans.md §4.5-4.6.

Two graphs share the state layout, so a runtime hands one's outputs to the other as they are:
  model.onnx    decode: input_ids (1, 1)
  prefill.onnx  chunk prefill: input_ids (1, mem_chunk); the state's position must be a multiple of
                mem_chunk, so a prompt goes in mem_chunk-sized calls and its remainder token by token.
The state (pos, K/V rings of the window, memory weights, momentum, open-chunk gradient accumulator and gate
sums) never grows, so a Titans ONNX model decodes past its training length at constant cost.

The exporter reads only the attributes below (see kititans/models/lite_export.py for the contract); `graphs`
is what makes it export more than one file.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kititans.models.lite_export import StateSpec


class TitansOnnxStep(nn.Module):
    """Decode / chunk-prefill step of a TitansModel over an explicit, fixed-shape state."""

    kind = "recurrent"  # the state is carried whole from call to call; it has no attention_mask/positions

    def __init__(self, model: nn.Module, fused: bool = True):
        super().__init__()
        self.model = model
        self.opset = 18  # the step is plain tensor algebra: no opset-23 fused ops to gain (fused is ignored)
        self.chunk = model.config.mem_chunk
        self.context_length = model.config.context_length  # the trained length; the state allows more
        self.states = [
            StateSpec(f"past_{n}", f"present_{n}", tuple(shape), None, str(dtype).removeprefix("torch."))
            for n, shape, dtype in model.state_spec(1)
        ]
        self.input_names = ["input_ids", *(s.input for s in self.states)]
        self.output_names = ["logits", *(s.output for s in self.states)]

    def graphs(self) -> dict[str, tuple[tuple[Tensor, ...], None]]:
        """File name -> (example inputs, dynamic shapes): every shape is fixed."""
        return {
            "model.onnx": (self.example_inputs(1, 1), None),
            "prefill.onnx": (self.example_inputs(1, self.chunk), None),
        }

    def example_inputs(self, batch: int = 1, seq: int = 1, past: int = 0) -> tuple[Tensor, ...]:
        m = self.model
        ids = torch.zeros(batch, seq, dtype=torch.long, device=m.embed.weight.device)
        return (ids, *m.state_to_tensors(m.new_state(batch)))

    def initial_state(self) -> dict[str, Tensor]:
        """past_<name> -> the state a sequence starts from (rings empty, memory at its learned W_0)."""
        tensors = self.example_inputs(1, 1)[1:]
        return {s.input: t.detach().contiguous() for s, t in zip(self.states, tensors, strict=True)}

    def dynamic_shapes(self) -> None:
        return None

    def forward(self, input_ids: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        return self.model.step(input_ids, *state)
