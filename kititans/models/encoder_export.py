"""The encoder's export graph: token ids + attention mask in, the pooled unit vector out, with mean pooling
and L2 normalisation inside the graph, so an app gets the embedding from one session run.

ONNX (kititans/export/onnx.py traces it): inputs `input_ids` (batch, sequence_length) int64 and
`attention_mask` (batch, sequence_length) int64 (1 = token, 0 = padding); outputs `sentence_embedding`
(batch, dim) and `last_hidden_state` (batch, sequence_length, dim): the names sentence-transformers' and
optimum's feature-extraction loaders use. Plain opset-18 ops (no state, nothing to fuse).
"""

from __future__ import annotations

import typing

import torch
from torch import Tensor, nn

from kititans.models.layers import mean_pool
from kititans.models.lite_export import StateSpec


class EncoderOnnxGraph(nn.Module):
    kind = "embed"  # the manifest's graph kind: no state, vectors instead of logits
    opset = 18
    input_names = ("input_ids", "attention_mask")
    output_names = ("sentence_embedding", "last_hidden_state")
    states: tuple[StateSpec, ...] = ()

    def __init__(self, model: nn.Module, fused: bool = False):
        super().__init__()
        self.model = model
        self.context_length = model.config.context_length

    def example_inputs(self, batch: int = 2, seq: int = 5, past: int = 0) -> tuple[Tensor, Tensor]:
        ids = torch.zeros(batch, seq, dtype=torch.long)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[-1, seq - 2 :] = 0  # a padded row, so the trace keeps the mask live
        return ids, mask

    def graphs(self) -> dict[str, tuple[tuple[Tensor, Tensor], tuple]]:
        batch = torch.export.Dim("batch", min=1, max=1024)
        seq = torch.export.Dim("sequence_length", min=2, max=self.context_length)
        shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})
        return {"model.onnx": (self.example_inputs(2, 5), shapes)}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.model.hidden_states(input_ids, attention_mask)
        emb = mean_pool(hidden, attention_mask.bool())
        if self.model.config.normalize:
            emb = emb / emb.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return emb, hidden.float()


class EncoderCoreMLGraph(nn.Module):
    """The same function for CoreML: int32 `input_ids` and `attention_mask` (1, 1..max_len) in, the fp16 unit
    vector `embedding` (1, dim) out; no state. Written by its own exporter module (a stateless program)."""

    kind = "embed"
    exporter = "kititans.export.coreml_embed"
    input_names = ("input_ids", "attention_mask")
    output_names = ("embedding",)
    input_dtypes: typing.ClassVar[dict[str, str]] = {"input_ids": "int32", "attention_mask": "int32"}
    state_names: tuple[str, ...] = ()
    keep_float = ("norm",)  # const-name parts that stay fp16 when compressing (RMSNorm gains)

    def __init__(self, model: nn.Module, max_len: int | None = None, **_: typing.Any):
        super().__init__()
        self.model = model
        self.max_len = min(max_len or model.config.context_length, model.config.context_length)

    def reset(self) -> None:  # no state (the shared converter resets wrappers before tracing)
        return None

    def example(self, seq: int = 8) -> tuple[Tensor, Tensor]:
        ids = torch.zeros(1, seq, dtype=torch.int32)
        mask = torch.ones(1, seq, dtype=torch.int32)
        mask[0, -2:] = 0  # padded tail: the mask stays live in the trace
        return ids, mask

    def dynamic_shapes(self) -> tuple:
        seq = torch.export.Dim("seq", min=2, max=self.max_len)
        return ({1: seq}, {1: seq})

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        keep = attention_mask > 0
        hidden = self.model.hidden_states(input_ids.long(), keep)
        emb = mean_pool(hidden, keep)
        if not self.model.config.normalize:
            return emb
        return emb / emb.norm(dim=-1, keepdim=True).clamp(min=1e-6)
