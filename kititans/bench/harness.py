"""`kititans bench`: every (runtime, quant) pair of a run, each measured in its own process.

    plan pairs -> device record + bandwidth -> held-out tokens -> export what is missing (one subprocess)
    -> reference job (torch fp32 writes float16 log-probs) -> one worker per pair -> report dict

A pair that cannot run (runtime not installed, export refused, worker crashed or timed out) becomes a
result with status "failed" and a one-line reason; the others go on.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import kititans
from kititans.bench import artifact as art
from kititans.bench import embed as embed_bench
from kititans.bench.board import thermal_state
from kititans.bench.cells import get
from kititans.bench.device import copy_bandwidth, cuda_copy_bandwidth, default_threads, device_record
from kititans.bench.evaldata import eval_chunks
from kititans.bench.exports import manifest_of, manifest_summary, plan_artifacts, run_exports
from kititans.bench.pairs import REFERENCE, Pair, artifact_path, select_pairs, unavailable
from kititans.bench.report import SCHEMA_VERSION
from kititans.bench.rows import UNITS, Row, RowOptions, check_options, placement, rows_for
from kititans.bench.rows import roofline as row_roofline
from kititans.bench.withruns import (
    WithRun,
    export_task,
    ptq_pairs,
    qat_fields,
    row_key,
    side_by_side,
    with_runs,
)
from kititans.bench.worker import run_job, worker_env
from kititans.checkpoint import read_meta
from kititans.errors import KititansError
from kititans.files import sha256_file
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
    threads: int = 0  # 0 = performance cores (physical; big.LITTLE's LITTLE cores left out)
    device: str = "cpu"
    rows: RowOptions = field(default_factory=RowOptions)  # llama.cpp repack / GPU layers, CoreML units
    delay_s: float = 0.0  # pause before each timed trial and between rows (cooling)
    omp_wait_policy: str | None = None  # passive | active | unset; None = OMP_WAIT_POLICY or passive
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


def run_worker(
    job: dict[str, Any], work: Path, name: str, timeout: float, on_event: Event, policy: str | None = None
) -> dict[str, Any]:
    """Run one job in `python -m kititans.bench.worker` (worker.run_job) with the bench's OpenMP policy."""
    return run_job(job, work, name, timeout, on_event, env=worker_env(policy))


# ------------------------------------------------------------------------------------------ the bench


def measure_job(
    cfg: BenchConfig,
    pair: Pair,
    path: str,
    quality: dict | None,
    speed: bool,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "mode": "measure",
        "runtime": pair.runtime,
        "quant": pair.quant,
        "artifact": path,
        "threads": cfg.threads,
        "device": cfg.device,
        "settings": settings or {},
        "speed": {
            "prompt_tokens": list(cfg.prompt_tokens),
            "gen_tokens": cfg.gen_tokens,
            "trials": cfg.trials,
            "warmup": cfg.warmup,
            "seed": cfg.seed,
            "delay_s": cfg.delay_s,
        }
        if speed
        else None,
        "quality": {**quality, "data": cfg.embed_data} if quality and cfg.embed_data else quality,
        "embed_data": cfg.embed_data,
    }


def roofline(cfg: BenchConfig, row: dict[str, Any], dims: dict[str, int], bw: dict[str, Any]) -> dict | None:
    """Decode tokens/s against the bandwidth bound (rows.roofline)."""
    return row_roofline(row, dims, bw, cfg.device, cfg.gen_tokens)


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
    check_options(cfg.rows)
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
            "omp_wait_policy": worker_env(cfg.omp_wait_policy).get("OMP_WAIT_POLICY", "unset"),
            "delay_s": cfg.delay_s,
            "repack": cfg.rows.repack,
            "n_gpu_layers": cfg.rows.n_gpu_layers,
            "coreml_units": list(cfg.rows.coreml_units),
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
        keys = [r.key for p in pairs for r in ([p] if p.key in failed else rows_for(*astuple(p), cfg.rows))]
        emit({"kind": "plan", "pairs": keys + [row_key(w) for w in withs]})
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
        "tokens_sha256": tokens_sha256(chunks),
    }
    return evald, chunks


def tokens_sha256(chunks: list[list[int]]) -> str:
    """The identity of the scored text: sha256 of the chunks as little-endian int64 (what `bench compare`
    checks, whatever file or split they came from)."""
    return hashlib.sha256(np.asarray(chunks, dtype="<i8").tobytes()).hexdigest()


def _measure_all(cfg, pairs, info, failed, quality, report, work, emit) -> list[dict[str, Any]]:
    ref_pair = Pair(*REFERENCE)
    order = sorted(pairs, key=lambda p: p != ref_pair)  # the reference job first
    out: dict[str, list[dict[str, Any]]] = {}
    ref_ok = True
    if quality and ref_pair not in pairs:  # quality needs the reference even when torch fp32 is not listed
        q = {"reference": quality["reference"], "make_reference": quality["chunks"]}
        job = measure_job(cfg, ref_pair, str(cfg.run), q, speed=False)
        res = run_worker(job, work, "reference", cfg.timeout_s, emit, cfg.omp_wait_policy)
        ref_ok = res.get("status") == "ok" and "quality" in res
        report["eval"]["reference"].update(status="ok" if ref_ok else "failed", reason=_reason(res))
    for p in order:
        if p.key in failed:
            out[p.key] = [{"runtime": p.runtime, "quant": p.quant, "key": p.key, "status": "failed"}]
            out[p.key][0]["reason"] = failed[p.key]
            emit({"kind": "pair", "result": out[p.key][0]})
            continue
        q = None
        if quality and (ref_ok or p == ref_pair):
            q = {"reference": quality["reference"]}
            if p == ref_pair:
                q["make_reference"] = quality["chunks"]
        out[p.key] = []
        for r in rows_for(p.runtime, p.quant, cfg.rows):
            row = measure_row(cfg, cfg.run, p, r, info[p.key]["path"], q, work, emit, report["bandwidth"])
            row["export"] = {k: v for k, v in info[p.key].items() if k != "path"}
            if quality and not ref_ok and p != ref_pair:
                row["quality_error"] = f"no reference log-probs: {report['eval']['reference'].get('reason')}"
            if p == ref_pair and quality:
                ref_ok = "quality" in row
                report["eval"]["reference"].update(status="ok" if ref_ok else "failed", reason=_reason(row))
            out[p.key].append(row)
            emit({"kind": "pair", "result": row})
    return [row for p in pairs for row in out[p.key]]


def measure_row(cfg, run: Path, p: Pair, r: Row, path: str, q, work: Path, emit: Event, bw) -> dict[str, Any]:
    """One row in its own worker: its settings, thermal state before and after, size and roofline."""
    emit({"kind": "start", "pair": r.key})
    row: dict[str, Any] = {"runtime": p.runtime, "quant": p.quant, "key": r.key, "settings": r.settings}
    if cfg.delay_s:
        time.sleep(cfg.delay_s)  # let the device cool between rows too
    before, t0 = thermal_state(), time.perf_counter()
    job = measure_job(cfg, p, path, q, True, r.settings)
    res = run_worker(job, work, r.slug, cfg.timeout_s, emit, cfg.omp_wait_policy)
    row.update(res, seconds=time.perf_counter() - t0, artifact=path)
    row["thermal"] = {"before": before, "after": thermal_state()}
    row["placement"] = placement(row, cfg.device)
    try:
        row.update(art.describe(run, p.runtime, p.quant, Path(path)))
    except Exception as e:
        row["describe_error"] = f"{type(e).__name__}: {e}"
    if row.get("status") == "ok":
        row["roofline"] = roofline(cfg, row, art.model_dims(run), bw)
    return row


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
    m = manifest_of(path) if path.exists() else None
    fresh = m is not None and m.get("source", {}).get("weights_sha256") == sha256_file(
        w.run / "model.safetensors"
    )
    if why is None and (not fresh or cfg.reexport):
        job = {"mode": "export", "run": str(w.run), "tasks": [export_task(w)]}
        res = run_worker(job, work, f"export-{w.name}", cfg.timeout_s, emit, cfg.omp_wait_policy)
        done = (res.get("tasks") or [{}])[0]
        if done.get("status") != "ok":
            why = f"export failed: {done.get('reason') or res.get('reason')}"
    if why:
        row.update(status="failed", reason=why)
        emit({"kind": "pair", "result": row})
        return row
    ref_ok = get(report, "eval", "reference", "status") == "ok"
    q = {"reference": quality["reference"]} if quality and ref_ok else None
    r = rows_for(w.pair.runtime, w.pair.quant, cfg.rows)[0]
    r = Row(r.runtime, r.quant, w.name, r.settings)  # its own worker files
    measured = measure_row(cfg, w.run, w.pair, r, str(path), q, work, emit, report["bandwidth"])
    row.update({k: v for k, v in measured.items() if k != "key"})
    row["export"] = {"reused": fresh and not cfg.reexport, "manifest": manifest_summary(manifest_of(path))}
    if quality and not ref_ok:
        row["quality_error"] = f"no reference log-probs: {get(report, 'eval', 'reference', 'reason')}"
    emit({"kind": "pair", "result": row})
    return row


def _reason(res: dict[str, Any]) -> str | None:
    return res.get("reason") or res.get("quality_error")


def config_dict(cfg: BenchConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
