"""One bench job in its own process, so that its memory figures hold only what it loaded:

    python -m kititans.bench.worker JOB.json RESULT.json

A "measure" job loads one (runtime, quant) artifact, times it (kititans.bench.speed), records its peak
resident memory, and measures its quality against the reference log-probs (writing them first when it is
the reference job). An "export" job writes missing artifacts. Progress goes to stdout as `@bench {json}`
lines; the result is written atomically, also on failure, with a one-line reason.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from kititans.bench import embed as embed_bench
from kititans.bench.device import gpu_memory_of, peak_rss_bytes, reset_peak_rss, rss_bytes
from kititans.errors import KititansError
from kititans.files import write_json

EVENT_PREFIX = "@bench "


def emit(**event: Any) -> None:
    print(EVENT_PREFIX + json.dumps(event), flush=True)


def one_line(e: BaseException) -> str:
    """A failure as one line: the message of a user-facing error, else the exception type and message."""
    text = str(e).strip().splitlines()
    msg = text[0] if text else ""
    if isinstance(e, KititansError):
        return msg or type(e).__name__
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def runtime_options(job: dict[str, Any]) -> dict[str, Any]:
    opts: dict[str, Any] = {"threads": job.get("threads", 0), "device": job.get("device", "cpu")}
    if job["runtime"] == "torch":
        opts["dtype"] = job["quant"]
    if job["runtime"] in ("llamacpp",):
        opts.pop("device")  # this runtime places every layer on the CPU
    if job["runtime"] == "coreml":
        opts = {"device": job.get("coreml_units", "auto")}
    return opts


def _gpu_peak(job: dict[str, Any], torch_mod: Any) -> int | None:
    if not str(job.get("device", "cpu")).startswith("cuda"):
        return None
    if job["runtime"] == "torch" and torch_mod is not None and torch_mod.cuda.is_available():
        return int(torch_mod.cuda.max_memory_allocated())
    return gpu_memory_of(os.getpid())


def measure_job(job: dict[str, Any], result: dict[str, Any]) -> None:
    """Load, time, record memory, then quality; fills `result` as it goes (a failure keeps what was done)."""
    from kititans.bench.speed import SpeedConfig, measure_speed
    from kititans.runtimes.base import runtime_class

    emit(stage="import")
    cls = runtime_class(job["runtime"])
    torch_mod = sys.modules.get("torch")
    on_cuda = str(job.get("device", "cpu")).startswith("cuda")
    if torch_mod is not None and on_cuda and torch_mod.cuda.is_available():
        torch_mod.cuda.reset_peak_memory_stats()
    result["memory"] = {"baseline_rss_bytes": rss_bytes()}
    result["memory"]["peak_reset"] = reset_peak_rss()
    emit(stage="load")
    t0 = time.perf_counter()
    rt = cls(Path(job["artifact"]), **runtime_options(job))
    result["load_s"] = time.perf_counter() - t0
    result["memory"]["loaded_rss_bytes"] = rss_bytes()
    result["runtime_settings"] = {**runtime_options(job), **getattr(rt, "settings", {})}
    result["context_length"] = int(rt.context_length)
    embed = getattr(rt, "task", "lm") == "embed"  # an encoder: embeddings/s and cosine (bench/embed.py)
    if job.get("speed") and embed:
        emit(stage="embeddings/s")
        sp = job["speed"]
        result["speed"] = embed_bench.measure_speed(rt, job["embed_data"], sp["trials"], sp["warmup"])
    elif job.get("speed"):
        cfg = SpeedConfig(**{**job["speed"], "prompt_tokens": tuple(job["speed"]["prompt_tokens"])})
        result["speed"] = measure_speed(rt, cfg, on_stage=lambda s: emit(stage=s))
    mem = result["memory"]
    mem["peak_rss_bytes"] = peak_rss_bytes()
    mem["model_rss_bytes"] = mem["peak_rss_bytes"] - mem["baseline_rss_bytes"]
    mem["gpu_peak_bytes"] = _gpu_peak(job, torch_mod)
    result["status"] = "ok"
    quality = job.get("quality")
    if quality:
        try:
            if embed:
                emit(stage="embedding quality")
                result["quality"] = embed_bench.measure_quality(rt, quality)
            else:
                result["quality"] = measure_quality(rt, quality)
        except Exception as e:  # the speed numbers stand; say why quality is missing
            result["quality_error"] = one_line(e)


def measure_quality(rt: Any, q: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from kititans.bench.quality import measure, write_reference

    reference = Path(q["reference"])
    if q.get("make_reference"):
        emit(stage="reference log-probs")
        chunks = np.load(q["make_reference"]).tolist()
        return write_reference(reference, chunks, rt).to_dict()
    emit(stage="quality")
    return measure(rt, reference).to_dict()


def export_job(job: dict[str, Any], result: dict[str, Any]) -> None:
    """Write each missing artifact; each task records its own success or one-line failure."""
    from kititans.export import ExportOptions, export_model
    from kititans.export.onnx import export_genai

    result["tasks"] = []
    for task in job["tasks"]:
        emit(stage=f"export {task['runtime']}:{task['quant']}", key=task["key"])
        entry = {"key": task["key"]}
        t0 = time.perf_counter()
        try:
            if task["format"] == "onnx-genai":
                export_genai(job["run"], task["quant"], task["out"], progress=False)
            else:
                opts = ExportOptions(progress=False)
                export_model(job["run"], task["format"], task["quant"], task["out"], opts)
            entry["status"] = "ok"
        except Exception as e:
            entry.update(status="failed", reason=one_line(e))
        entry["seconds"] = time.perf_counter() - t0
        result["tasks"].append(entry)
        emit(stage="exported", **entry)
    result["status"] = "ok"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m kititans.bench.worker JOB.json RESULT.json", file=sys.stderr)
        return 2
    job = json.loads(Path(args[0]).read_text())
    result: dict[str, Any] = {"status": "failed"}
    try:
        (export_job if job.get("mode") == "export" else measure_job)(job, result)
    except Exception as e:
        result["reason"] = one_line(e)
        if not isinstance(e, KititansError):
            traceback.print_exc()  # to the job's log, for whoever reads it
    write_json(args[1], result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
