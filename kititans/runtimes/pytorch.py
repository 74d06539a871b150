"""The PyTorch runtime: a run directory's model with its static KV cache (or Titans state)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kititans.checkpoint import load_checkpoint
from kititans.device import DTYPES, resolve_device
from kititans.errors import KititansError
from kititans.runtimes.base import Handles, InTurn

log = logging.getLogger("kititans")


class TorchRuntime:
    name = "torch"

    def __init__(
        self,
        path: Path,
        device: str = "cpu",
        dtype: str = "fp32",
        threads: int = 0,
        compile: bool = False,
        **_: Any,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.ckpt = load_checkpoint(path, device=self.device, dtype=DTYPES[dtype])
        self.model = self.ckpt.model
        if hasattr(self.model, "fuse_for_inference"):
            self.model.fuse_for_inference()
        self.compiled = False
        if compile:  # Titans: one torch.compile'd fixed-shape step per kind of call (models without: eager)
            if hasattr(self.model, "compile_decode"):
                self.model.compile_decode()
                self.compiled = True
            else:
                log.warning(
                    "--compile: the %s family has no compiled decode step; decoding eagerly",
                    self.ckpt.spec.name,
                )
        self.codec = self.ckpt.tokenizer
        self.vocab_size = self.ckpt.config.vocab_size
        self.context_length = self.ckpt.config.context_length
        self.dtype = dtype
        self.task = self.ckpt.spec.task  # "lm": forward() gives logits; "embed": embed_batch() gives vectors
        self.state: Any = None
        self._weights_sha256: str | None = None

    @property
    def batched_decode(self) -> bool:
        """The family decodes several sequences in one pass (`decode_rows`: Lite, Titans); a compiled Titans
        decode keeps its compiled one-sequence steps."""
        return hasattr(self.model, "decode_rows") and not self.compiled

    @property
    def n_past(self) -> int:
        return self.state.pos if self.state is not None else 0

    def reset(self) -> None:
        self.state = self.model.new_state(batch_size=1)

    @torch.inference_mode()
    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        if self.state is None:
            self.reset()
        if len(ids) == 1 and self.batched_decode:
            # one token: the multi-sequence decode with one row, so `kititans generate` and a batched server
            # compute each token the same way (models/lite_batch.py, models/titans/rows.py)
            logits = self.model.decode_rows([int(ids[0])], [self.state], [self.state.pos])  # (1, V)
        else:
            x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
            logits = self.model(x, state=self.state)[0]  # (T, V)
        out = logits if all_logits else logits[-1]
        return out.float().cpu().numpy()

    # -- several sequences (kititans.runtimes.base.Sequences)

    def save_state(self) -> Any:
        return self.state

    def load_state(self, state: Any) -> None:
        self.state = state

    def copy_state(self, state: Any) -> Any:
        return _clone(state)

    def sequences(self, max_sequences: int = 16) -> Any:
        """Batched decode where the family has one (`decode_rows`, batch-invariant: Lite, Titans), else the
        sequences step in turn (a compiled Titans decode, families without one)."""
        if self.batched_decode:
            return TorchSequences(self, max_sequences)
        return InTurn(self, max_sequences)

    @torch.inference_mode()
    def embed_batch(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """An encoder's unit vectors (N, dim) float32 for token id lists (padded together, masked)."""
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), max(self.codec.pad_id, 0), dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            mask[i, : len(r)] = 1
        return self.model(ids.to(self.device), mask.to(self.device)).float().cpu().numpy()

    # -- sessions (kititans/runtimes/session.py): a recurrent state in the layout of model.state_spec

    def session_identity(self) -> dict[str, Any]:
        if not hasattr(self.model, "state_to_tensors"):
            raise KititansError(
                f"a {self.ckpt.spec.name} model keeps a KV cache that grows with the text: sessions save the "
                "fixed-size state of a Titans run"
            )
        if self._weights_sha256 is None:  # the exports record the same hash as source.weights_sha256
            from kititans.files import sha256_file

            self._weights_sha256 = sha256_file(Path(self.ckpt.path) / "model.safetensors")
        return {
            "family": self.ckpt.spec.name,
            "weights_sha256": self._weights_sha256,
            "runtime": self.name,
            "quant": self.dtype,
            "layout": {n: list(s) for n, s, _ in self.model.state_spec(1)},
        }

    def get_state(self) -> dict[str, np.ndarray]:
        """The state by name, "pos" included (bf16 as fp32; arrays may share the runtime's memory: valid until
        its next call)."""
        state = self.state if self.state is not None else self.model.new_state(batch_size=1)
        names = [n for n, _, _ in self.model.state_spec(1)]
        out = {}
        for name, t in zip(names, self.model.state_to_tensors(state), strict=True):
            t = t.detach().cpu()
            out[name] = (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()
        return out

    def set_state(self, tensors: dict[str, np.ndarray]) -> None:
        spec = self.model.state_spec(1)
        self.state = self.model.state_from_tensors(
            [_tensor(tensors[n]).to(self.device, dtype) for n, _, dtype in spec]
        )


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A torch tensor over `a` (its own copy when `a` is read-only: the state is written in place)."""
    a = np.asarray(a)
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _clone(state: Any) -> Any:
    """A copy of a state object (KVCache, TitansState: dataclasses of tensors, lists, dicts and ints) whose
    tensors are their own (a tensor that is a row of a batched decode's stacked state copies that row only;
    copy.deepcopy would copy the whole stack it views)."""
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, list):
        return [_clone(x) for x in state]
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return dataclasses.replace(
            state, **{f.name: _clone(getattr(state, f.name)) for f in dataclasses.fields(state) if f.init}
        )
    return state


class TorchSequences(Handles):
    """Several sequences over a model with `decode_rows`: each keeps its own batch-1 cache (Lite) or state
    (Titans); a prompt goes in alone (the very call `kititans generate` makes), decode steps run every listed
    sequence in one pass."""

    batched = True

    def __init__(self, rt: TorchRuntime, max_sequences: int = 16):
        super().__init__(max_sequences)
        self.rt, self.model = rt, rt.model
        self.context_length = int(rt.context_length)
        self.states: dict[int, Any] = {}
        self.recurrent = hasattr(self.model, "state_to_tensors")  # Titans: a state cannot go back

    @torch.inference_mode()
    def _forward(self, state: Any, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        if len(ids) == 1:  # the call TorchRuntime.forward makes for one token
            logits = self.model.decode_rows([int(ids[0])], [state], [state.pos])
        else:
            x = torch.tensor([list(ids)], dtype=torch.long, device=self.rt.device)
            logits = self.model(x, state=state)[0]  # (T, V)
        return (logits if all_logits else logits[-1]).float().cpu().numpy()

    def add(self, ids: Sequence[int], all_logits: bool = False) -> tuple[int, np.ndarray]:
        h = self.new(0)
        try:
            state = self.model.new_state(batch_size=1)
            logits = self._forward(state, ids, all_logits)
        except BaseException:
            del self.lengths[h]
            raise
        self.states[h], self.lengths[h] = state, len(ids)
        return h, logits

    def extend(self, seq: int, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        self.check(seq)
        logits = self._forward(self.states[seq], ids, all_logits)
        self.lengths[seq] += len(ids)
        return logits

    @torch.inference_mode()
    def step(self, tokens: Mapping[int, int]) -> dict[int, np.ndarray]:
        seqs = list(tokens)
        for s in seqs:
            self.check(s)
        states = [self.states[s] for s in seqs]
        logits = self.model.decode_rows([tokens[s] for s in seqs], states, [st.pos for st in states])
        out = logits.float().cpu().numpy()
        for s in seqs:
            self.lengths[s] += 1
        return {s: out[i] for i, s in enumerate(seqs)}

    def fork(self, seq: int) -> int:
        self.check(seq)
        h = self.new(self.lengths[seq])
        self.states[h] = _clone(self.states[seq])
        return h

    def drop(self, seq: int) -> None:
        self.lengths.pop(seq, None)
        self.states.pop(seq, None)

    def truncate(self, seq: int, n: int) -> bool:
        """A KV cache goes back by moving its position: the rows past it are overwritten as it advances (a
        Titans state cannot go back)."""
        self.check(seq)
        if self.recurrent:
            return n == self.lengths[seq]
        if not 0 < n <= self.lengths[seq]:
            return False
        self.states[seq].pos = self.lengths[seq] = n
        return True

    def length(self, seq: int) -> int:
        return self.lengths[seq]

    # sessions (kititans serve --sessions), as InTurn has them
    def adopt(self, tokens: Sequence[int]) -> int:
        """A new sequence holding the runtime's current state (just loaded by its `set_state`)."""
        h = self.new(len(tokens))
        self.states[h], self.rt.state = self.rt.state, None
        return h

    def select(self, seq: int) -> None:
        """Put the sequence's state in the runtime (for its `get_state`, until the next call)."""
        self.check(seq)
        self.rt.state = self.states[seq]
