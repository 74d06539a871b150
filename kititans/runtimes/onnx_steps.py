"""The step graphs of a recurrent (Titans) ONNX export over one fixed-size state, for runtimes/onnx.py: the
state a sequence starts from (the memory's learned W_0) and the graphs each call picks from the manifest's
"steps" table; plus the session loading and element types the runtime shares with them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kititans.errors import KititansError
from kititans.runtimes.base import pick_step

NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
MODEL_FILE = "model.onnx"


def open_session(ort: Any, file: Path, so: Any, providers: list[Any]) -> Any:
    """An onnxruntime InferenceSession of `file`; one error line when onnxruntime cannot load it."""
    try:
        return ort.InferenceSession(str(file), so, providers=providers)
    except Exception as e:
        raise KititansError(f"{file}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None


def initial_state(folder: Path, info: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The state a sequence starts from, when it is not all zeros (Titans: the memory's learned W_0)."""
    name = info.get("initial_state")
    if not name:
        return None
    from safetensors.numpy import load_file

    try:
        return load_file(str(folder / name))
    except Exception as e:
        raise KititansError(f"{folder / name}: unreadable initial state ({e}): re-export the model") from None


class StepGraphs:
    """Several step graphs over one state (manifest "steps"; Titans): each entry names its file, the tokens a
    call takes, `every` (it serves calls whose position + tokens is a multiple of it; of those that fit, the
    largest), the state it reads and writes, and the outputs that may share their input's buffer
    (`inplace`: a ring row written by a scatter, so the ring is updated where it lies instead of copied).
    A state tensor a graph does not write keeps its value; only the logits come back to the host."""

    def __init__(
        self, ort: Any, folder: Path, info: dict[str, Any], so: tuple, providers: list[Any], first: Any
    ):
        """so: the session options of (prefill graphs, single-token graphs)."""
        self.device_id = 0  # the GPU index of cuda:N (OnnxRuntime sets it)
        self.table = list(info["steps"])

        def session(row: dict[str, Any]) -> Any:
            if row["file"] == MODEL_FILE:
                return first
            return open_session(
                ort, folder / row["file"], so[1] if int(row["tokens"]) == 1 else so[0], providers
            )

        self.sessions = {row["file"]: session(row) for row in self.table}
        self.bindings = {f: s.io_binding() for f, s in self.sessions.items()}
        self.past = {s["output"]: s["input"] for s in info["states"]}
        self.types = {
            i.name: NP_TYPES.get(i.type, np.float32) for s in self.sessions.values() for i in s.get_inputs()
        }
        self.sizes = sorted({int(row["tokens"]) for row in self.table}, reverse=True)
        self.max_tokens = self.sizes[0]
        self._ids = np.zeros((1, self.max_tokens), np.int64)
        self._position = np.zeros(1, np.int64)
        self.state: dict[str, Any] = {}

    def reset(self, start: dict[str, np.ndarray], device: str) -> None:
        import onnxruntime as ort

        # copies: a ring written in place must not write into the initial state
        self.state = {
            n: ort.OrtValue.ortvalue_from_numpy(np.array(a, copy=True), device, self.device_id)
            for n, a in start.items()
        }

    def run(self, ids: Sequence[int], pos: int, device: str, out: np.ndarray) -> np.ndarray:
        """One call at position `pos`; logits (T, V) (a view of `out` when T == 1)."""
        row, T = pick_step(self.table, len(ids), pos), len(ids)
        session, io = self.sessions[row["file"]], self.bindings[row["file"]]
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        self._ids[0, :T] = ids
        self._position[0] = pos
        io.bind_input("input_ids", "cpu", 0, np.int64, [1, T], self._ids.ctypes.data)
        io.bind_input("position", "cpu", 0, np.int64, [1], self._position.ctypes.data)
        for name in row["inputs"][2:]:
            io.bind_ortvalue_input(name, self.state[name])
        if T == 1:
            io.bind_output("logits", "cpu", 0, out.dtype, list(out.shape), out.ctypes.data)
        else:
            io.bind_output("logits", "cpu")
        inplace = set(row.get("inplace", []))
        for name in row["outputs"][1:]:
            if name in inplace:  # written where it lies: bound to the input's own buffer
                v = self.state[self.past[name]]
                io.bind_output(
                    name, device, self.device_id, self.types[self.past[name]], v.shape(), v.data_ptr()
                )
            else:
                io.bind_output(name, device, self.device_id)
        session.run_with_iobinding(io)
        outs = io.get_outputs()
        for name, v in zip(row["outputs"][1:], outs[1:]):
            if name not in inplace:
                self.state[self.past[name]] = v
        return out[0] if T == 1 else outs[0].numpy()[0]
