"""One bench job in its own process, so that its memory figures hold only what it loaded:

    python -m kititans.bench.worker JOB.json RESULT.json      (a bench pack: python PACK/kititans.pyz worker ...)

A "measure" job loads one (runtime, quant) artifact with the row's settings, times it (kititans.bench.speed),
records its peak resident memory, and measures its quality against the reference log-probs (writing them
first when it is the reference job). An "export" job writes missing artifacts. Progress goes to stdout as
`@bench {json}` lines; the result is written atomically, also on failure, with a one-line reason.
`run_job` is the parent's side: it starts the worker, forwards its progress and reads its result.
Torch-free (a bench pack's runner uses it on the device); the torch runtime imports torch itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kititans.bench.device import gpu_memory_of, peak_rss_bytes, reset_peak_rss, rss_bytes
from kititans.errors import KititansError
from kititans.files import write_json

EVENT_PREFIX = "@bench "
Event = Callable[[dict[str, Any]], None]


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
    """The runtime's keyword options for a job: threads, device and the row's settings (rows.py)."""
    s = job.get("settings") or {}
    opts: dict[str, Any] = {"threads": job.get("threads", 0), "device": job.get("device", "cpu")}
    if job["runtime"] == "torch":
        opts["dtype"] = job["quant"]
    if job["runtime"] == "llamacpp":
        opts.pop("device")  # llama.cpp places layers by n_gpu_layers
        opts.update(repack=s.get("repack"), n_gpu_layers=int(s.get("n_gpu_layers", 0)))
    if job["runtime"] == "coreml":
        opts = {"device": s.get("coreml_units") or job.get("coreml_units", "all")}
    return opts


class IdsCodec:
    """The codec of a bench pack's runner: the tokenizer's special ids only (timing and quality feed ids, so
    no tokenizer library is needed on the device)."""

    def __init__(self, bos_id: int, eos_id: int, vocab_size: int, **_: Any):
        self.bos_id, self.eos_id, self.vocab_size = int(bos_id), int(eos_id), int(vocab_size)
        self.stop_ids, self.special_tokens, self.chat_template = [self.eos_id], {}, ""

    def encode(self, text: str) -> list[int]:
        raise KititansError("a bench pack measures token ids: it has no text tokenizer on the device")

    encode_special = encode

    def decode(self, ids: Any) -> str:
        raise KititansError("a bench pack measures token ids: it has no text tokenizer on the device")


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
    codec = IdsCodec(**job["codec"]) if job.get("codec") else None
    rt = cls(Path(job["artifact"]), **runtime_options(job), **({"codec": codec} if codec else {}))
    result["load_s"] = time.perf_counter() - t0
    result["memory"]["loaded_rss_bytes"] = rss_bytes()
    result["runtime_settings"] = {**runtime_options(job), **getattr(rt, "settings", {})}
    result["runtime_settings"]["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "unset")
    result["context_length"] = int(rt.context_length)
    embed = getattr(rt, "task", "lm") == "embed"  # an encoder: embeddings/s and cosine (bench/embed.py)
    if job.get("speed") and embed:
        from kititans.bench import embed as embed_bench

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
                from kititans.bench import embed as embed_bench

                emit(stage="embedding quality")
                result["quality"] = embed_bench.measure_quality(rt, quality)
            else:
                result["quality"] = measure_quality(rt, quality)
        except Exception as e:  # the speed numbers stand; say why quality is missing
            result["quality_error"] = one_line(e)


def measure_quality(rt: Any, q: dict[str, Any]) -> dict[str, Any]:
    """Write the reference (the reference job) or compare with it."""
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


# ------------------------------------------------------------------------------------------ the parent side


def crash_reason(rc: int, log: Path, timed_out: float | None) -> str:
    lines = (
        [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        if log.exists()
        else []
    )
    tail = f" ({lines[-1][:200]})" if lines else ""
    if timed_out:
        return f"timed out after {timed_out:.0f} s"
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = str(-rc)
        return f"worker died with {name}{tail}"
    return f"worker exited with status {rc}{tail}"


def worker_env(omp_wait_policy: str | None) -> dict[str, str]:
    """The environment of a worker: OMP_WAIT_POLICY passive/active, or `unset` for the OpenMP library's own
    default (kititans/__init__ would otherwise default it to PASSIVE); None keeps this process's value."""
    env = dict(os.environ)
    policy = (omp_wait_policy or env.get("OMP_WAIT_POLICY") or "passive").lower()
    if policy == "unset":
        env.pop("OMP_WAIT_POLICY", None)
        env["KITITANS_OMP_WAIT_POLICY"] = "unset"
    else:
        env["OMP_WAIT_POLICY"] = policy.upper()
        env.pop("KITITANS_OMP_WAIT_POLICY", None)
    return env


def run_job(
    job: dict[str, Any],
    work: Path,
    name: str,
    timeout: float,
    on_event: Event,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one job in a worker process (`command` + JOB RESULT; default `python -m kititans.bench.worker`),
    forwarding its progress lines; its result dict, or a failed one with the reason it stopped."""
    job_path, res_path, log_path = (work / f"{name}.{ext}" for ext in ("job.json", "result.json", "log"))
    res_path.unlink(missing_ok=True)
    write_json(job_path, job)
    cmd = [*(command or [sys.executable, "-m", "kititans.bench.worker"]), str(job_path), str(res_path)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env or worker_env(None)
        )
        expired = threading.Event()

        def kill() -> None:
            expired.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            for line in proc.stdout or []:
                if line.startswith(EVENT_PREFIX):
                    on_event({"kind": "stage", "job": name, **json.loads(line[len(EVENT_PREFIX) :])})
            rc = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    timed_out = timeout if expired.is_set() else None
    if res_path.is_file() and not timed_out:
        return json.loads(res_path.read_text())
    return {"status": "failed", "reason": crash_reason(rc, log_path, timed_out)}


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
