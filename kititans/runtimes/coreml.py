"""The CoreML runtime (macOS 15+): a multifunction .mlpackage from kititans.export.coreml.

One `MLState` holds the model's state; the `prefill` function takes a chunk of tokens and `decode` one token,
both reading and writing the same state. The manifest says how to drive them:
  kv_cache (Lite)       input_ids + causal_mask; prefill chunks of 1..prefill_len tokens at any position, up
                        to max_len positions in all
  recurrent (Titans)    input_ids + position; prefill exactly prefill_len (= mem_chunk) tokens at a multiple of
                        it, every other token through decode; a fixed-size state, so no length limit
Core ML runs only on Apple systems: elsewhere the runtime refuses with the reason (the export validates
packages on Linux instead).
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
from kititans.runtimes.base import export_session_identity, pick_step, plan_chunks
from kititans.runtimes.onnx import find_codec

MASK_FILL = -1e4  # as the export documents: exp underflows to 0 in fp16, no row can become NaN


def causal_mask(seq: int, end: int) -> np.ndarray:
    """(1, 1, seq, end) fp16: query i (at position end-seq+i) sees keys 0..end-seq+i."""
    q = np.arange(end - seq, end)[:, None]
    allowed = np.arange(end)[None, :] <= q
    return np.where(allowed, 0.0, MASK_FILL).astype(np.float16)[None, None]


# compute units by the names a bench row uses (cpu, cpu+gpu, cpu+ane, all) and their short aliases
UNITS = {
    "cpu": "CPU_ONLY",
    "cpu+gpu": "CPU_AND_GPU",
    "cpu+ane": "CPU_AND_NE",
    "all": "ALL",
    "gpu": "CPU_AND_GPU",
    "mps": "CPU_AND_GPU",
    "ane": "CPU_AND_NE",
    "auto": "ALL",
}


def compute_units(ct: Any, device: str) -> Any:
    if device not in UNITS:
        raise KititansError(f"the coreml runtime runs on {', '.join(UNITS)}, not {device!r}")
    return getattr(ct.ComputeUnit, UNITS[device])


class CoreMLRuntime:
    name = "coreml"

    def embed_batch(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """An encoder package's unit vectors (N, dim), one prediction per text (the package takes batch 1)."""
        if self.task != "embed":
            raise KititansError(f"{self.path} is a language model package: it has no pooled embeddings")
        out = []
        for r in rows:
            ids = np.asarray([list(r)], dtype=np.int32)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            out.append(np.asarray(self.model.predict(feeds)["embedding"], dtype=np.float32).reshape(-1))
        return np.stack(out)

    def __init__(self, path: Path, device: str = "auto", codec: Any = None, **_: Any):
        """`device`: the compute units (UNITS); `codec` replaces the tokenizer lookup."""
        if platform.system() != "Darwin":
            raise KititansError(
                f"CoreML models run only on macOS 15 / iOS 18 or newer, not on {platform.system()}; "
                "on Linux the export validates the package (see its .json manifest)"
            )
        ct = coremltools(purpose="the CoreML runtime")
        self.path = Path(path)
        manifest_file = self.path.with_name(self.path.name + ".json")
        self.manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
        info = self.manifest.get("coreml", {})
        self.session_info = info.get("session")
        self._memory_base: dict[str, np.ndarray] | None = None
        units = compute_units(ct, device)
        self.settings = {"compute_units": UNITS[device], "placement": f"coreml {device}"}
        self.task = "embed" if info.get("kind") == "embed" else "lm"
        if self.task == "embed":  # an encoder package: one stateless function (export/coreml_embed.py)
            self.model = ct.models.MLModel(str(self.path), compute_units=units)
            self.context_length = int(info.get("max_len") or 0)
            self.codec = codec or find_codec(self.path)
            return
        # several functions over one state (manifest "steps"): tokens, every; else decode + prefill
        self.steps = list(info.get("steps") or [])
        names = [row["function"] for row in self.steps] or ["decode", "prefill"]
        try:
            self.functions = {
                n: ct.models.MLModel(str(self.path), compute_units=units, function_name=n) for n in names
            }
        except Exception as e:
            raise KititansError(f"{self.path}: Core ML cannot load it ({str(e).splitlines()[0]})") from None
        self.decode = self.functions["decode"]
        self.prefill = self.functions.get("prefill", self.decode)
        inputs = {i.name: i.type.multiArrayType for i in self.prefill.get_spec().description.input}
        self.inputs = list(info.get("inputs") or inputs)  # manifests before "inputs" are Lite's
        self.recurrent = info.get("kind") == "recurrent"
        self.prefill_exact = bool(info.get("prefill_exact"))
        seq = inputs["input_ids"]
        self.prefill_len = int(
            info.get("prefill_len")
            or (seq.shapeRange.sizeRanges[1].upperBound if seq.shapeRange.sizeRanges else seq.shape[1])
        )
        if "context_length" in info:
            self.context_length = int(info["context_length"])
        else:
            self.context_length = int(
                info.get("max_len") or inputs["causal_mask"].shapeRange.sizeRanges[3].upperBound
            )
        self.codec = codec or find_codec(self.path)
        self.vocab_size = self.codec.vocab_size
        self.state: Any = None
        self._n = 0

    @property
    def n_past(self) -> int:
        return self._n

    def reset(self) -> None:
        self.state = self.decode.make_state()  # one state, used by both functions
        self._n = 0

    # several sequences: one MLState each, stepped in turn, one token at a time (kititans.runtimes.base)
    def save_state(self) -> Any:
        return self.state, self._n

    def load_state(self, state: Any) -> None:
        self.state, self._n = state

    def sequences(self, max_sequences: int = 16) -> Any:
        from kititans.runtimes.base import InTurn

        return InTurn(self, max_sequences)

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        if self.state is None:
            self.reset()
        ids = [int(i) for i in ids]
        if not self.recurrent and self._n + len(ids) > self.context_length:
            raise KititansError(
                f"{self._n + len(ids)} tokens exceed the model's context of {self.context_length}"
            )
        outs = []
        sizes = [int(row["tokens"]) for row in self.steps]
        for chunk in plan_chunks(ids, self._n, self.prefill_len, self.prefill_exact, sizes):
            model = self.decode if len(chunk) == 1 else self.prefill
            if self.steps:
                model = self.functions[pick_step(self.steps, len(chunk), self._n)["function"]]
            feed = make_feeds(self.inputs, chunk, self._n)
            outs.append(np.asarray(model.predict(feed, state=self.state)["logits"])[0])  # (T, V)
            self._n += len(chunk)
        logits = np.concatenate(outs).astype(np.float32)
        return logits if all_logits else logits[-1]

    # -- sessions (kititans/runtimes/session.py): the package's fp16 states <-> the torch state layout

    def session_identity(self) -> dict[str, Any]:
        if not getattr(self, "recurrent", False) or not self.session_info:
            raise KititansError(
                f"{self.path}: this package keeps no session layout (a KV cache, or exported before "
                "sessions): re-export a Titans run"
            )
        return export_session_identity(self, self.session_info["layout"])

    def _base(self) -> dict[str, np.ndarray]:
        if self._memory_base is None:
            from safetensors.numpy import load_file

            self._memory_base = load_file(str(self.path.with_name(self.session_info["memory_base"])))
        return self._memory_base

    def get_state(self) -> dict[str, np.ndarray]:
        if self.state is None:
            self.reset()
        read = {n: np.asarray(self.state.read_state(n)) for n in self.session_info["states"].values()}
        return canonical_from_coreml(read, self._n, self.session_info, self._base())

    def set_state(self, tensors: dict[str, np.ndarray]) -> None:
        self.reset()
        for name, value in coreml_from_canonical(tensors, self.session_info, self._base()).items():
            self.state.write_state(name, value)
        self._n = int(np.asarray(tensors["pos"]).reshape(-1)[0])


def _keep(name: str, shape: tuple[int, ...], pos: int, info: dict[str, Any]) -> np.ndarray | float:
    """The factor the package reads a stored state with (coreml_step.CoreMLIO._keep): 0 for what belongs to
    an earlier sequence."""
    key = name.rsplit(".", 1)[1]
    if key.startswith("seg_"):
        return float(pos >= info["segment"])
    if key.startswith("s_") or key in ("w1", "w2", "gamma"):
        return float(pos >= info["chunk"])
    if key.startswith("conv"):
        k1, chunk = shape[1], info["chunk"]
        start = pos - pos % chunk if key == "conv" else pos
        return ((start + np.arange(k1) - k1) >= 0).astype(np.float32).reshape(1, k1, 1)
    return 1.0


def canonical_from_coreml(
    read: dict[str, np.ndarray], pos: int, info: dict[str, Any], base: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The package's stored states (by state name) at position `pos` -> the torch layout (fp32)."""
    out = {"pos": np.array([pos], np.int64)}
    for name, state in info["states"].items():
        value = read[state].astype(np.float32) * _keep(name, read[state].shape, pos, info)
        out[name] = value + base[name] if name in base else value
    return out


def coreml_from_canonical(
    tensors: dict[str, np.ndarray], info: dict[str, Any], base: dict[str, np.ndarray], dtype: Any = np.float16
) -> dict[str, np.ndarray]:
    """The torch layout -> the package's stored states (fp16; memory weights as their change from W_0)."""
    out = {}
    for name, state in info["states"].items():
        value = np.asarray(tensors[name], np.float32)
        out[state] = (value - base[name] if name in base else value).astype(dtype)
    return out


def make_feeds(inputs: Sequence[str], chunk: list[int], start: int) -> dict[str, np.ndarray]:
    """The inputs a package lists, for tokens `chunk` at positions start..start+len-1."""
    feed = {"input_ids": np.array([chunk], np.int32)}
    if "causal_mask" in inputs:
        feed["causal_mask"] = causal_mask(len(chunk), start + len(chunk))
    if "position" in inputs:
        feed["position"] = np.array([start], np.int32)
    return feed
