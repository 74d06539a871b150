"""Fault check for committed checkpoints (issue 16): SIGKILL a training run at random moments, resume it each
time, and compare with an uninterrupted run.

After every kill it records whether the kill landed while a checkpoint was being written (a hidden
`.step-N.tmp-PID` folder is left behind), checks that every committed checkpoint loads (as a model directory
and for resume), and resumes. At the end the per-step losses must equal the uninterrupted run's.

    python -m benchmarks.fault_kill --kills 10 --steps 200 --save-every 2 --out bench_out/fault_kill
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path


def kititans(*args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kititans", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def rows_written(run: Path) -> int:
    p = run / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.is_file() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--save-every", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=float, default=1.5, help="kill within this many seconds of training")
    ap.add_argument("--out", default="bench_out/fault_kill")
    a = ap.parse_args()
    from kititans.checkpoint import load_checkpoint
    from kititans.train.checkpoints import committed, find_latest, load_for_resume

    out = Path(a.out)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    data = out / "data"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "kititans",
            "data",
            "--builtin-mb",
            "0.6",
            "--vocab-size",
            "512",
            "--out",
            str(data),
            "--workers",
            "1",
            "-q",
        ],
        check=True,
        capture_output=True,
    )
    args = [
        "train",
        "--preset",
        "debug",
        "--data",
        data,
        "--seq-len",
        "64",
        "--batch-size",
        "8",
        "--steps",
        a.steps,
        "--save-every",
        a.save_every,
        "--set",
        "train.log_every=1",
        "--set",
        "train.compile=off",
        "--set",
        "train.dtype=fp32",
        "--set",
        "train.report=false",
        "-q",
    ]
    ref = out / "uninterrupted"
    assert kititans(*args, "--out", ref).wait() == 0
    run, rng, events = out / "killed", random.Random(a.seed), []
    p = kititans(*args, "--out", run)
    for k in range(a.kills):
        start = rows_written(
            run
        )  # wait until this process trains (start-up is seconds), then a random moment
        deadline = time.time() + 120
        while rows_written(run) <= start and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, a.window))
        p.kill()
        p.wait()
        root = run / "checkpoints"
        mid_write = any(root.glob(".step-*.tmp-*")) if root.is_dir() else False
        latest = find_latest(run)
        for c in committed(root):  # every committed checkpoint is usable
            load_checkpoint(c)
            assert (c / "optimizer.json").is_file() and (c / "state.json").is_file()
        step = load_for_resume(run).step if latest else 0
        events.append(
            {
                "kill": k + 1,
                "resumes_from_step": step,
                "rows": rows_written(run),
                "mid_write": mid_write,
                "checkpoints": [c.name for c in committed(root)],
            }
        )
        print(json.dumps(events[-1]), flush=True)
        if latest:
            p = kititans("train", "--resume", run)
        else:  # killed before the first commit: nothing to resume, start again
            subprocess.run(["rm", "-rf", str(run)], check=True)
            p = kititans(*args, "--out", run)
    assert p.wait() == 0
    want, got = losses(ref), losses(run)
    diff = max(abs(want[s] - got[s]) for s in want)
    result = {
        "kills": a.kills,
        "during_a_checkpoint_write": sum(e["mid_write"] for e in events),
        "steps": a.steps,
        "save_every": a.save_every,
        "max_abs_loss_diff": diff,
        "steps_compared": len(want),
        "same_steps": sorted(want) == sorted(got),
        "events": events,
    }
    (out / "fault_kill.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "events"}))


if __name__ == "__main__":
    main()
