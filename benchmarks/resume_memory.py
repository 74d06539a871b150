"""Host memory of a resume on 2 gloo ranks under FSDP2: each rank's peak resident set once the run is ready to
train (model built, wrapped, checkpoint loaded), this checkout (rank 0 reads the checkpoint and broadcasts it,
each rank keeping its shard) against `--old-code` (every rank read the whole checkpoint).

usage: python -m benchmarks.resume_memory --old-code /tmp/main [--preset lite-42m] [--out bench_out/resume_memory]
The same probe measures both: a sitecustomize that wraps Trainer.__init__ and prints the rank's VmHWM (peak RSS
since the process started) when it returns. The run: --preset on a small built-in dataset, 1 step, saved, then
resumed for 1 more step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
PROBE = """
import os


def _peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024


if os.environ.get("KITITANS_RESUME_PROBE") == "1":
    import kititans.train.loop as _loop

    _init = _loop.Trainer.__init__

    def _patched(self, *a, **k):
        _init(self, *a, **k)
        print(f"RESUME-PEAK rank={os.environ.get('RANK', '0')} mb={_peak_mb():.1f}", flush=True)

    _loop.Trainer.__init__ = _patched
"""


def kititans(code: Path, probe: Path, *args: str) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": f"{probe}:{code}",
        "OMP_NUM_THREADS": "1",
        "KITITANS_RESUME_PROBE": "1",
    }
    r = subprocess.run(
        [sys.executable, "-m", "kititans", *args], capture_output=True, text=True, env=env, cwd=code
    )
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return r.stdout + r.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-code", type=Path, required=True)
    ap.add_argument("--preset", default="lite-42m")
    ap.add_argument("--out", default="bench_out/resume_memory")
    args = ap.parse_args()
    from benchmarks.common import machine, md_table, write_json

    out = Path(args.out).resolve()
    probe = out / "probe"
    probe.mkdir(parents=True, exist_ok=True)
    (probe / "sitecustomize.py").write_text(PROBE)
    data = out / "data"
    if not (data / "manifest.json").is_file():
        kititans(HERE, probe, "data", "--builtin-mb", "0.6", "--vocab-size", "4096", "--out", str(data), "-q")
    rows = []
    for name, code in (("old: every rank reads the checkpoint", args.old_code.resolve()),
                       ("new: rank 0 reads, broadcast into shards", HERE)):  # fmt: skip
        run = out / ("old" if name.startswith("old") else "new")
        common = ["--seq-len", "64", "--batch-size", "1", "--nproc", "2", "--parallel", "fsdp", "--dtype", "fp32",
                  "--compile", "off", "--set", "train.report=false", "--set", "optim.warmup_steps=0",
                  "--set", "optim.schedule=constant", "-q"]  # fmt: skip
        if not (run / "config.json").is_file():
            kititans(code, probe, "train", "--preset", args.preset, "--data", str(data), "--tokenizer", str(data),
                     "--steps", "1", "--out", str(run), *common)  # fmt: skip
        text = kititans(code, probe, "train", "--resume", str(run), "--steps", "2", *common)
        peaks = {int(r): float(mb) for r, mb in re.findall(r"RESUME-PEAK rank=(\d+) mb=([\d.]+)", text)}
        ckpt = sum(f.stat().st_size for f in (run / "checkpoints").rglob("*") if f.is_file()) / 2**20
        rows.append({"resume": name, "rank 0 peak MB": peaks.get(0), "rank 1 peak MB": peaks.get(1),
                     "checkpoints on disk MB": round(ckpt)})  # fmt: skip
        print(md_table(rows[-1:], list(rows[-1])), flush=True)
    print(md_table(rows, list(rows[0])))
    write_json(out / "summary.json", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                      "rows": rows})  # fmt: skip
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
