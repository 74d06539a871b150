"""`kititans bench`: every (runtime, quant) pair of a run, each measured in its own process.

    plan pairs -> device record + bandwidth -> held-out tokens -> export what is missing (one subprocess)
    -> reference job (torch fp32 writes float16 log-probs) -> one worker per pair -> report dict

A pair that cannot run (runtime not installed, export refused, worker crashed or timed out) becomes a
result with status "failed" and a one-line reason; the others go on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import kititans
from kititans.bench import artifact as art
from kititans.bench import embed as embed_bench
from kititans.bench.device import copy_bandwidth, cuda_copy_bandwidth, default_threads, device_record
from kititans.bench.evaldata import eval_chunks
from kititans.bench.pairs import FORMATS, REFERENCE, Pair, artifact_path, select_pairs, unavailable
from kititans.bench.report import SCHEMA_VERSION, get
from kititans.bench.withruns import (
    WithRun,
    export_task,
    ptq_pairs,
    qat_fields,
    row_key,
    side_by_side,
    with_runs,
)
from kititans.bench.worker import EVENT_PREFIX
from kititans.checkpoint import read_meta
from kititans.errors import KititansError
from kititans.files import sha256_file, write_json
from kititans.models.spec import get_family

Event = Callable[[dict[str, Any]], None]


@dataclass
class BenchConfig:
    run: Path
    runtimes: list[str] | None = None  # names or runtime:quant pairs; None = every runtime available here
    quants: list[str] | None = None
    prompt_tokens: tuple[int, ...] = (128, 512)
    gen_tokens: int = 128
    trials: int = 5
    warmup: int = 1
    seed: int = 0
    threads: int = 0  # 0 = physical cores
    device: str = "cpu"
    quality: bool = True
    eval_text: Path | None = None
    ppl_ctx: int = 0  # 0 = min(512, the model's context)
    ppl_chunks: int = 16
    bandwidth_gbs: float | None = None  # given instead of measured
    out: Path | None = None  # default RUN/bench
    reexport: bool = False
    timeout_s: float = 1800.0
    label: str | None = None
    keep_reference: bool = False
    with_runs: list[Path] = field(default_factory=list)  # QAT runs of `run`: rows against run's reference
    embed_data: str | None = None  # an encoder's held-out token rows (set by run_bench; bench/embed.py)
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ workers


def _crash_reason(rc: int, log: Path, timed_out: float | None) -> str:
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


def run_worker(job: dict[str, Any], work: Path, name: str, timeout: float, on_event: Event) -> dict[str, Any]:
    """Run one job in `python -m kititans.bench.worker`, forwarding its progress lines; its result dict."""
    job_path, res_path, log_path = (work / f"{name}.{ext}" for ext in ("job.json", "result.json", "log"))
    res_path.unlink(missing_ok=True)
    write_json(job_path, job)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    cmd = [sys.executable, "-m", "kititans.bench.worker", str(job_path), str(res_path)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
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
    return {"status": "failed", "reason": _crash_reason(rc, log_path, timed_out)}


# ------------------------------------------------------------------------------------------ exports


def _manifest(path: Path) -> dict[str, Any] | None:
    from kititans.export import manifest_path

    m = manifest_path(path)
    return json.loads(m.read_text()) if m.is_file() else None


def plan_artifacts(cfg: BenchConfig, pairs: list[Pair], failed: dict[str, str]) -> tuple[dict, list]:
    """Per pair: its artifact and whether it is reused; export tasks for the missing or stale ones."""
    from kititans.errors import UnsupportedExport
    from kititans.models.spec import get_family

    spec = get_family(read_meta(cfg.run)["family"])
    weights_sha = sha256_file(cfg.run / "model.safetensors")
    info: dict[str, dict[str, Any]] = {}
    tasks = []
    for p in pairs:
        why = unavailable(p.runtime)
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
        m = _manifest(path) if path.exists() else None
        fresh = m is not None and m.get("source", {}).get("weights_sha256") == weights_sha
        if fresh and not cfg.reexport:
            info[p.key].update(reused=True, manifest=_manifest_summary(m))
        else:
            info[p.key]["reused"] = False
            tasks.append(
                {"key": p.key, "runtime": p.runtime, "quant": p.quant, "format": fmt, "out": str(path)}
            )
    return info, tasks


def _manifest_summary(m: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest fields that change what a quant level means (quantizer, imatrix, method)."""
    if not m:
        return {}
    keys = ("created", "quantizer", "imatrix", "quantization", "genai")
    return {k: m[k] for k in keys if m.get(k) is not None}


def run_exports(cfg: BenchConfig, tasks: list, info: dict, failed: dict, work: Path, on_event: Event) -> None:
    if not tasks:
        return
    on_event({"kind": "exports", "tasks": [t["key"] for t in tasks]})
    job = {"mode": "export", "run": str(cfg.run), "tasks": tasks}
    result = run_worker(job, work, "export", cfg.timeout_s * max(1, len(tasks)), on_event)
    done = {t["key"]: t for t in result.get("tasks", [])}
    weights_sha = sha256_file(cfg.run / "model.safetensors")
    for t in tasks:
        m = _manifest(Path(t["out"])) if Path(t["out"]).exists() else None
        written = m is not None and m.get("source", {}).get("weights_sha256") == weights_sha
        stopped = {"status": "ok", "seconds": None} if written else {"status": "failed"}
        r = done.get(t["key"], {**stopped, "reason": result.get("reason", "the export worker stopped")})
        if r["status"] != "ok":
            failed[t["key"]] = f"export failed: {r['reason']}"
            info.pop(t["key"], None)
            continue
        info[t["key"]].update(seconds=r["seconds"], manifest=_manifest_summary(_manifest(Path(t["out"]))))


# ------------------------------------------------------------------------------------------ the bench


def measure_job(cfg: BenchConfig, pair: Pair, path: str, quality: dict | None, speed: bool) -> dict[str, Any]:
    return {
        "mode": "measure",
        "runtime": pair.runtime,
        "quant": pair.quant,
        "artifact": path,
        "threads": cfg.threads,
        "device": cfg.device,
        "speed": {
            "prompt_tokens": list(cfg.prompt_tokens),
            "gen_tokens": cfg.gen_tokens,
            "trials": cfg.trials,
            "warmup": cfg.warmup,
            "seed": cfg.seed,
        }
        if speed
        else None,
        "quality": {**quality, "data": cfg.embed_data} if quality and cfg.embed_data else quality,
        "embed_data": cfg.embed_data,
    }


def roofline(cfg: BenchConfig, row: dict[str, Any], dims: dict[str, int], bw: dict[str, Any]) -> dict | None:
    """Decode tokens/s against the bandwidth bound BW / (weight bytes + KV bytes read per token)."""
    decode = row.get("speed", {}).get("decode")
    if not decode or not row.get("weight_bytes_per_token"):
        return None
    on_gpu = cfg.device.startswith("cuda") and row["runtime"] in ("torch", "onnx", "genai")
    gbs = bw.get("given_gbs") or (bw.get("gpu_gbs") if on_gpu else bw.get("cpu_gbs"))
    if not gbs:
        return None
    n_past = 1 + row["speed"].get("gen_tokens", cfg.gen_tokens) / 2  # the mean depth of the decode test
    kv = art.kv_bytes_per_token(dims, n_past, art.kv_element_bytes(row["runtime"], row["quant"]))
    per_token = row["weight_bytes_per_token"] + kv
    bound = gbs * 1e9 / per_token
    return {
        "bandwidth_gbs": gbs,
        "bytes_per_token": per_token,
        "kv_bytes_per_token": kv,
        "bound_tps": bound,
        "fraction": decode["median"] / bound,
    }


def measure_bandwidth(cfg: BenchConfig) -> dict[str, Any]:
    if cfg.bandwidth_gbs:
        return {"given_gbs": cfg.bandwidth_gbs, "method": "given with --bandwidth"}
    cpu = copy_bandwidth()
    bw = {"cpu_gbs": cpu["gbs"], "cpu_method": cpu["method"]}
    if cfg.device.startswith("cuda"):
        gpu = cuda_copy_bandwidth()
        if gpu:
            bw.update(gpu_gbs=gpu["gbs"], gpu_method=gpu["method"])
    return bw


def run_info(run: Path) -> dict[str, Any]:
    meta = read_meta(run)
    return {
        "path": str(run),
        "name": run.resolve().name,
        "family": meta["family"],
        "step": meta.get("step"),
        "val_loss": meta.get("val_loss"),
        "stage": meta.get("stage"),
        "weights_sha256": sha256_file(run / "model.safetensors"),
        **art.run_params(run),
        **art.model_dims(run),
    }


def run_bench(cfg: BenchConfig, on_event: Event | None = None) -> dict[str, Any]:
    """Measure every selected pair of cfg.run; the report dict (see report.py for the files)."""
    emit = on_event or (lambda e: None)
    t_start = time.perf_counter()
    cfg.run = Path(cfg.run)
    read_meta(cfg.run)  # a clear error for a path that is not a run
    cfg.threads = cfg.threads or default_threads()
    withs = with_runs(cfg.run, [Path(r) for r in cfg.with_runs])  # checked before any work
    pairs = select_pairs(cfg.runtimes, cfg.quants, gpu=cfg.device.startswith("cuda"))
    pairs += [p for p in ptq_pairs(withs) if p not in pairs]  # each QAT row beside its PTQ row
    if not pairs:
        raise KititansError(
            "no runtime to measure: install one (pip install 'kititans[llamacpp]') or name pairs"
        )
    out = Path(cfg.out) if cfg.out else cfg.run / "bench"
    task = get_family(read_meta(cfg.run)["family"]).task
    embed_rows = None
    if task == "embed":  # an encoder: its held-out pairs time and score every pair (bench/embed.py)
        evald, embed_rows = embed_bench.eval_setup(cfg.run, REFERENCE)
        chunks = None
    else:
        evald, chunks = _eval_setup(cfg) if cfg.quality else (None, None)  # errors come before any work
    emit({"kind": "plan", "pairs": [p.key for p in pairs] + [row_key(w) for w in withs]})
    emit({"kind": "stage", "job": "setup", "stage": "device record and bandwidth"})
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kititans_version": kititans.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": run_info(cfg.run),
        "device": device_record(cfg.threads, cfg.label),
        "bandwidth": measure_bandwidth(cfg),
        "settings": {
            "prompt_tokens": list(cfg.prompt_tokens),
            "gen_tokens": cfg.gen_tokens,
            "trials": cfg.trials,
            "warmup": cfg.warmup,
            "seed": cfg.seed,
            "threads": cfg.threads,
            "device": cfg.device,
            "timeout_s": cfg.timeout_s,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        },
        "units": UNITS,
        "eval": evald if cfg.quality else None,
        "task": task,
    }
    work = out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    quality = None
    if embed_rows is not None:
        cfg.embed_data = str(work / "embed_rows.json")
        embed_bench.save_rows(Path(cfg.embed_data), embed_rows)
        if cfg.quality:
            quality = {"reference": str(out / "reference.npz"), "chunks": cfg.embed_data}
    if chunks is not None:
        np.save(work / "chunks.npy", np.asarray(chunks, dtype=np.int64))
        quality = {"reference": str(out / "reference.npz"), "chunks": str(work / "chunks.npy")}
    try:
        failed: dict[str, str] = {}
        info, tasks = plan_artifacts(cfg, pairs, failed)
        run_exports(cfg, tasks, info, failed, work, emit)
        report["results"] = _measure_all(cfg, pairs, info, failed, quality, report, work, emit)
        if withs:
            extra = [_measure_with(cfg, w, quality, report, work, emit) for w in withs]
            report["results"] = side_by_side(report["results"], extra)
            report["with"] = [qat_fields(w, cfg.run) for w in withs]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if quality and not cfg.keep_reference:
            Path(quality["reference"]).unlink(missing_ok=True)
    report["seconds"] = time.perf_counter() - t_start
    return report


def _eval_setup(cfg: BenchConfig) -> tuple[dict[str, Any], list[list[int]]]:
    """The held-out chunks and their description for the report."""
    chunks, source = eval_chunks(cfg.run, cfg.eval_text, cfg.ppl_ctx, cfg.ppl_chunks)
    n_ctx = len(chunks[0])
    evald = {
        "source": source,
        "n_ctx": n_ctx,
        "chunks": len(chunks),
        "scored_tokens": len(chunks) * (n_ctx - 1 - n_ctx // 2),
        "reference": {"runtime": REFERENCE[0], "quant": REFERENCE[1]},
        "definitions": "llama-perplexity: BOS-led chunks, second half scored, KL(reference || pair)",
    }
    return evald, chunks


def _measure_all(cfg, pairs, info, failed, quality, report, work, emit) -> list[dict[str, Any]]:
    ref_pair = Pair(*REFERENCE)
    order = sorted(pairs, key=lambda p: p != ref_pair)  # the reference job first
    rows: dict[str, dict[str, Any]] = {}
    ref_ok = True
    if quality and ref_pair not in pairs:  # quality needs the reference even when torch fp32 is not listed
        q = {"reference": quality["reference"], "make_reference": quality["chunks"]}
        job = measure_job(cfg, ref_pair, str(cfg.run), q, speed=False)
        res = run_worker(job, work, "reference", cfg.timeout_s, emit)
        ref_ok = res.get("status") == "ok" and "quality" in res
        report["eval"]["reference"].update(status="ok" if ref_ok else "failed", reason=_reason(res))
    for i, p in enumerate(order):
        emit({"kind": "start", "pair": p.key, "index": i, "total": len(order)})
        row: dict[str, Any] = {"runtime": p.runtime, "quant": p.quant, "key": p.key}
        if p.key in failed:
            rows[p.key] = {**row, "status": "failed", "reason": failed[p.key]}
            emit({"kind": "pair", "result": rows[p.key]})
            continue
        q = None
        if quality and (ref_ok or p == ref_pair):
            q = {"reference": quality["reference"]}
            if p == ref_pair:
                q["make_reference"] = quality["chunks"]
        t0 = time.perf_counter()
        res = run_worker(measure_job(cfg, p, info[p.key]["path"], q, True), work, p.slug, cfg.timeout_s, emit)
        row.update(res, seconds=time.perf_counter() - t0, artifact=info[p.key]["path"])
        row["export"] = {k: v for k, v in info[p.key].items() if k != "path"}
        if quality and not ref_ok and p != ref_pair:
            row["quality_error"] = f"no reference log-probs: {report['eval']['reference'].get('reason')}"
        if p == ref_pair and quality:
            ref_ok = "quality" in res
            report["eval"]["reference"].update(status="ok" if ref_ok else "failed", reason=_reason(res))
        try:
            row.update(art.describe(cfg.run, p.runtime, p.quant, Path(info[p.key]["path"])))
        except Exception as e:
            row["describe_error"] = f"{type(e).__name__}: {e}"
        if row.get("status") == "ok":
            row["roofline"] = roofline(cfg, row, art.model_dims(cfg.run), report["bandwidth"])
        rows[p.key] = row
        emit({"kind": "pair", "result": row})
    return [rows[p.key] for p in pairs]


def _measure_with(
    cfg: BenchConfig, w: WithRun, quality: dict | None, report: dict, work: Path, emit: Event
) -> dict[str, Any]:
    """A --with run at its target level: exported in its own run dir if missing, measured against the bench
    run's reference."""
    key = row_key(w)
    row: dict[str, Any] = {
        "runtime": w.pair.runtime,
        "quant": w.pair.quant,
        "key": key,
        "qat": qat_fields(w, cfg.run),
    }
    emit({"kind": "start", "pair": key})
    why = unavailable(w.pair.runtime)
    path = artifact_path(w.run, w.pair)
    m = _manifest(path) if path.exists() else None
    fresh = m is not None and m.get("source", {}).get("weights_sha256") == sha256_file(
        w.run / "model.safetensors"
    )
    if why is None and (not fresh or cfg.reexport):
        res = run_worker(
            {"mode": "export", "run": str(w.run), "tasks": [export_task(w)]},
            work,
            f"export-{w.name}",
            cfg.timeout_s,
            emit,
        )
        done = (res.get("tasks") or [{}])[0]
        if done.get("status") != "ok":
            why = f"export failed: {done.get('reason') or res.get('reason')}"
    if why:
        row.update(status="failed", reason=why)
        emit({"kind": "pair", "result": row})
        return row
    ref_ok = get(report, "eval", "reference", "status") == "ok"
    q = {"reference": quality["reference"]} if quality and ref_ok else None
    t0 = time.perf_counter()
    res = run_worker(
        measure_job(cfg, w.pair, str(path), q, True), work, f"{w.pair.slug}-{w.name}", cfg.timeout_s, emit
    )
    row.update(res, seconds=time.perf_counter() - t0, artifact=str(path))
    row["export"] = {"reused": fresh and not cfg.reexport, "manifest": _manifest_summary(_manifest(path))}
    if quality and not ref_ok:
        row["quality_error"] = f"no reference log-probs: {get(report, 'eval', 'reference', 'reason')}"
    try:
        row.update(art.describe(w.run, w.pair.runtime, w.pair.quant, path))
    except Exception as e:
        row["describe_error"] = f"{type(e).__name__}: {e}"
    if row.get("status") == "ok":
        row["roofline"] = roofline(cfg, row, art.model_dims(w.run), report["bandwidth"])
    emit({"kind": "pair", "result": row})
    return row


def _reason(res: dict[str, Any]) -> str | None:
    return res.get("reason") or res.get("quality_error")


UNITS = {
    "speed.prefill": "tokens/s per prompt length (median, min, max, q1, q3, mean, stdev over trials)",
    "speed.decode": "tokens/s",
    "speed.ttft_ms": "milliseconds from the prompt to the first chosen token, per prompt length",
    "*_bytes": "bytes",
    "*_s": "seconds",
    "bandwidth.*_gbs": "GB/s (1e9 bytes/s)",
    "bits_per_weight": "8 x weight bytes read per token / parameters read per token",
    "quality.ppl_drift_pct": "percent, 100 x (PPL / PPL(reference) - 1)",
    "quality.kld_*": "nats, KL(reference || pair) per token",
    "quality.same_top": "fraction of tokens whose most likely next token equals the reference's",
    "quality.delta_p_*": "probability of the true next token, pair minus reference",
    "roofline.fraction": "decode tokens/s / (bandwidth / bytes per token)",
}


def config_dict(cfg: BenchConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
