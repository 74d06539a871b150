"""Exporters: one module per format, listed here by import path so `kititans export` never imports a
format library it does not use.

A format module provides:
    FORMAT: str                       "gguf" | "onnx" | "coreml"
    QUANTS: dict[str, QuantType]      every quantization it can write (name -> QuantType)
    SHORTHANDS: dict[str, str]        {"q8": ..., "q4": ...} for --q8 / --q4
    DEFAULT_QUANT: str
    def export(ckpt: Checkpoint, quant: str, out: Path, options: ExportOptions) -> ExportResult
It writes through kititans.files.atomic_path and returns the manifest it wrote next to the artifact.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import kititans
from kititans.errors import KititansError, UnsupportedExport
from kititans.files import dir_size, sha256_file, write_json

EXPORTERS: dict[str, str] = {
    "gguf": "kititans.export.gguf",
    "onnx": "kititans.export.onnx",
    "coreml": "kititans.export.coreml",
}


@dataclass(frozen=True)
class QuantType:
    name: str
    bits_per_weight: float  # average over the quantized weights, as the format stores them
    description: str


@dataclass
class ExportOptions:
    imatrix: str | None = None  # calibration text for an importance matrix (gguf)
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # format-specific knobs


@dataclass
class ExportResult:
    path: Path  # the artifact (a file or a folder)
    manifest_path: Path
    manifest: dict[str, Any]
    seconds: float = 0.0


def format_module(fmt: str) -> ModuleType:
    if fmt not in EXPORTERS:
        raise KititansError(f"unknown format {fmt!r}; valid formats: {', '.join(EXPORTERS)}")
    try:
        return importlib.import_module(EXPORTERS[fmt])
    except ModuleNotFoundError as e:
        if e.name == EXPORTERS[fmt]:
            raise KititansError(f"the {fmt} exporter is not part of this kititans build") from None
        raise


def resolve_quant(fmt: str, quant: str | None) -> str:
    mod = format_module(fmt)
    q = mod.SHORTHANDS.get(quant, quant) if quant else mod.DEFAULT_QUANT
    if q not in mod.QUANTS:
        raise UnsupportedExport(f"{fmt} has no quantization {quant!r}; valid: {', '.join(mod.QUANTS)}")
    return q


def default_output(run_dir: Path, fmt: str, quant: str) -> Path:
    """RUN/export/model.<quant>.gguf, RUN/export/onnx/<quant>/, RUN/export/model.<quant>.mlpackage."""
    base = Path(run_dir) / "export"
    return {
        "gguf": base / f"model.{quant}.gguf",
        "onnx": base / "onnx" / quant,
        "coreml": base / f"model.{quant}.mlpackage",
    }[fmt]


def manifest_path(artifact: Path) -> Path:
    """The JSON manifest next to a file artifact, or inside a folder artifact."""
    return (
        artifact / "manifest.json" if artifact.suffix == "" else artifact.with_name(artifact.name + ".json")
    )


def base_manifest(ckpt: Any, fmt: str, quant: str, artifact: Path) -> dict[str, Any]:
    """Fields every manifest has; the format adds its own (tensor types, quantization error...)."""
    return {
        "format": fmt,
        "quant": quant,
        "kititans_version": kititans.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {
            "run": str(ckpt.path),
            "family": ckpt.spec.name,
            "step": ckpt.meta.get("step"),
            "weights_sha256": sha256_file(Path(ckpt.path) / "model.safetensors"),
        },
        "artifact": artifact.name,
        "size_bytes": dir_size(artifact) if artifact.exists() else None,
    }


def write_manifest(artifact: Path, manifest: dict[str, Any]) -> Path:
    path = manifest_path(artifact)
    write_json(path, manifest)
    return path


def export_model(
    run_dir: str | Path,
    fmt: str,
    quant: str | None = None,
    out: str | Path | None = None,
    options: ExportOptions | None = None,
) -> ExportResult:
    """Export a run directory: check the family supports the format, then call the format module."""
    from kititans.checkpoint import load_checkpoint, read_meta
    from kititans.models.spec import get_family

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    entry = get_family(meta["family"]).support(fmt)  # refuse before loading any weights
    q = resolve_quant(fmt, quant)
    from kititans.quantize.qat import export_warning

    warning = export_warning(meta, fmt, q, bool(options and options.imatrix))
    if warning:  # a QAT run exported to another level than it trained for: allowed, with one line
        logging.getLogger("kititans").warning("warning: %s", warning)
    ckpt = load_checkpoint(run_dir)
    target = Path(out) if out else default_output(run_dir, fmt, q)
    t0 = time.perf_counter()
    # a family may bring its own writer for a format (the encoder's stateless CoreML program)
    module = importlib.import_module(entry.exporter) if hasattr(entry, "exporter") else format_module(fmt)
    result = module.export(ckpt, q, target, options or ExportOptions())
    result.seconds = time.perf_counter() - t0
    return result
