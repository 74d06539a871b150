"""GPU training throughput, MFU and memory in stages that fit a short machine loan (issues 16, 25).

A lent GPU machine gives 10 minutes a command and about 15 in all, has no network, and lacks some of
kititans' packages. So everything slow or CPU-bound is done here first, and each stage on the GPU is one
bounded `kititans train` (or `kititans bench`) whose JSON is written to the output folder the moment it ends:
a later stage that runs out of time, or out of memory, loses nothing measured before it.

    # 1. on the CPU machine: 32k-vocabulary shards (synthetic text: content does not matter for speed) + a
    #    small trained run for the bench stage, into an ignored folder the device call carries
    python benchmarks/train_gpu.py prepare --out .gpu
    # 2. on the GPU (device tool: carry [".gpu"], timeout ~570 s); stages run in this order until --budget-s
    PYTHONPATH=. python benchmarks/train_gpu.py run --data .gpu --out "$OUT" --budget-s 540
    # 3. anywhere: every stage at debug size on the CPU, to check the script itself (CI runs this)
    python benchmarks/train_gpu.py dry-run --out /tmp/train_gpu_dry

Stages: `lite125m` (1 GPU, bf16, torch.compile; target >= 40% MFU on an H100), `titans500m` (1 GPU, bf16,
compile, activation checkpointing; target >= 25%), `ddp` and `fsdp` (lite-125m over every GPU, when there are
several), `bench` (`kititans bench --device cuda` of the prepared run: torch and ONNX Runtime rows). A stage
that runs out of memory is recorded as {"status": "oom"} and the next one runs.

MFU caveats, printed with the results: model FLOPs are 6 x matmul parameters + attention (12 x layers x width x
attended keys, halved for causal attention, capped by the sliding window), over the GPU's dense bf16 peak
from its data sheet; the first logged steps (compilation, warm-up) are left out of the medians; Titans' memory
update is counted from its matmuls, its many small elementwise ops are not (they cost time, not FLOPs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CAVEATS = (
    "MFU = model FLOPs (6 x matmul params + causal attention, window-capped) / dense bf16 peak of the data "
    "sheet; medians skip the first logged steps (compile, warm-up); Titans' small memory ops cost time, not FLOPs"
)


@dataclass
class Stage:
    name: str
    preset: str
    micro_batch: int
    seq_len: int
    steps: int
    extra: list[str] = field(default_factory=list)
    gpus_needed: int = 1
    nproc: int = 1  # processes (DDP / FSDP2 over every GPU)


def stages(gpus: int) -> list[Stage]:
    out = [
        Stage("lite125m", "lite-125m", 16, 2048, 40),
        Stage("titans500m", "titans-500m", 8, 2048, 24, ["--set", "train.activation_checkpointing=true"]),
    ]
    if gpus > 1:
        for par in ("ddp", "fsdp"):
            out.append(Stage(par, "lite-125m", 16, 2048, 30, ["--parallel", par], gpus_needed=2, nproc=gpus))
    return out


def debug_stages() -> list[Stage]:
    """The same stages at debug size on the CPU (the dry run): the script, not the GPU, is what is checked."""
    return [
        Stage("lite125m", "debug", 2, 64, 3),
        Stage("titans500m", "titans-debug", 2, 64, 3, ["--set", "train.activation_checkpointing=true"]),
        Stage("ddp", "debug", 2, 64, 3, ["--parallel", "ddp"], nproc=2),
    ]


def kititans(*args: object) -> list[str]:
    return [sys.executable, "-m", "kititans", *map(str, args)]


def run(cmd: list[str], timeout: float, env: dict[str, str]) -> tuple[int | None, str]:
    """(return code or None on timeout, the last of stderr)."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), env=env)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return None, err[-2000:]
    return r.returncode, (r.stderr or "")[-2000:]


def medians(run_dir: Path, skip: int) -> dict[str, float | None]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    rows = [r for r in rows if "loss" in r]
    warm = [r for r in rows if r["step"] > skip] or rows[-1:]

    def med(key: str) -> float | None:
        vals = [r[key] for r in warm if r.get(key) is not None]
        return round(statistics.median(vals), 4) if vals else None

    peak = [r[k] for r in rows for k in ("peak_memory_mib", "peak_mem_mib", "max_memory_mib") if r.get(k)]
    return {
        "tokens_per_s": med("tokens_per_s"),
        "mfu": med("mfu"),
        "final_loss": rows[-1]["loss"] if rows else None,
        "logged_steps": len(rows),
        "peak_memory_mib": max(peak) if peak else None,
    }


def status_of(code: int | None, err: str) -> str:
    if code is None:
        return "timeout"
    low = err.lower()
    if code != 0 and ("out of memory" in low or "outofmemoryerror" in low):
        return "oom"
    return "ok" if code == 0 else "error"


def train_stage(
    st: Stage, data: Path, out: Path, device: str, dry: bool, timeout: float, env: dict[str, str]
) -> dict:
    run_dir = out / f"run-{st.name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    precision = ["--dtype", "fp32", "--compile", "off"] if dry else ["--dtype", "bf16", "--compile", "on"]
    cmd = kititans(
        "train", "--preset", st.preset, "--data", data / "data", "--steps", st.steps,
        "--batch-size", st.micro_batch, "--seq-len", st.seq_len, "--device", device, *precision,
        "--set", "train.log_every=1", "--set", "train.eval_every=0", "--set", "train.save_every=0",
        "--set", "train.report=false", "--out", run_dir, "-q", *st.extra,
    )  # fmt: skip
    if st.nproc > 1:
        cmd += ["--nproc", str(st.nproc)]
    t0 = time.time()
    code, err = run(cmd, timeout, env)
    row = {**asdict(st), "seconds": round(time.time() - t0, 1), "status": status_of(code, err)}
    row.update(medians(run_dir, skip=0 if dry else 10))
    if row["status"] != "ok":
        row["error"] = (err.strip().splitlines() or ["?"])[-1][:300]
    shutil.rmtree(run_dir, ignore_errors=True)  # weights are not results: keep $OUT small
    return row


def bench_stage(data: Path, out: Path, device: str, dry: bool, timeout: float, env: dict[str, str]) -> dict:
    runtimes = "torch" if dry else "torch,onnx"
    report = out / "bench"
    cmd = kititans(
        "bench", data / "run", "--device", device, "--runtimes", runtimes, "--trials", 1 if dry else 3,
        "--out", report,
    )  # fmt: skip
    t0 = time.time()
    code, err = run(cmd, timeout, env)
    row = {"name": "bench", "seconds": round(time.time() - t0, 1), "status": status_of(code, err)}
    if (report / "bench.md").is_file():  # the report's own table, as the user's command prints it
        row["table"] = (report / "bench.md").read_text()[:8000]
    if row["status"] != "ok":
        row["error"] = (err.strip().splitlines() or ["?"])[-1][:300]
    return row


def write(out: Path, name: str, obj: dict) -> None:
    tmp = out / f".{name}.json.tmp"
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, out / f"{name}.json")


def environment(dry: bool) -> dict:
    import torch

    info = {"torch": torch.__version__, "python": sys.version.split()[0], "dry_run": dry}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count())
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return info


def run_stages(args: argparse.Namespace, dry: bool) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    if dry:
        env.update(OMP_NUM_THREADS="1")
    info = environment(dry)
    if not dry and "gpu" not in info:
        raise SystemExit("no CUDA GPU visible: run `dry-run` on a CPU machine, `run` on a GPU")
    write(out, "environment", info)
    print(json.dumps(info), flush=True)
    device = "cpu" if dry else "cuda"
    wanted = args.stages.split(",") if args.stages else None
    todo = debug_stages() if dry else stages(int(info.get("gpus", 1)))
    deadline = time.time() + args.budget_s
    results = []
    for st in todo:
        if wanted and st.name not in wanted:
            continue
        left = deadline - time.time()
        if left < 30:
            results.append({"name": st.name, "status": "skipped: out of budget"})
            continue
        row = train_stage(st, data, out, device, dry, min(left, args.stage_timeout_s), env)
        results.append(row)
        write(out, st.name, row)
        print(json.dumps(row), flush=True)
    if not wanted or "bench" in wanted:
        left = deadline - time.time()
        row = (
            bench_stage(data, out, device, dry, min(left, args.stage_timeout_s), env)
            if left >= 30
            else {"name": "bench", "status": "skipped: out of budget"}
        )
        results.append(row)
        write(out, "bench", row)
        print(json.dumps(row)[:2000], flush=True)
    write(out, "summary", {"environment": info, "stages": results, "caveats": CAVEATS})
    print(f"caveats: {CAVEATS}")
    bad = [
        r["name"] for r in results if r["status"] not in ("ok", "oom") and not r["status"].startswith("skip")
    ]
    return 1 if dry and bad else 0


def prepare(args: argparse.Namespace, dry: bool = False) -> None:
    """Shards with a 32k (dry run: 512) tokenizer and a small trained run, made on the CPU machine."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    sys.path.insert(0, str(ROOT))
    from benchmarks.synth_corpus import write as write_corpus

    corpus = out / "corpus.txt"
    if not (out / "data" / "manifest.json").is_file():
        write_corpus(corpus, 1 if dry else args.mb, seed=1)
        vocab = 512 if dry else 32000
        cmd = kititans("data", corpus, "--vocab-size", vocab, "--out", out / "data", "-q")
        subprocess.run(cmd, check=True, env=env)
        corpus.unlink(missing_ok=True)
    if not (out / "run" / "config.json").is_file():
        steps = 2 if dry else 200
        cmd = kititans(
            "train", "--preset", "debug" if dry else "tiny", "--data", out / "data", "--steps", steps,
            "--dtype", "fp32", "--compile", "off", "--set", "train.report=false", "--set", "train.eval_every=0",
            "--set", "train.save_every=0", "--out", out / "run", "-q",
        )  # fmt: skip
        if not dry:  # the tiny preset's own 4096 tokenizer: its own, smaller dataset
            cmd[cmd.index("--data") : cmd.index("--data") + 2] = []
        subprocess.run(cmd, check=True, env=env)
        shutil.rmtree(out / "run" / "checkpoints", ignore_errors=True)  # optimizer state: not carried
        if not dry:
            subprocess.run(kititans("export", out / "run", "--format", "onnx", "-q"), check=True, env=env)
    print(f"prepared {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2**20:.1f} MiB)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="on the CPU machine: shards + a small run for the bench stage")
    p.add_argument("--out", default=".gpu")
    p.add_argument("--mb", type=int, default=12, help="synthetic corpus size (MB)")
    for name in ("run", "dry-run"):
        r = sub.add_parser(name, help="the stages on the GPU" if name == "run" else "every stage on the CPU")
        r.add_argument("--data", default=".gpu" if name == "run" else None)
        r.add_argument("--out", required=True)
        r.add_argument("--stages", default="", help="comma list: lite125m,titans500m,ddp,fsdp,bench")
        r.add_argument("--budget-s", type=float, default=540 if name == "run" else 900)
        r.add_argument("--stage-timeout-s", type=float, default=480)
    a = ap.parse_args(argv)
    if a.cmd == "prepare":
        prepare(a)
        return 0
    dry = a.cmd == "dry-run"
    if dry and not a.data:
        a.data = str(Path(a.out) / "data-dry")
        prepare(argparse.Namespace(out=a.data, mb=1), dry=True)
    return run_stages(a, dry)


if __name__ == "__main__":
    raise SystemExit(main())
