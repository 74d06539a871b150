"""Contrastive training at one global batch split three ways: 1 rank x 64 pairs, 2 gloo ranks x 32, and 1 rank x
16 x 4 accumulation steps. With InfoNCE over the global batch (all-gather across ranks + a gradient cache across
accumulation steps) all three see 63 negatives per query and should train alike; with negatives taken per
micro-batch (before the change, `--old-code`) only the first did.

usage: python -m benchmarks.encoder_global_batch [--steps 100] [--preset encoder-tiny] [--old-code /tmp/main]
         [--out bench_out/encoder_global_batch]
Every run: the built-in corpus's unsupervised span pairs, the same seed, tokenizer and steps; the metrics are
the run's own held-out evaluation (eval_report.json: retrieval@1, MRR over the held-out pairs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
SPLITS = {"1 rank x 64": (1, 64), "2 ranks x 32": (2, 32), "1 rank x 16 x 4 accumulation": (1, 16)}


def train(code: Path, out: Path, nproc: int, batch: int, args: argparse.Namespace, tok: Path | None) -> dict:
    if not (out / "eval_report.json").is_file():
        cmd = [sys.executable, "-m", "kititans", "train", "--family", "encoder", "--preset", args.preset,
               "--steps", str(args.steps), "--batch-size", str(batch), "--global-batch", "64",
               "--seq-len", str(args.seq_len), "--dtype", "fp32", "--compile", "off", "--out", str(out),
               "--set", "train.report=false", "--set", f"train.eval_every={args.steps}",
               "--set", f"train.save_every={args.steps}", "-q"]  # fmt: skip
        cmd += ["--nproc", str(nproc)] if nproc > 1 else []
        cmd += ["--tokenizer", str(tok)] if tok else []
        env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1" if nproc > 1 else "2"}
        subprocess.run(cmd, check=True, env=env, cwd=str(code))
    return json.loads((out / "eval_report.json").read_text())["metrics"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--preset", default="encoder-tiny")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--old-code", type=Path)
    ap.add_argument("--out", default="bench_out/encoder_global_batch")
    args = ap.parse_args()
    from benchmarks.common import machine, md_table, write_json

    out = Path(args.out).resolve()
    codes = [("new", HERE)] + ([("old", args.old_code.resolve())] if args.old_code else [])
    rows, tok = [], None
    for code_name, code in codes:
        for split, (nproc, batch) in SPLITS.items():
            run = out / f"{code_name}-{nproc}x{batch}"
            m = train(code, run, nproc, batch, args, tok)
            tok = tok or run / "tokenizer"  # every run the same tokenizer (trained once on the pair texts)
            rows.append({"code": code_name, "split (global 64)": split, "retrieval@1": round(m["retrieval_at1"], 4),
                         "MRR": round(m["mrr"], 4), "held-out pairs": m["pairs"]})  # fmt: skip
            print(md_table(rows[-1:], list(rows[-1])), flush=True)
    print(md_table(rows, list(rows[0])))
    write_json(out / "summary.json", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                      "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
