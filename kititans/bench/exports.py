"""The artifacts a bench measures or a bench pack ships: each pair's file in RUN/export, reused when its
manifest's weights_sha256 matches the run's weights, else exported (all missing ones in one worker process).
`cfg` is a BenchConfig or a PackConfig (run, reexport, timeout_s, omp_wait_policy)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kititans.bench.pairs import FORMATS, Pair, artifact_path, unavailable
from kititans.bench.worker import run_job, worker_env
from kititans.checkpoint import read_meta
from kititans.files import sha256_file

Event = Callable[[dict[str, Any]], None]

# the package each exporter needs, for packing artifacts this machine cannot run (CoreML on Linux)
EXPORT_PACKAGES = {"gguf": ("gguf", "gguf"), "onnx": ("onnx", "onnx"), "coreml": ("coremltools", "coreml")}


def manifest_of(path: Path) -> dict[str, Any] | None:
    from kititans.export import manifest_path

    m = manifest_path(path)
    return json.loads(m.read_text()) if m.is_file() else None


def export_unavailable(runtime: str) -> str | None:
    """Why this machine cannot export `runtime`'s format (its exporter's package is missing), or None."""
    import importlib.util

    fmt = FORMATS[runtime]
    if fmt not in EXPORT_PACKAGES:
        return unavailable(runtime)
    module, extra = EXPORT_PACKAGES[fmt]
    if importlib.util.find_spec(module) is None:
        return f"exporting {fmt} needs {module}: pip install 'kititans[{extra}]'"
    return None


def plan_artifacts(
    cfg: Any, pairs: list[Pair], failed: dict[str, str], run_here: bool = True
) -> tuple[dict, list]:
    """Per pair: its artifact and whether it is reused; export tasks for the missing or stale ones.
    run_here: a pair whose runtime cannot run on this machine fails (a bench); else only one that cannot be
    exported here (a pack)."""
    from kititans.errors import UnsupportedExport
    from kititans.models.spec import get_family

    spec = get_family(read_meta(cfg.run)["family"])
    weights_sha = sha256_file(cfg.run / "model.safetensors")
    info: dict[str, dict[str, Any]] = {}
    tasks = []
    for p in pairs:
        why = unavailable(p.runtime) if run_here else export_unavailable(p.runtime)
        fmt = FORMATS[p.runtime]
        if why is None and fmt in ("gguf", "onnx", "coreml"):
            try:
                spec.support(fmt)
            except UnsupportedExport as e:
                why = str(e)
        if why:
            failed[p.key] = why
            continue
        path = artifact_path(cfg.run, p)
        info[p.key] = {"path": str(path)}
        if fmt is None:
            continue
        m = manifest_of(path) if path.exists() else None
        fresh = m is not None and m.get("source", {}).get("weights_sha256") == weights_sha
        if fresh and not cfg.reexport:
            info[p.key].update(reused=True, manifest=manifest_summary(m))
        else:
            info[p.key]["reused"] = False
            tasks.append(
                {"key": p.key, "runtime": p.runtime, "quant": p.quant, "format": fmt, "out": str(path)}
            )
    return info, tasks


def manifest_summary(m: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest fields that change what a quant level means (quantizer, imatrix, method)."""
    if not m:
        return {}
    keys = ("created", "quantizer", "imatrix", "quantization", "genai")
    return {k: m[k] for k in keys if m.get(k) is not None}


def run_exports(cfg: Any, tasks: list, info: dict, failed: dict, work: Path, on_event: Event) -> None:
    """Export the missing artifacts in one worker; a task that fails moves its pair to `failed`."""
    if not tasks:
        return
    on_event({"kind": "exports", "tasks": [t["key"] for t in tasks]})
    job = {"mode": "export", "run": str(cfg.run), "tasks": tasks}
    env = worker_env(getattr(cfg, "omp_wait_policy", None))
    result = run_job(job, work, "export", cfg.timeout_s * max(1, len(tasks)), on_event, env=env)
    done = {t["key"]: t for t in result.get("tasks", [])}
    weights_sha = sha256_file(cfg.run / "model.safetensors")
    for t in tasks:
        m = manifest_of(Path(t["out"])) if Path(t["out"]).exists() else None
        written = m is not None and m.get("source", {}).get("weights_sha256") == weights_sha
        stopped = {"status": "ok", "seconds": None} if written else {"status": "failed"}
        r = done.get(t["key"], {**stopped, "reason": result.get("reason", "the export worker stopped")})
        if r["status"] != "ok":
            failed[t["key"]] = f"export failed: {r['reason']}"
            info.pop(t["key"], None)
            continue
        info[t["key"]].update(seconds=r["seconds"], manifest=manifest_summary(manifest_of(Path(t["out"]))))
