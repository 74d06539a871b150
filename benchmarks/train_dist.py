"""Training throughput on several processes vs one, at the same global batch (issue 16).

Runs `kititans train` alternately as one process (micro-batch B x accumulation N, all cores as threads) and as
N ranks under `--nproc N` (micro-batch B each, cores split among the ranks), interleaved `--rounds` times on
the same prepared data, and reports each run's median tokens/s (after the first `--skip` logged steps) and the
largest per-step loss difference between the two (they train on the same windows).

    python -m benchmarks.train_dist --preset tiny --nproc 2 --parallel ddp --steps 30 --rounds 2
    python -m benchmarks.train_dist --preset tiny --nproc 2 --parallel fsdp --steps 30 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import machine, write_json


def train(args: list[str]) -> dict[str, float]:
    subprocess.run(["rm", "-rf", args[args.index("--out") + 1]], check=True)
    r = subprocess.run([sys.executable, "-m", "kititans", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    out = Path(args[args.index("--out") + 1])
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--skip", type=int, default=5, help="logged steps left out of the median (warm-up)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench_out/train_dist")
    a = ap.parse_args()
    out = Path(a.out)
    data = out / "data"
    if not (data / "manifest.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "kititans", "data", "--builtin-mb", "3", "--out", str(data), "-q"],
            check=True,
        )
    common = [
        "train",
        "--preset",
        a.preset,
        "--data",
        str(data),
        "--steps",
        str(a.steps),
        "--seq-len",
        str(a.seq_len),
        "--batch-size",
        str(a.batch_size),
        "--set",
        "train.log_every=1",
        "--set",
        "train.eval_every=0",
        "--set",
        "train.compile=off",
        "--set",
        "train.report=false",
        "--set",
        "train.save_every=0",
        "-q",
    ]
    tps: dict[str, list[float]] = {"1 process": [], f"{a.nproc} ranks": []}
    diff = 0.0
    for k in range(a.rounds):
        one = train([*common, "--grad-accum", str(a.nproc), "--out", str(out / f"one-{a.parallel}-{k}")])
        many = train(
            [
                *common,
                "--nproc",
                str(a.nproc),
                "--parallel",
                a.parallel,
                "--out",
                str(out / f"many-{a.parallel}-{k}"),
            ]
        )
        for name, rows in (("1 process", one), (f"{a.nproc} ranks", many)):
            tps[name].append(statistics.median(r["tokens_per_s"] for s, r in rows.items() if s > a.skip))
        diff = max(diff, max(abs(one[s]["loss"] - many[s]["loss"]) for s in one))
        print(
            json.dumps({"round": k, **{n: v[-1] for n, v in tps.items()}, "max_loss_diff": diff}), flush=True
        )
    med = {n: statistics.median(v) for n, v in tps.items()}
    result = {
        "machine": machine(),
        "cpu_count": os.cpu_count(),
        "preset": a.preset,
        "parallel": a.parallel,
        "global_batch": a.batch_size * a.nproc,
        "seq_len": a.seq_len,
        "tokens_per_s": tps,
        "median_tokens_per_s": med,
        "ratio": med[f"{a.nproc} ranks"] / med["1 process"],
        "max_abs_loss_diff": diff,
    }
    write_json(out / f"train_dist_{a.parallel}.json", result)
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}))


if __name__ == "__main__":
    main()
