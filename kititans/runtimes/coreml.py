"""The CoreML runtime (macOS 15+): a multifunction .mlpackage from kititans.export.coreml.

One `MLState` holds the KV cache; the `prefill` function takes chunks of up to prefill_len tokens and the
`decode` function one token, both reading and writing the same state. Core ML runs only on Apple systems:
elsewhere the runtime refuses with the reason (the export validates packages on Linux instead).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kititans.errors import KititansError
from kititans.quantize.coreml import coremltools
from kititans.runtimes.onnx import find_codec

MASK_FILL = -1e4  # as the export documents: exp underflows to 0 in fp16, no row can become NaN


def causal_mask(seq: int, end: int) -> np.ndarray:
    """(1, 1, seq, end) fp16: query i (at position end-seq+i) sees keys 0..end-seq+i."""
    q = np.arange(end - seq, end)[:, None]
    allowed = np.arange(end)[None, :] <= q
    return np.where(allowed, 0.0, MASK_FILL).astype(np.float16)[None, None]


def compute_units(ct: Any, device: str) -> Any:
    units = {
        "cpu": ct.ComputeUnit.CPU_ONLY,
        "gpu": ct.ComputeUnit.CPU_AND_GPU,
        "mps": ct.ComputeUnit.CPU_AND_GPU,
        "ane": ct.ComputeUnit.CPU_AND_NE,
        "auto": ct.ComputeUnit.ALL,
        "all": ct.ComputeUnit.ALL,
    }
    if device not in units:
        raise KititansError(f"the coreml runtime runs on {', '.join(units)}, not {device!r}")
    return units[device]


class CoreMLRuntime:
    name = "coreml"

    def __init__(self, path: Path, device: str = "auto", **_: Any):
        if platform.system() != "Darwin":
            raise KititansError(
                f"CoreML models run only on macOS 15 / iOS 18 or newer, not on {platform.system()}; "
                "on Linux the export validates the package (see its .json manifest)"
            )
        ct = coremltools(purpose="the CoreML runtime")
        self.path = Path(path)
        manifest_file = self.path.with_name(self.path.name + ".json")
        info = json.loads(manifest_file.read_text()).get("coreml", {}) if manifest_file.is_file() else {}
        units = compute_units(ct, device)
        try:
            self.decode = ct.models.MLModel(str(self.path), compute_units=units, function_name="decode")
            self.prefill = ct.models.MLModel(str(self.path), compute_units=units, function_name="prefill")
        except Exception as e:
            raise KititansError(f"{self.path}: Core ML cannot load it ({str(e).splitlines()[0]})") from None
        ranges = {i.name: i for i in self.prefill.get_spec().description.input}
        seq_range = ranges["input_ids"].type.multiArrayType.shapeRange.sizeRanges
        end_range = ranges["causal_mask"].type.multiArrayType.shapeRange.sizeRanges
        self.prefill_len = int(info.get("prefill_len") or seq_range[1].upperBound)
        self.context_length = int(info.get("max_len") or end_range[3].upperBound)
        self.codec = find_codec(self.path)
        self.vocab_size = self.codec.vocab_size
        self.state: Any = None
        self._n = 0

    @property
    def n_past(self) -> int:
        return self._n

    def reset(self) -> None:
        self.state = self.decode.make_state()  # one state, used by both functions
        self._n = 0

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        if self.state is None:
            self.reset()
        ids = [int(i) for i in ids]
        if self._n + len(ids) > self.context_length:
            raise KititansError(
                f"{self._n + len(ids)} tokens exceed the model's context of {self.context_length}"
            )
        outs = []
        for at in range(0, len(ids), self.prefill_len):
            chunk = ids[at : at + self.prefill_len]
            model = self.decode if len(chunk) == 1 else self.prefill
            end = self._n + len(chunk)
            feed = {"input_ids": np.array([chunk], np.int32), "causal_mask": causal_mask(len(chunk), end)}
            outs.append(np.asarray(model.predict(feed, state=self.state)["logits"])[0])  # (T, V)
            self._n = end
        logits = np.concatenate(outs).astype(np.float32)
        return logits if all_logits else logits[-1]
