"""The runtime registry. A runtime loads one artifact and answers `forward(ids) -> logits`, keeping its own
cache between calls (`reset()` clears it); `n_past` is how many positions the cache holds. It also carries
the artifact's tokenizer (`codec`) so generate/chat/bench work the same for every runtime.

Runtimes are listed here as import paths so that loading one never imports another's packages.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kititans.errors import KititansError

# name -> "module:Class"; the class takes (path, **options)
RUNTIMES: dict[str, str] = {
    "torch": "kititans.runtimes.pytorch:TorchRuntime",
    "llamacpp": "kititans.runtimes.llamacpp:LlamaCppRuntime",
    "onnx": "kititans.runtimes.onnx:OnnxRuntime",
    "coreml": "kititans.runtimes.coreml:CoreMLRuntime",
    "genai": "kititans.runtimes.onnx:GenaiRuntime",  # onnxruntime-genai (pip install 'kititans[genai]')
}


def detect_runtime(path: str | Path) -> str:
    """Pick the runtime from the artifact: run dir -> torch, .gguf -> llamacpp, ONNX dir/file -> onnx,
    .mlpackage -> coreml."""
    p = Path(path)
    if p.suffix == ".gguf":
        return "llamacpp"
    if p.suffix == ".mlpackage":
        return "coreml"
    if p.suffix == ".onnx" or (p.is_dir() and any(p.glob("*.onnx"))):
        return "onnx"
    if p.is_dir() and (p / "config.json").is_file():
        return "torch"
    if not p.exists():
        raise KititansError(f"no such model: {p}")
    raise KititansError(
        f"{p}: not a model kititans can run (a run directory, a .gguf file, an ONNX export folder or a .mlpackage)"
    )


def runtime_class(name: str) -> Any:
    if name not in RUNTIMES:
        raise KititansError(f"unknown runtime {name!r}; valid runtimes: {', '.join(RUNTIMES)}")
    module, _, cls = RUNTIMES[name].partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise KititansError(f"the {name} runtime is not part of this kititans build") from None
        raise
    return getattr(mod, cls)


def load_runtime(path: str | Path, runtime: str | None = None, **options: Any) -> Any:
    name = runtime or detect_runtime(path)
    return runtime_class(name)(Path(path), **options)


def plan_chunks(
    ids: list[int], n_past: int, prefill_len: int, exact: bool, sizes: Sequence[int] = ()
) -> list[list[int]]:
    """How `ids` go in after n_past tokens: chunks of up to prefill_len; with an exact prefill (Titans: a
    memory chunk), whole chunks where the position is a multiple of prefill_len, single tokens elsewhere; with
    exact `sizes` (Titans: a long prefill and a memory chunk), the largest size that starts at a multiple of
    itself and fits, else single tokens."""
    C, out, at, n = prefill_len, [], 0, n_past
    exact_sizes = sorted(set(sizes) | {C}, reverse=True)
    while at < len(ids):
        if not exact:
            take = min(C, len(ids) - at)
        else:
            take = next((s for s in exact_sizes if s > 1 and n % s == 0 and len(ids) - at >= s), 1)
        out.append(ids[at : at + take])
        at, n = at + take, n + take
    return out


def pick_step(steps: list[dict[str, Any]], tokens: int, pos: int) -> dict[str, Any]:
    """Of an export's step graphs / functions (manifest "steps": tokens, every), the one for a call of `tokens`
    tokens at position `pos`: of those whose `every` divides pos + tokens, the largest (a call of several
    tokens must start at a multiple of its size)."""
    fits = [r for r in steps if r["tokens"] == tokens and (pos + tokens) % r["every"] == 0]
    if not fits or (tokens > 1 and pos % tokens):
        raise KititansError(
            f"no step of this export takes {tokens} tokens at position {pos}: re-export the model"
        )
    return max(fits, key=lambda r: r["every"])


# ----------------------------------------------------------------------------- several sequences at once
#
# A runtime's `sequences(max_sequences)` gives a `Sequences`: several independent sequences over the one
# loaded model (the server's requests, the eval backend's scoring rows). Add a sequence (its prompt in one
# call), step all (one token for each listed sequence, one batched call where the runtime can), fork one
# (n > 1 choices share their prompt), drop one. A runtime that cannot batch steps its sequences in turn
# behind the same interface (`InTurn`), so one long sequence never holds the others back for more than a token.


class Sequences(Protocol):
    """Several sequences over one model. Handles are ints; logits are float32 numpy arrays."""

    max_sequences: int  # how many may exist at once (active and kept); len() says how many do
    batched: bool  # True: step() runs all listed sequences in one call of the model
    context_length: int

    def add(self, ids: Sequence[int], all_logits: bool = False) -> tuple[int, np.ndarray]:
        """A new sequence holding `ids`: its handle and the logits after the last id ((T, V) with all_logits)."""
        ...

    def extend(self, seq: int, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Feed more ids to an existing sequence (a prompt that continues a kept one)."""
        ...

    def step(self, tokens: Mapping[int, int]) -> dict[int, np.ndarray]:
        """One token for each listed sequence; the logits (V,) after it, by handle."""
        ...

    def fork(self, seq: int) -> int:
        """A new sequence with a copy of `seq`'s state."""
        ...

    def drop(self, seq: int) -> None: ...

    def truncate(self, seq: int, n: int) -> bool:
        """Keep only the first n tokens of a sequence (a cached prompt reused up to where a new one differs);
        False where the state cannot go back (a recurrent state)."""
        ...

    def length(self, seq: int) -> int:
        """Tokens the sequence holds."""
        ...

    def __len__(self) -> int:
        """Sequences that exist now."""
        ...


class SequenceLimit(KititansError):
    """More sequences than the runtime was set up for."""


class Handles:
    """Handle bookkeeping shared by the implementations: ids, lengths, the limit."""

    def __init__(self, max_sequences: int):
        if max_sequences < 1:
            raise KititansError(f"max_sequences must be at least 1, got {max_sequences}")
        self.max_sequences = max_sequences
        self.lengths: dict[int, int] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def new(self, n: int) -> int:
        if len(self.lengths) >= self.max_sequences:
            raise SequenceLimit(f"all {self.max_sequences} sequences are in use")
        h, self._next = self._next, self._next + 1
        self.lengths[h] = n
        return h

    def check(self, seq: int) -> None:
        if seq not in self.lengths:
            raise KeyError(f"no sequence {seq}")


class InTurn(Handles):
    """`Sequences` over a one-sequence runtime: each sequence keeps its own state object, swapped into the
    runtime for its call (the runtime's `save_state()` / `load_state(state)`); step() runs the sequences one
    after the other, each exactly as a lone `forward` would (the same numbers as `kititans generate`)."""

    batched = False

    def __init__(self, rt: Any, max_sequences: int = 16):
        super().__init__(max_sequences)
        self.rt = rt
        self.context_length = int(rt.context_length)
        self.states: dict[int, Any] = {}
        self.history: dict[int, list[int]] = {}  # fork() replays it where a state cannot be copied

    def add(self, ids: Sequence[int], all_logits: bool = False) -> tuple[int, np.ndarray]:
        h = self.new(0)
        try:
            self.rt.reset()
            logits = self.rt.forward(list(ids), all_logits=all_logits)
        except BaseException:
            del self.lengths[h]
            raise
        self.states[h], self.history[h] = self.rt.save_state(), list(ids)
        self.lengths[h] = len(ids)
        return h, logits

    def _run(self, seq: int, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        self.check(seq)
        self.rt.load_state(self.states[seq])
        logits = self.rt.forward(list(ids), all_logits=all_logits)
        self.states[seq] = self.rt.save_state()
        self.history[seq] += list(ids)
        self.lengths[seq] += len(ids)
        return logits

    def extend(self, seq: int, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        return self._run(seq, ids, all_logits)

    def step(self, tokens: Mapping[int, int]) -> dict[int, np.ndarray]:
        return {seq: self._run(seq, [tok]) for seq, tok in tokens.items()}

    def fork(self, seq: int) -> int:
        self.check(seq)
        copy = getattr(self.rt, "copy_state", None)
        if copy is None:  # replay the history into a fresh state
            return self.add(self.history[seq])[0]
        h = self.new(self.lengths[seq])
        self.states[h], self.history[h] = copy(self.states[seq]), list(self.history[seq])
        return h

    def drop(self, seq: int) -> None:
        self.lengths.pop(seq, None)
        self.states.pop(seq, None)
        self.history.pop(seq, None)

    def truncate(self, seq: int, n: int) -> bool:
        return n == self.lengths.get(seq)  # one sequence's state only moves forward

    # sessions (kititans serve --sessions): a saved state becomes a sequence, a sequence's state is saved
    def adopt(self, tokens: Sequence[int]) -> int:
        """A new sequence holding the runtime's current state (just loaded by its `set_state`), which has
        consumed `tokens`."""
        h = self.new(len(tokens))
        self.states[h], self.history[h] = self.rt.save_state(), list(tokens)
        return h

    def select(self, seq: int) -> None:
        """Put the sequence's state in the runtime (for its `get_state`, until the next call)."""
        self.check(seq)
        self.rt.load_state(self.states[seq])

    def length(self, seq: int) -> int:
        return self.lengths[seq]


def export_session_identity(runtime: Any, layout: dict[str, Any]) -> dict[str, Any]:
    """What a session file records of an exported Titans runtime (ONNX, CoreML): the weights it came from (the
    manifest's source hash), the runtime, the level and the state layout by its torch names."""
    source = runtime.manifest.get("source", {})
    return {
        "family": source.get("family"),
        "weights_sha256": source.get("weights_sha256"),
        "runtime": runtime.name,
        "quant": runtime.manifest.get("quant"),
        "layout": layout,
    }
