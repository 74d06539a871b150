"""Which artifacts of a run an evaluation scores, and where they are.

    (none)                       the run itself on the torch runtime (fp32), or the one artifact given
    all                          the run (the fp32 reference) and every export in RUN/export that runs here
    gguf:q4_k_m,onnx:int4,...    the reference and these exports (format or runtime name : level)

`all` passes over exports that cannot run on this machine (CoreML off macOS, a runtime not installed) and
says why; an artifact named in a list that is missing or cannot run here is an error, before anything is
scored.
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass
from pathlib import Path

from kititans.errors import KititansError

# format (or runtime) name -> runtime
RUNTIME_OF = {
    "torch": "torch",
    "gguf": "llamacpp",
    "llamacpp": "llamacpp",
    "onnx": "onnx",
    "coreml": "coreml",
}
FORMAT_OF = {"llamacpp": "gguf", "onnx": "onnx", "coreml": "coreml"}
MODULES = {"torch": "torch", "llamacpp": "llama_cpp", "onnx": "onnxruntime", "coreml": "coremltools"}
EXTRAS = {"torch": "torch", "llamacpp": "llamacpp", "onnx": "onnx", "coreml": "coreml"}
TORCH_DTYPES = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Artifact:
    runtime: str
    quant: str
    path: Path
    name: str = ""  # a label instead of format:level (an artifact of another run: `gguf:q4_0@tiny-qat`)

    @property
    def key(self) -> str:
        fmt = "torch" if self.runtime == "torch" else FORMAT_OF[self.runtime]
        return self.name or f"{fmt}:{self.quant}"

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in "._-" else "-" for c in self.key)


def cannot_run(runtime: str) -> str | None:
    """Why `runtime` cannot run on this machine, or None."""
    if runtime == "coreml" and platform.system() != "Darwin":
        return f"CoreML models run only on macOS, not on {platform.system()}"
    if importlib.util.find_spec(MODULES[runtime]) is None:
        return f"{MODULES[runtime]} is not installed: pip install 'kititans[{EXTRAS[runtime]}]'"
    return None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def export_path(run: Path, runtime: str, quant: str) -> Path:
    if runtime == "torch":
        return run
    from kititans.export import default_output

    return default_output(run, FORMAT_OF[runtime], quant)


def discover(run: Path) -> list[Artifact]:
    """Every LM export in RUN/export: model.<q>.gguf, onnx/<q>/model.onnx, model.<q>.mlpackage."""
    base, found = Path(run) / "export", []
    if not base.is_dir():
        return []
    for f in sorted(base.glob("model.*.gguf")):
        found.append(Artifact("llamacpp", f.name[len("model.") : -len(".gguf")], f))
    for d in sorted((base / "onnx").glob("*/model.onnx")):
        found.append(Artifact("onnx", d.parent.name, d.parent))
    for p in sorted(base.glob("model.*.mlpackage")):
        found.append(Artifact("coreml", p.name[len("model.") : -len(".mlpackage")], p))
    return found


def level_of(path: Path) -> str:
    """The level in an export's name: model.<q>.gguf, onnx/<q>/, model.<q>.mlpackage (else the name)."""
    p = Path(path)
    if p.name.startswith("model.") and p.suffix in (".gguf", ".mlpackage"):
        return p.name[len("model.") : -len(p.suffix)]
    return p.name


def from_path(path: Path) -> Artifact:
    """Any artifact file or folder (an export of another run, e.g. a QAT run beside its PTQ twin)."""
    from kititans.runtimes import detect_runtime

    path = Path(path)
    runtime = detect_runtime(path)
    quant = "fp32" if runtime == "torch" else level_of(path)
    fmt = "torch" if runtime == "torch" else FORMAT_OF[runtime]
    owner = path if runtime == "torch" else next((q.parent for q in path.parents if q.name == "export"), None)
    return Artifact(runtime, quant, path, f"{fmt}:{quant}@{owner.name if owner else path.name}")


def parse_item(run: Path, item: str) -> Artifact:
    if ":" not in item and Path(item).exists():
        art = from_path(Path(item))
        why = cannot_run(art.runtime)
        if why:
            raise KititansError(f"{item} cannot run here: {why}")
        return art
    fmt, _, quant = (s.strip().lower() for s in item.partition(":"))
    if fmt not in RUNTIME_OF or not quant:
        raise KititansError(
            f"--artifacts {item!r}: expected format:level (gguf:q4_k_m, onnx:int4, coreml:int8, torch:bf16) "
            "or the path of an artifact"
        )
    runtime = RUNTIME_OF[fmt]
    if runtime == "torch" and quant not in TORCH_DTYPES:
        raise KititansError(f"--artifacts {item!r}: the torch runtime runs {', '.join(TORCH_DTYPES)}")
    return Artifact(runtime, quant, export_path(run, runtime, quant))


def check_artifact(art: Artifact, run: Path) -> None:
    """One line if the artifact is missing or cannot run here."""
    why = cannot_run(art.runtime)
    if why:
        raise KititansError(f"{art.key} cannot run here: {why}")
    if not art.path.exists():
        fmt = FORMAT_OF.get(art.runtime, "torch")
        raise KititansError(
            f"{art.key}: no such export ({art.path}); make it with: "
            f"kititans export {run} --format {fmt} --quant {art.quant}"
        )


def select(target: Path, spec: list[str] | None) -> tuple[list[Artifact], list[str]]:
    """(artifacts to score, the reference first when there is one; notes on exports passed over)."""
    target = Path(target)
    if not target.exists():
        raise KititansError(f"no such model: {target}")
    if not is_run_dir(target):
        if spec:
            raise KititansError(
                f"--artifacts needs a run directory (with config.json and model.safetensors), not {target}"
            )
        from kititans.runtimes import detect_runtime

        runtime = detect_runtime(target)
        why = cannot_run(runtime)
        if why:
            raise KititansError(f"{target} cannot run here: {why}")
        return [Artifact(runtime, level_of(target), target)], []
    reference = Artifact("torch", "fp32", target)
    if not spec:
        return [reference], []
    notes: list[str] = []
    if [s.strip().lower() for s in spec] == ["all"]:
        arts = []
        for a in discover(target):
            why = cannot_run(a.runtime)
            if why:
                notes.append(f"{a.key} passed over: {why}")
            else:
                arts.append(a)
        if not arts:
            raise KititansError(
                f"--artifacts all: {target}/export has no export that runs here "
                f"(make some with: kititans export {target} --format gguf --q4)"
            )
    else:
        arts = [parse_item(target, s) for s in spec]
        for a in arts:
            check_artifact(a, target)
    out = [reference, *(a for a in arts if a != reference)]
    return list(dict.fromkeys(out)), notes
