"""GPU training throughput and MFU (issue 16), as one short script for a lent GPU machine.

1. Prepares a synthetic 32k-vocabulary dataset (benchmarks/synth_corpus.py; content does not matter for speed).
2. Trains lite-125m and titans-500m for a few dozen steps on 1 GPU with the CUDA path (bf16 autocast, fused
   AdamW, SDPA flash attention, torch.compile) and reads tokens/s and MFU from metrics.jsonl (the median after
   warm-up; the first steps include compilation). With several GPUs it also runs DDP and FSDP2 (`--nproc`).
3. Trains a `tiny` run briefly and runs `kititans bench --device cuda` on it for torch and onnx (CUDA execution
   provider), so the desktop-GPU rows of the bench report are measured.

    python -m benchmarks.train_gpu --out bench_out/train_gpu            # targets: lite-125m >= 40% MFU,
                                                                         #          titans-500m >= 25% MFU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = {  # preset -> (micro-batch, seq_len, steps)
    "lite-125m": (16, 2048, 40),
    "titans-500m": (8, 2048, 30),
}


def sh(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", *map(str, args)], capture_output=True, text=True)
    if check and r.returncode:
        print(r.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"failed: {' '.join(map(str, args))}")
    return r


def medians(run: Path, skip: int) -> dict[str, float | None]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if "loss" in r and r["step"] > skip]
    tps = [r["tokens_per_s"] for r in rows]
    mfu = [r["mfu"] for r in rows if "mfu" in r]
    return {
        "tokens_per_s": statistics.median(tps) if tps else None,
        "mfu": statistics.median(mfu) if mfu else None,
        "final_loss": rows[-1]["loss"] if rows else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out/train_gpu")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--skip", type=int, default=10, help="logged steps left out (compilation, warm-up)")
    ap.add_argument("--no-bench", action="store_true")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: this benchmark needs one")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count()
    result: dict = {
        "gpu": torch.cuda.get_device_name(0),
        "gpus": gpus,
        "torch": torch.__version__,
        "runs": [],
    }
    data = out / "data"
    if not (data / "manifest.json").is_file():
        from benchmarks.synth_corpus import write

        corpus = write(out / "corpus.txt", 200, seed=1)
        sh("kititans", "data", corpus, "--vocab-size", "32000", "--out", data, "-q")
    for preset in a.models.split(","):
        b, t, steps = MODELS[preset]
        layouts = [("1 GPU", [])]
        if gpus > 1:
            layouts += [
                (f"DDP x{gpus}", ["--nproc", gpus, "--parallel", "ddp"]),
                (f"FSDP2 x{gpus}", ["--nproc", gpus, "--parallel", "fsdp"]),
            ]
        for name, extra in layouts:
            run = out / f"{preset}-{name.replace(' ', '')}"
            subprocess.run(["rm", "-rf", str(run)])
            t0 = time.time()
            r = sh(
                "kititans",
                "train",
                "--preset",
                preset,
                "--data",
                data,
                "--steps",
                steps,
                "--batch-size",
                b,
                "--seq-len",
                t,
                "--dtype",
                "bf16",
                "--compile",
                "on",
                "--device",
                "cuda",
                "--set",
                "train.log_every=1",
                "--set",
                "train.eval_every=0",
                "--set",
                "train.save_every=0",
                "--set",
                "train.report=false",
                "--out",
                run,
                "-q",
                *extra,
                check=False,
            )
            row = {
                "preset": preset,
                "layout": name,
                "micro_batch": b,
                "seq_len": t,
                "steps": steps,
                "seconds": round(time.time() - t0, 1),
                "ok": r.returncode == 0,
            }
            if r.returncode == 0:
                row.update(medians(run, a.skip))
            else:
                row["error"] = (r.stderr.strip().splitlines() or ["?"])[-1][:300]
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
    if not a.no_bench:
        tiny = out / "tiny"
        subprocess.run(["rm", "-rf", str(tiny)])
        sh("kititans", "train", "--preset", "tiny", "--steps", "300", "--device", "cuda", "--out", tiny, "-q")
        r = sh("kititans", "bench", tiny, "--device", "cuda", "--runtimes", "torch,onnx", check=False)
        result["bench"] = {"ok": r.returncode == 0, "tail": r.stdout[-3000:] or r.stderr[-3000:]}
        print(result["bench"]["tail"])
    (out / "train_gpu.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out / 'train_gpu.json'}")


if __name__ == "__main__":
    main()
