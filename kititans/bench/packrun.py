"""The runner inside a bench pack (`python PACK/run.py`): measures the pack's artifacts on the device it runs
on, with no torch and no kititans install, and writes a report `kititans bench compare` reads.

It runs from PACK/kititans.pyz, a zipapp that `kititans bench pack` builds from this package's own torch-free
modules (RUNNER_MODULES; a test imports each with torch blocked). Each row runs in its own worker process
(`python PACK/kititans.pyz worker JOB RESULT`, bench/worker.py), as `kititans bench` runs its pairs.

    check the manifest (format, version) -> verify every file's sha256 -> plan rows (a runtime package that
    is missing, or CoreML off macOS, skips its rows with the reason) -> device record, bandwidth -> per row:
    thermal state, worker (speed on the stored prompt ids, memory, quality against the memory-mapped fp32
    reference), thermal state -> report (JSON + Markdown, written atomically)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import kititans
from kititans.argtypes import int_list
from kititans.bench.board import thermal_state
from kititans.bench.device import copy_bandwidth, default_threads, device_record, peak_rss_bytes, ram_bytes
from kititans.bench.rows import (
    UNITS,
    Row,
    RowOptions,
    add_row_options,
    check_options,
    placement,
    roofline,
    rows_for,
)
from kititans.bench.worker import run_job, worker_env
from kititans.errors import KititansError
from kititans.files import sha256_file, write_json, write_text

PACK_FORMAT = "kititans-benchpack"
PACK_VERSION = 1
MANIFEST = "manifest.json"
ZIPAPP = "kititans.pyz"
REPORT_SCHEMA = 1  # bench/report.py SCHEMA_VERSION (report.py imports more than the runner needs at start)

# what a row needs on the device: (module, pip package)
RUNTIME_PACKAGES = {
    "llamacpp": ("llama_cpp", "llama-cpp-python"),
    "onnx": ("onnxruntime", "onnxruntime"),
    "genai": ("onnxruntime_genai", "onnxruntime-genai"),
    "coreml": ("coremltools", "coremltools"),
}

# the torch-free modules the zipapp is built from (bench/pack.py); tests import each with torch blocked
RUNNER_MODULES = (
    "kititans",
    "kititans.argtypes",
    "kititans.errors",
    "kititans.files",
    "kititans.generate",
    "kititans.embedding",
    "kititans.runtimes",
    "kititans.runtimes.base",
    "kititans.runtimes.host",
    "kititans.runtimes.llamacpp",
    "kititans.runtimes.llamacpp_lib",
    "kititans.runtimes.onnx",
    "kititans.runtimes.onnx_steps",
    "kititans.runtimes.coreml",
    "kititans.quantize",
    "kititans.quantize.coreml",
    "kititans.quantize.onnx",
    "kititans.bench",
    "kititans.bench.artifact",
    "kititans.bench.board",
    "kititans.bench.cells",
    "kititans.bench.device",
    "kititans.bench.embed",
    "kititans.bench.packrun",
    "kititans.bench.quality",
    "kititans.bench.report",
    "kititans.bench.rows",
    "kititans.bench.speed",
    "kititans.bench.worker",
)


# ------------------------------------------------------------------------------------------ the pack


def load_manifest(pack: Path) -> dict[str, Any]:
    """The pack's manifest, checked: a bench pack, of a format version this runner reads."""
    path = pack / MANIFEST
    if not path.is_file():
        raise KititansError(f"{pack}: no {MANIFEST}: not a bench pack (make one with `kititans bench pack`)")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KititansError(f"{path}: unreadable manifest ({e}): copy the pack again") from None
    if not isinstance(m, dict) or m.get("format") != PACK_FORMAT:
        raise KititansError(f"{path}: not a kititans bench pack manifest")
    version = m.get("pack_version")
    if not isinstance(version, int) or version > PACK_VERSION:
        raise KititansError(
            f"{pack} was made by a newer kititans ({m.get('kititans_version')}, pack format {version}); this "
            f"runner reads format {PACK_VERSION}: rebuild the pack, or copy it again with its own run.py"
        )
    return m


def verify(pack: Path, manifest: dict[str, Any]) -> tuple[int, int]:
    """Check every listed file's size and sha256; (files, bytes). One line names the first bad file."""
    n = total = 0
    for rel, want in manifest["files"].items():
        path = pack / rel
        if not path.is_file():
            raise KititansError(f"{path}: missing from the pack (the manifest lists it): copy the pack again")
        size = path.stat().st_size
        if size != want["bytes"] or sha256_file(path) != want["sha256"]:
            raise KititansError(
                f"{path}: does not match the pack's manifest (sha256 or size differs): the copy is damaged "
                "or was edited; copy the pack again"
            )
        n, total = n + 1, total + size
    return n, total


def row_unavailable(runtime: str) -> str | None:
    """Why `runtime` cannot run here, or None."""
    if runtime == "coreml" and platform.system() != "Darwin":
        return f"CoreML models run only on macOS, not on {platform.system()}"
    module, pip = RUNTIME_PACKAGES.get(runtime, (runtime, runtime))
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed here: pip install {pip}"
    return None


def plan_rows(manifest: dict[str, Any], opts: RowOptions, only: list[str] | None) -> list[dict[str, Any]]:
    """One entry per row: its artifact, Row, and `skip` (the reason) when it cannot run here. Rows named in
    `only` that cannot run are errors; so is a plan with nothing to run."""
    plan = []
    for a in manifest["artifacts"]:
        for r in rows_for(a["runtime"], a["quant"], opts):
            if only and not any(x in (r.key, r.pair_key, r.runtime) for x in only):
                continue
            plan.append({"artifact": a, "row": r, "skip": row_unavailable(r.runtime)})
    if only:
        unknown = [
            x for x in only if not any(x in (p["row"].key, p["row"].pair_key, p["row"].runtime) for p in plan)
        ]
        if unknown:
            keys = ", ".join(
                r.key for a in manifest["artifacts"] for r in rows_for(a["runtime"], a["quant"], opts)
            )
            raise KititansError(f"--rows {unknown[0]!r}: this pack has no such row; its rows: {keys}")
        bad = [p for p in plan if p["skip"]]
        if bad:
            raise KititansError(f"{bad[0]['row'].key}: {bad[0]['skip']}")
    if plan and all(p["skip"] for p in plan):
        reasons = sorted({p["skip"] for p in plan})
        raise KititansError("no row of this pack can run here: " + "; ".join(reasons))
    return plan


# ------------------------------------------------------------------------------------------ measuring


def row_job(pack: Path, m: dict[str, Any], a: dict[str, Any], r: Row, args: argparse.Namespace) -> dict:
    """The worker job of one row: the artifact in the pack, the stored prompt ids, the reference folder."""
    prompts = json.loads((pack / m["speed"]["prompts"]).read_text())
    return {
        "mode": "measure",
        "runtime": r.runtime,
        "quant": r.quant,
        "artifact": str(pack / a["path"]),
        "threads": args.threads,
        "device": args.device,
        "settings": r.settings,
        "codec": m["tokenizer"],
        "speed": {
            "prompt_tokens": list(args.prompt_tokens),
            "gen_tokens": args.gen_tokens,
            "trials": args.trials,
            "warmup": args.warmup,
            "seed": m["speed"]["seed"],
            "delay_s": args.delay,
            "prompts": prompts,
        },
        "quality": {"reference": str(pack / m["reference"]["path"])} if args.quality else None,
    }


def measure(pack: Path, m: dict, entry: dict, args: argparse.Namespace, work: Path, report: dict) -> dict:
    a, r = entry["artifact"], entry["row"]
    row: dict[str, Any] = {"runtime": r.runtime, "quant": r.quant, "key": r.key, "settings": r.settings}
    if entry["skip"]:
        return {**row, "status": "skipped", "reason": entry["skip"]}
    before, t0 = thermal_state(), time.perf_counter()
    env = worker_env(args.omp_wait_policy)
    command = [sys.executable, str(pack / ZIPAPP), "worker"]
    res = run_job(row_job(pack, m, a, r, args), work, r.slug, args.timeout, _quiet, command=command, env=env)
    row.update(res, seconds=time.perf_counter() - t0, artifact=a["path"])
    row["thermal"] = {"before": before, "after": thermal_state()}
    row["placement"] = placement(row, args.device)
    keys = ("size_bytes", "params", "weight_bytes_per_token", "bits_per_weight", "weight_bytes_method")
    row.update({k: a[k] for k in keys if k in a})
    row["export"] = a.get("export", {})
    if row.get("status") == "ok":
        row["roofline"] = roofline(row, m["run"], report["bandwidth"], args.device, args.gen_tokens)
    return row


def bandwidth(given: float | None) -> dict[str, Any]:
    """The roofline's bandwidth: given, or a copy test of 256 MiB (less on a board with under 4 GiB of RAM,
    1/16 of it, so a 512 MiB board can run it)."""
    if given:
        return {"given_gbs": given, "method": "given with --bandwidth"}
    mib = int(min(256, max(16, ram_bytes() / 2**20 / 16)))
    bw = copy_bandwidth(mib)
    return {"cpu_gbs": bw["gbs"], "cpu_method": bw["method"]}


def _quiet(event: dict[str, Any]) -> None:
    return None


def summary(r: dict[str, Any]) -> str:
    from kititans.bench.cells import fmt

    name = f"{r['runtime']} {r['quant']}" + (f" @{r['key'].partition('@')[2]}" if "@" in r["key"] else "")
    if r["status"] != "ok":
        return f"  {r['status'].upper():<7} {name:<24} {r.get('reason', '')}"
    parts = [f"pp{n} {fmt(s['median'])} t/s" for n, s in r["speed"].get("prefill", {}).items()]
    if r["speed"].get("decode"):
        parts.append(f"tg {fmt(r['speed']['decode']['median'])} t/s")
    parts.append(f"RSS {r['memory']['peak_rss_bytes'] / 2**20:.0f} MiB")
    q = r.get("quality")
    if q:
        parts.append(f"PPL {fmt(q['ppl'])} ({q['ppl_drift_pct']:+.3f}%) KLD {q['kld_mean']:.2e}")
    elif r.get("quality_error"):
        parts.append(f"quality: {r['quality_error']}")
    return f"  ok      {name:<24} " + "  ".join(parts) + f"  [{r['placement']}]"


def new_report(pack: Path, m: dict[str, Any], args: argparse.Namespace, opts: RowOptions) -> dict[str, Any]:
    """The report's header: the run and eval from the manifest, this device, its bandwidth, the settings."""
    return {
        "schema_version": REPORT_SCHEMA,
        "kititans_version": kititans.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": m["run"],
        "pack": {k: m.get(k) for k in ("created", "kititans_version", "pack_version")} | {"path": str(pack)},
        "device": device_record(args.threads, args.label),
        "bandwidth": bandwidth(args.bandwidth),
        "settings": {
            "prompt_tokens": list(args.prompt_tokens),
            "gen_tokens": args.gen_tokens,
            "trials": args.trials,
            "warmup": args.warmup,
            "seed": m["speed"]["seed"],
            "threads": args.threads,
            "device": args.device,
            "timeout_s": args.timeout,
            "omp_wait_policy": worker_env(args.omp_wait_policy).get("OMP_WAIT_POLICY", "unset"),
            "delay_s": args.delay,
            "repack": opts.repack,
            "n_gpu_layers": opts.n_gpu_layers,
            "coreml_units": list(opts.coreml_units),
            "prompt_ids": "stored in the pack",
        },
        "units": UNITS,
        "eval": m["eval"] if args.quality else None,
        "task": "lm",
    }


def run(args: argparse.Namespace, pack: Path) -> int:
    t_start = time.perf_counter()
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, flush=True))
    m = load_manifest(pack)
    opts = check_options(RowOptions(args.repack, args.n_gpu_layers, tuple(args.coreml_units)))
    args.threads = args.threads or default_threads()
    args.prompt_tokens = args.prompt_tokens or tuple(m["speed"]["prompt_tokens"])
    args.gen_tokens = args.gen_tokens or m["speed"]["gen_tokens"]
    run_info = m["run"]
    say(
        f"pack {pack.name}: {run_info['name']} ({run_info['family']}, {run_info['params'] / 1e6:.2f} M parameters)"
    )
    verified = None
    if args.verify:
        t0 = time.perf_counter()
        n, nbytes = verify(pack, m)
        verified = {"files": n, "bytes": nbytes, "seconds": time.perf_counter() - t0}
        say(
            f"verified {n} files ({nbytes / 2**20:.1f} MiB) against the manifest in {verified['seconds']:.1f} s"
        )
    ref = m["reference"]
    if args.quality:
        say(
            f"reference: {ref['scored_tokens']} scored tokens x {ref['vocab']} vocab, float16, "
            f"{ref['bytes'] / 2**20:.1f} MiB, memory-mapped from {pack / ref['path']}"
        )
    plan = plan_rows(m, opts, args.rows)
    startup_peak = peak_rss_bytes()  # before the bandwidth test's buffers
    for p in plan:
        if p["skip"]:
            say(f"  skip    {p['row'].key:<24} {p['skip']}")
    report = new_report(pack, m, args, opts)
    report["runner"] = {"verified": verified, "startup_peak_rss_bytes": startup_peak}
    report["runner"]["startup_s"] = time.perf_counter() - t_start  # until the first row starts
    say(
        f"device: {report['device']['label']}; {args.threads} threads; {sum(not p['skip'] for p in plan)} rows"
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="benchpack-") as work:
        for i, entry in enumerate(plan):
            if i and args.delay and not entry["skip"]:
                time.sleep(args.delay)
            results.append(measure(pack, m, entry, args, Path(work), report))
            if not entry["skip"]:  # skipped rows were listed before the first row
                say(summary(results[-1]))
    report["results"] = results
    report["runner"]["peak_rss_bytes"] = peak_rss_bytes()
    report["seconds"] = time.perf_counter() - t_start
    out = Path(args.out)
    write_json(out, report)
    from kititans.bench.report import render_markdown

    write_text(out.with_suffix(".md"), render_markdown(report))
    ok = sum(r["status"] == "ok" for r in results)
    say(
        f"{ok}/{len(results)} rows measured in {report['seconds']:.0f} s -> {out} (+ {out.with_suffix('.md').name})"
    )
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------ the command


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python PACK/run.py",
        description="Measure this bench pack's artifacts on this device (no torch, no kititans install).",
        epilog="example: pip install numpy onnxruntime llama-cpp-python && "
        "python my-run.benchpack/run.py --label pi5 --trials 5 --delay 2 --out pi5.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--label", help="this device's name in reports (default: board, GPU or CPU model)")
    p.add_argument(
        "--out", default="bench.json", help="report file (default bench.json; a .md is written beside)"
    )
    p.add_argument("--trials", type=int, default=5, help="timed repetitions per test (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each test (default 1)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: the performance cores)")
    p.add_argument("--device", default="cpu", help="onnx rows: cpu or cuda (default cpu)")
    p.add_argument("--rows", type=lambda v: [x.strip() for x in v.split(",") if x.strip()], metavar="KEYS",
                   help="only these rows: keys, pairs or runtimes, e.g. llamacpp:q4_0,coreml")  # fmt: skip
    p.add_argument(
        "--prompt-tokens", type=int_list, metavar="N,N", help="prefill lengths (default: the pack's)"
    )
    p.add_argument(
        "--gen-tokens", type=int, default=0, metavar="N", help="decode length (default: the pack's)"
    )
    p.add_argument("--no-quality", dest="quality", action="store_false", help="speed and memory only")
    p.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip the sha256 check of the files"
    )
    p.add_argument("--timeout", type=float, default=1800, metavar="S", help="seconds per row (default 1800)")
    p.add_argument(
        "--bandwidth",
        type=float,
        metavar="GB/S",
        help="memory bandwidth for the roofline (default: a copy test)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    add_row_options(p)
    return p


def main(argv: list[str] | None = None, pack: str | Path | None = None) -> int:
    """The runner's entry point (run.py passes the pack folder); a KititansError is one line, exit 2."""
    args = parser().parse_args(argv)
    try:
        if args.trials < 1 or args.warmup < 0 or args.delay < 0:
            raise KititansError("--trials must be >= 1, --warmup and --delay >= 0")
        return run(args, Path(pack or Path(__file__).resolve().parents[3]))
    except KititansError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no report was written", file=sys.stderr)
        return 130
