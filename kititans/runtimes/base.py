"""The runtime registry. A runtime loads one artifact and answers `forward(ids) -> logits`, keeping its own
cache between calls (`reset()` clears it); `n_past` is how many positions the cache holds. It also carries
the artifact's tokenizer (`codec`) so generate/chat/bench work the same for every runtime.

Runtimes are listed here as import paths so that loading one never imports another's packages.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
