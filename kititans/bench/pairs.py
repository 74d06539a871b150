"""Which (runtime, quant) pairs a bench measures, and where each pair's artifact lives.

Quantization names are each runtime's own:

    torch     fp32 bf16 fp16                the run directory, cast at load (no export)
    llamacpp  f32 f16 bf16 q8_0 q6_k q5_k_m q4_k_m q4_0   RUN/export/model.<quant>.gguf
    onnx      fp32 fp16 int8 int8_dynamic int4   RUN/export/onnx/<quant>/
    genai     fp32 fp16 int8 int4           RUN/export/onnx-genai/<quant>/ (onnxruntime-genai's builder)
    coreml    fp16 int8 int4 palettize4     RUN/export/model.<quant>.mlpackage (macOS only)

`--quants` names are matched per runtime with a few aliases: f32/fp32 and f16/fp16 are the same level,
q8 and q4 are the `kititans export --q8/--q4` shorthands (q8_0 / int8, q4_k_m / int4). A `runtime:quant`
entry in `--runtimes` is an explicit pair.
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass
from pathlib import Path

from kititans.errors import KititansError

# runtime -> export format (None: the run directory itself)
FORMATS: dict[str, str | None] = {
    "torch": None,
    "llamacpp": "gguf",
    "onnx": "onnx",
    "genai": "onnx-genai",
    "coreml": "coreml",
}


def _gguf_types() -> tuple[str, ...]:
    from kititans.quantize.gguf import TYPES  # light: numpy only

    return tuple(TYPES)


# every level a runtime can measure; tests check these against the exporters' QUANTS
QUANTS: dict[str, tuple[str, ...]] = {
    "torch": ("fp32", "bf16", "fp16"),
    "llamacpp": _gguf_types(),
    "onnx": ("fp32", "fp16", "int8", "int8_dynamic", "int4"),
    "genai": ("fp32", "fp16", "int8", "int4"),
    "coreml": ("fp16", "int8", "int4", "palettize4"),
}

# the levels measured when no --quants is given (GPU adds the half-precision ones)
DEFAULTS: dict[str, tuple[str, ...]] = {
    "torch": ("fp32", "bf16"),
    "llamacpp": ("f16", "q8_0", "q4_k_m", "q4_0"),
    "onnx": ("fp32", "int8", "int4"),
    "genai": ("fp32", "int4"),
    "coreml": ("fp16", "int8", "int4"),
}
GPU_EXTRA: dict[str, tuple[str, ...]] = {"torch": ("fp16",), "onnx": ("fp16",)}

ALIASES: dict[str, dict[str, str]] = {
    "f32": {"torch": "fp32", "onnx": "fp32", "genai": "fp32"},
    "fp32": {"llamacpp": "f32"},
    "f16": {"torch": "fp16", "onnx": "fp16", "genai": "fp16", "coreml": "fp16"},
    "fp16": {"llamacpp": "f16"},
    "q8": {"llamacpp": "q8_0", "onnx": "int8", "genai": "int8", "coreml": "int8"},
    "q4": {"llamacpp": "q4_k_m", "onnx": "int4", "genai": "int4", "coreml": "int4"},
}

# runtime -> (python module it needs, extra that installs it)
PACKAGES: dict[str, tuple[str, str]] = {
    "torch": ("torch", "torch"),
    "llamacpp": ("llama_cpp", "llamacpp"),
    "onnx": ("onnxruntime", "onnx"),
    "genai": ("onnxruntime_genai", "genai"),
    "coreml": ("coremltools", "coreml"),
}

REFERENCE = ("torch", "fp32")  # quality is measured against this pair's log-probs


@dataclass(frozen=True)
class Pair:
    runtime: str
    quant: str

    @property
    def key(self) -> str:
        return f"{self.runtime}:{self.quant}"

    @property
    def slug(self) -> str:
        return f"{self.runtime}-{self.quant}"


def resolve_quant(runtime: str, name: str) -> str | None:
    """`name` as `runtime` spells it, or None when the runtime has no such level."""
    name = name.strip().lower()
    if name in QUANTS[runtime]:
        return name
    alias = ALIASES.get(name, {}).get(runtime)
    return alias if alias in QUANTS[runtime] else None


def unavailable(runtime: str) -> str | None:
    """Why `runtime` cannot run on this machine (not installed, wrong OS), or None."""
    if runtime == "coreml" and platform.system() != "Darwin":
        return f"CoreML models run only on macOS, not on {platform.system()}"
    module, extra = PACKAGES[runtime]
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed: pip install 'kititans[{extra}]'"
    return None


def _check_runtime(name: str) -> str:
    if name not in FORMATS:
        raise KititansError(f"unknown runtime {name!r}; valid runtimes: {', '.join(FORMATS)}")
    return name


def select_pairs(
    runtimes: list[str] | None = None, quants: list[str] | None = None, gpu: bool = False
) -> list[Pair]:
    """The pairs to measure, in order, without duplicates.

    runtimes: names and/or `runtime:quant` pairs (None: every runtime available here);
    quants: levels applied to each named runtime that has them (None: each runtime's defaults).
    """
    explicit = [r for r in runtimes or [] if ":" in r]
    names = [_check_runtime(r.strip()) for r in runtimes or [] if ":" not in r]
    if runtimes is None:
        names = [r for r in FORMATS if unavailable(r) is None]
    pairs: list[Pair] = []
    for item in explicit:
        rt, _, q = (s.strip() for s in item.partition(":"))
        resolved = resolve_quant(_check_runtime(rt), q)
        if resolved is None:
            raise KititansError(f"{rt} has no quantization {q!r}; valid: {', '.join(QUANTS[rt])}")
        pairs.append(Pair(rt, resolved))
    if quants:
        unused = [q for q in quants if not any(resolve_quant(r, q) for r in names)]
        if unused and names:
            valid = sorted({q for r in names for q in QUANTS[r]})
            raise KititansError(
                f"no selected runtime ({', '.join(names)}) has quantization {unused[0]!r}; "
                f"valid: {', '.join(valid)}"
            )
    for rt in names:
        levels = (
            [resolve_quant(rt, q) for q in quants]
            if quants
            else DEFAULTS[rt] + (GPU_EXTRA.get(rt, ()) if gpu else ())
        )
        pairs += [Pair(rt, q) for q in levels if q]
    seen: set[Pair] = set()
    return [p for p in pairs if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]


def parse_list(value: str | None) -> list[str] | None:
    """A comma-separated flag value -> its items (None when the flag was not given)."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise KititansError("an empty list was given: name at least one item, e.g. --runtimes torch,llamacpp")
    return items


def artifact_path(run_dir: Path, pair: Pair) -> Path:
    """Where the pair's artifact is (or will be exported to); the run directory for torch."""
    fmt = FORMATS[pair.runtime]
    if fmt is None:
        return Path(run_dir)
    if fmt == "onnx-genai":
        return Path(run_dir) / "export" / "onnx-genai" / pair.quant
    from kititans.export import default_output

    return default_output(Path(run_dir), fmt, pair.quant)
