"""ONNX Runtime runtimes: our exported step graph (`OnnxRuntime`) and onnxruntime-genai (`GenaiRuntime`).

`OnnxRuntime` drives any graph with the past/present contract (ours, or onnxruntime-genai's graph run
as a plain session): IO binding keeps each step's `present` tensors as OrtValues on the provider's device
and binds them as the next step's `past`, so the cache never goes through numpy; only the logits come
back to the host. The state layout comes from the export's manifest.json, or from the names. A recurrent
(Titans) export's several step graphs over one state are onnx_steps.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kititans.errors import KititansError, require
from kititans.runtimes.base import export_session_identity, plan_chunks
from kititans.runtimes.onnx_steps import NP_TYPES, StepGraphs, initial_state, open_session


@dataclass
class State:
    input: str
    output: str
    shape: tuple  # str entries are symbolic
    dtype: Any  # numpy dtype


def find_codec(path: Path) -> Any:
    """The run's Tokenizer: next to the artifact (or in a tokenizer/ folder there) first, then up to the
    run directory (RUN/ for RUN/export/onnx/<quant>/ and RUN/export/model.<quant>.mlpackage)."""
    from kititans.data.tokenizer import Tokenizer

    folder = path if path.is_dir() else path.parent
    for cand in [folder, *folder.parents[:3]]:
        for d in (cand, cand / "tokenizer"):
            if (d / "tokenizer.model").is_file():
                return Tokenizer.load(d)
    raise KititansError(f"no tokenizer.model next to {path} or in its run directory: re-export the model")


def model_file(path: Path) -> Path:
    """A .onnx file, or the model.onnx (or only .onnx) of a folder."""
    if path.is_file():
        return path
    if (path / "model.onnx").is_file():
        return path / "model.onnx"
    found = sorted(path.glob("*.onnx"))
    if len(found) != 1:
        raise KititansError(f"{path}: expected one model.onnx, found {len(found)} .onnx files")
    return found[0]


def device_index(device: str) -> int:
    """N of "cuda:N" (0 for "cuda", "gpu", "auto", "cpu")."""
    if device.startswith("cuda:"):
        index = device.split(":", 1)[1]
        if not index.isdigit():
            raise KititansError(f"--device {device}: expected cuda:N with N a GPU index (0, 1, ...)")
        return int(index)
    return 0


def providers_for(device: str, have: list[str] | None = None) -> list[Any]:
    """CPU, or CUDA (with CPU fallback for the ops it lacks) when asked or, for "auto", when available;
    `cuda:N` runs on GPU N (the CUDA provider's device_id)."""
    if have is None:
        import onnxruntime as ort

        have = ort.get_available_providers()
    if device in ("cuda", "gpu") or device.startswith("cuda:"):
        if "CUDAExecutionProvider" not in have:
            raise KititansError(
                "this onnxruntime has no CUDA provider: pip install onnxruntime-gpu (or use --device cpu)"
            )
        return [("CUDAExecutionProvider", {"device_id": device_index(device)}), "CPUExecutionProvider"]
    if device == "auto" and "CUDAExecutionProvider" in have:
        return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    if device not in ("cpu", "auto"):
        raise KititansError(f"the onnx runtime runs on cpu or cuda, not {device!r}")
    return ["CPUExecutionProvider"]


def session_options(ort: Any, threads: int, spin: bool, stop_spinning: bool = False) -> Any:
    """stop_spinning: the worker threads stop spinning when a run ends (an export of several sessions, each
    with its own pool: an idle session's spinning workers would take the cores from the one running)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    if not spin:  # spinning threads cost more than they save on a busy, shared CPU
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if stop_spinning:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


class OnnxRuntime:
    name = "onnx"

    def __init__(
        self,
        path: Path,
        device: str = "cpu",
        threads: int = 0,
        spin: bool = True,
        info: dict[str, Any] | None = None,
        decode_threads: int | None = None,
        codec: Any = None,
        **_: Any,
    ):
        """`info` is the manifest's "onnx" section (read from manifest.json next to the graph when None).
        `decode_threads`: intra-op threads of a recurrent (Titans) export's single-token graphs; None: 1 (their
        many small ops lose more to thread hand-offs than a second thread gains), while its prefill graphs
        use `threads`. `codec` replaces the tokenizer lookup (a bench pack's runner has ids only)."""
        ort = require("onnxruntime", "onnx", "the ONNX runtime")
        self.path = Path(path)
        self.file = model_file(self.path)
        folder = self.file.parent
        self.manifest: dict[str, Any] = {}
        if (folder / "manifest.json").is_file():
            self.manifest = json.loads((folder / "manifest.json").read_text())
        if info is None:
            info = self.manifest.get("onnx", {})
        info = info or {}
        steps_kind = info.get("kind") == "recurrent" and bool(info.get("steps"))
        so = session_options(ort, threads, spin, stop_spinning=steps_kind)
        providers = providers_for(device)
        self.decode_threads = (1 if decode_threads is None else decode_threads) if steps_kind else threads
        decode_so = (
            session_options(ort, self.decode_threads, spin, steps_kind)
            if self.decode_threads != threads
            else so
        )
        self.session = open_session(ort, self.file, decode_so, providers)
        self.settings = {
            "threads": threads or None,
            "intra_op_spinning": spin,
            "providers": self.session.get_providers(),
            "placement": self.session.get_providers()[0],
        }
        self.task = "embed" if info.get("kind") == "embed" else "lm"  # an encoder: embed_batch, no logits
        if self.task == "embed":
            self.context_length = int(info["context_length"])
            self.codec = codec or find_codec(self.path)
            return
        # a recurrent graph (Titans) carries a fixed-size state and may come with a chunk-prefill graph, or
        # with several step graphs (manifest "steps"), each reading and writing part of the state
        self.recurrent = info.get("kind") == "recurrent"
        prefill = info.get("prefill") or {}
        self.prefill = open_session(ort, folder / prefill["file"], so, providers) if prefill else None
        self.prefill_tokens = int(prefill.get("tokens", 0))
        self.steps = (
            StepGraphs(ort, folder, info, (so, decode_so), providers, self.session) if steps_kind else None
        )
        if self.steps is not None:
            self.prefill_tokens = self.steps.max_tokens
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.device_id = device_index(device) if self.device == "cuda" else 0  # where state OrtValues live
        if self.steps is not None:
            self.steps.device_id = self.device_id
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.states = self._states(info)
        logits = next(o for o in self.session.get_outputs() if o.name == "logits")
        self.vocab_size = int(logits.shape[-1]) if isinstance(logits.shape[-1], int) else 0
        self.context_length = int(info.get("context_length") or self._genai_context())
        self.codec = codec or find_codec(self.path)
        self.vocab_size = self.vocab_size or self.codec.vocab_size
        # host buffers the inputs are bound from by pointer, so a step allocates and copies nothing
        self._ids = np.zeros((1, max(self.context_length, self.prefill_tokens)), np.int64)
        self._mask = np.ones((1, self.context_length), np.int64)
        self._pos = np.arange(self.context_length, dtype=np.int64)[None]
        out_type = NP_TYPES.get(logits.type, np.float32)
        self._logits = np.zeros((1, 1, self.vocab_size), out_type)  # a decode step's logits land here
        self._bindings = {id(x): x.io_binding() for x in (self.session, self.prefill) if x is not None}
        self._initial = initial_state(folder, info)
        self._n = 0
        self._past: list[Any] = []

    def embed_batch(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """An encoder export's unit vectors (N, dim): the rows right-padded together, masked."""
        if self.task != "embed":
            raise KititansError(f"{self.path} is a language model export: it has no pooled embeddings")
        ids = np.zeros((len(rows), max(len(r) for r in rows)), np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        out = self.session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0]
        return np.asarray(out, dtype=np.float32)

    def _states(self, info: dict[str, Any]) -> list[State]:
        dtypes: dict[str, Any] = {}
        if info.get("states"):
            specs = [(s["input"], s["output"], tuple(s["shape"])) for s in info["states"]]
            dtypes = {s["input"]: np.dtype(s.get("dtype", "float32")) for s in info["states"]}
        else:  # the optimum/genai naming convention, (batch, kv_heads, past, head_size)
            genai = self._genai_config().get("decoder", {})
            fixed = {1: genai.get("num_key_value_heads"), 3: genai.get("head_size")}
            specs = []
            for n in (n for n in self.inputs if n.startswith("past_")):
                shape = tuple(
                    d if isinstance(d, int) else ("batch" if a == 0 else fixed.get(a) or "past")
                    for a, d in enumerate(self.inputs[n].shape)
                )
                specs.append((n, n.replace("past_key_values.", "present."), shape))
        if not specs:
            raise KititansError(f"{self.file}: no past_* state inputs: not a decoder step graph")

        def dtype(name: str) -> Any:  # a state the first graph does not read: the manifest says its type
            return NP_TYPES.get(self.inputs[name].type, np.float32) if name in self.inputs else dtypes[name]

        return [State(i, o, shape, dtype(i)) for i, o, shape in specs]

    def _genai_config(self) -> dict[str, Any]:
        cfg = self.file.parent / "genai_config.json"
        return json.loads(cfg.read_text())["model"] if cfg.is_file() else {}

    def _genai_context(self) -> int:
        if "context_length" in self._genai_config():
            return int(self._genai_config()["context_length"])
        raise KititansError(f"{self.file}: no manifest.json saying its context length: re-export the model")

    def zero_state(self, batch: int = 1) -> dict[str, np.ndarray]:
        """The empty cache: batch rows, zero positions (every symbolic dim but the batch is 0)."""

        def shape(dims: tuple) -> tuple[int, ...]:
            return tuple(batch if d == "batch" else 0 if isinstance(d, str) else d for d in dims)

        return {s.input: np.zeros(shape(s.shape), s.dtype) for s in self.states}

    @property
    def n_past(self) -> int:
        return self._n

    def reset(self) -> None:
        import onnxruntime as ort

        if self.steps is not None:
            self.steps.reset(self._initial or self.zero_state(1), self.device)
            self._n = 0
            return
        start = self._initial or self.zero_state(1)
        self._past = [
            ort.OrtValue.ortvalue_from_numpy(start[s.input], self.device, self.device_id) for s in self.states
        ]
        self._n = 0

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Run len(ids) tokens after the cached ones; logits (V,) of the last, or (T, V) of all."""
        if not self._past and (self.steps is None or not self.steps.state):
            self.reset()
        T = len(ids)
        if T == 0:
            raise ValueError("forward needs at least one token")
        if self.recurrent:
            return self._forward_recurrent(list(ids), all_logits)
        if self._n + T > self.context_length:
            raise KititansError(f"{self._n + T} tokens exceed the model's context of {self.context_length}")
        logits = self._run(self.session, ids)
        return (logits if all_logits else logits[-1]).astype(np.float32)  # a copy: buffers are reused

    def _forward_recurrent(self, ids: list[int], all_logits: bool) -> np.ndarray:
        """A fixed-size state has no length limit; whole memory chunks go through the prefill graph when the
        position is chunk-aligned, every other token through the decode graph."""
        C = self.prefill_tokens if self.prefill is not None or self.steps is not None else 1
        sizes = self.steps.sizes if self.steps is not None else ()
        out = []
        for chunk in plan_chunks(ids, self._n, C, exact=True, sizes=sizes):
            if self.steps is not None:
                logits = self.steps.run(chunk, self._n, self.device, self._logits)
                self._n += len(chunk)
            else:
                logits = self._run(self.prefill if len(chunk) > 1 else self.session, chunk)
            out.append(logits.astype(np.float32) if all_logits else logits)
        return np.concatenate(out) if all_logits else out[-1][-1].astype(np.float32)

    def _run(self, session: Any, ids: Sequence[int]) -> np.ndarray:
        """One call of `session` with the state bound in place; (T, V) logits (a view of a reused buffer
        when T == 1)."""
        T, n = len(ids), self._n
        io = self._bindings[id(session)]
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        self._ids[0, :T] = ids
        io.bind_input("input_ids", "cpu", 0, np.int64, [1, T], self._ids.ctypes.data)
        if "attention_mask" in self.inputs:
            io.bind_input("attention_mask", "cpu", 0, np.int64, [1, n + T], self._mask.ctypes.data)
        if "position_ids" in self.inputs:  # positions n..n+T-1: a window of the arange buffer
            io.bind_input("position_ids", "cpu", 0, np.int64, [1, T], self._pos[:, n:].ctypes.data)
        for s, v in zip(self.states, self._past):
            io.bind_ortvalue_input(s.input, v)
        if T == 1:
            io.bind_output(
                "logits", "cpu", 0, self._logits.dtype, [1, 1, self.vocab_size], self._logits.ctypes.data
            )
        else:
            io.bind_output("logits", "cpu")
        for s in self.states:  # the new state stays on the provider's device and comes back as the next past
            io.bind_output(s.output, self.device, self.device_id)
        session.run_with_iobinding(io)
        outs = io.get_outputs()
        self._past = list(outs[1:])
        self._n = n + T
        return self._logits[0] if T == 1 else outs[0].numpy()[0]

    # -- several sequences (kititans.runtimes.base.Sequences)

    def save_state(self) -> Any:
        return (self.steps.state if self.steps is not None else self._past), self._n

    def load_state(self, state: Any) -> None:
        tensors, self._n = state
        if self.steps is not None:
            self.steps.state = tensors
        else:
            self._past = tensors

    def copy_state(self, state: Any) -> Any:
        import onnxruntime as ort

        tensors, n = state
        copy = lambda v: ort.OrtValue.ortvalue_from_numpy(np.array(v.numpy(), copy=True), self.device, 0)  # noqa: E731
        if isinstance(tensors, dict):
            return {k: copy(v) for k, v in tensors.items()}, n
        return [copy(v) for v in tensors], n

    def sequences(self, max_sequences: int = 16) -> Any:
        """A past/present graph (Lite) batches its sequences along the batch dimension (onnx_batch.py); a
        recurrent graph (Titans: one position input for the whole batch) steps them in turn."""
        from kititans.runtimes.base import InTurn

        if self.recurrent or self.steps is not None or self.prefill is not None:
            return InTurn(self, max_sequences)
        from kititans.runtimes.onnx_batch import OnnxBatch

        return OnnxBatch(self, max_sequences)

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: dict[str, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One batched call of the graph in numpy (tests, batched scoring): logits (B,T,V), new past."""
        if self.recurrent:
            raise KititansError(
                f"{self.file}: a recurrent (Titans) graph has no attention_mask: use forward()"
            )
        past = past if past is not None else self.zero_state(input_ids.shape[0])
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
        if "position_ids" in self.inputs:
            feed["position_ids"] = position_ids.astype(np.int64)
        outs = self.session.run(["logits", *(s.output for s in self.states)], {**feed, **past})
        return outs[0], {s.input: o for s, o in zip(self.states, outs[1:])}

    # -- sessions (kititans/runtimes/session.py): a recurrent export's state by its torch names

    def session_identity(self) -> dict[str, Any]:
        if not getattr(self, "recurrent", False) or self.steps is None:
            raise KititansError(
                f"{self.file}: this export keeps a KV cache that grows with the text: sessions save the "
                "fixed-size state of a Titans export"
            )
        layout = {"pos": [1], **{s.input.removeprefix("past_"): list(s.shape) for s in self.states}}
        return export_session_identity(self, layout)

    def get_state(self) -> dict[str, np.ndarray]:
        """The state by name, "pos" included (arrays may share the runtime's memory: valid until its next
        call)."""
        if not self.steps.state:
            self.reset()
        out = {"pos": np.array([self._n], np.int64)}
        for s in self.states:
            out[s.input.removeprefix("past_")] = self.steps.state[s.input].numpy()
        return out

    def set_state(self, tensors: dict[str, np.ndarray]) -> None:
        start = {s.input: np.asarray(tensors[s.input.removeprefix("past_")], s.dtype) for s in self.states}
        self.steps.reset(start, self.device)
        self._n = int(np.asarray(tensors["pos"]).reshape(-1)[0])


class GenaiRuntime:
    """onnxruntime-genai's own generator loop (shared KV buffer, fused GroupQueryAttention) over a model
    from kititans.export.onnx.export_genai, behind the same Runtime protocol."""

    name = "genai"

    def __init__(
        self,
        path: Path,
        device: str = "cpu",
        threads: int = 0,
        spin: bool = True,
        codec: Any = None,
        **_: Any,
    ):
        og = require("onnxruntime_genai", "genai", "the onnxruntime-genai runtime")
        self.path = Path(path)
        if not (self.path / "genai_config.json").is_file():
            raise KititansError(
                f"{self.path}: no genai_config.json (build one with kititans.export.onnx.export_genai)"
            )
        config = og.Config(str(self.path))
        if device.startswith("cuda"):
            config.clear_providers()
            config.append_provider("cuda")
            if device_index(device):  # cuda:N
                config.set_provider_option("cuda", "device_id", str(device_index(device)))
        session: dict[str, Any] = {"intra_op_num_threads": threads} if threads else {}
        if not spin:  # unknown session_options keys are passed to onnxruntime as config entries
            session["session.intra_op.allow_spinning"] = "0"
        if session:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
        self.model = og.Model(config)
        self._og = og
        info = json.loads((self.path / "genai_config.json").read_text())["model"]
        self.vocab_size = int(info["vocab_size"])
        self.context_length = int(info["context_length"])
        self.codec = codec or find_codec(self.path)
        self.settings = {"threads": threads or None, "intra_op_spinning": spin, "placement": device}
        self.gen: Any = None

    @property
    def n_past(self) -> int:
        return int(self.gen.token_count()) if self.gen is not None else 0

    def reset(self) -> None:
        params = self._og.GeneratorParams(self.model)
        params.set_search_options(max_length=self.context_length, do_sample=False)
        self.gen = self._og.Generator(self.model, params)

    # several sequences: one generator each, stepped in turn (kititans.runtimes.base.InTurn)
    def save_state(self) -> Any:
        return self.gen

    def load_state(self, state: Any) -> None:
        self.gen = state

    def sequences(self, max_sequences: int = 16) -> Any:
        from kititans.runtimes.base import InTurn

        return InTurn(self, max_sequences)

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        if self.gen is None:
            self.reset()
        if self.n_past + len(ids) > self.context_length:
            raise KititansError(
                f"{self.n_past + len(ids)} tokens exceed the model's context of {self.context_length}"
            )
        self.gen.append_tokens([int(i) for i in ids])
        if all_logits:
            return np.asarray(self.gen.get_output("logits"))[0].astype(np.float32)  # (T, V)
        return np.asarray(self.gen.get_logits())[0, -1].astype(np.float32)
