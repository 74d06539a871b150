"""GGUF quality per quantization type, with llama-perplexity definitions (kititans/bench/quality.py):
file size, export time, perplexity on the run's validation split, mean KLD and same-top against the f32 GGUF
(the base, run in llama.cpp), with and without an importance matrix for q4_k_m and q4_0.

usage: python benchmarks/gguf_quality.py RUN [RUN...] [--types f16,q8_0,...] [--n-ctx 512] [--chunks 32]
       [--calib train] [--keep] [--json out.json]

The reference log-probs are kept in float16 and compared chunk by chunk, so a 32000-token vocabulary fits:
memory is about chunks x (n_ctx/2) x vocab x 2 bytes (--max-ref-mib caps the chunk count). The importance
matrix is calibrated on the run's *train* split by default, so it never sees the evaluation text.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m

import numpy as np
from tqdm import tqdm

from benchmarks.common import machine, md_table, write_json
from kititans.bench.quality import chunk_logprobs, make_chunks, measure, save_reference
from kititans.checkpoint import read_meta
from kititans.data.tokendata import TokenData
from kititans.export import ExportOptions, export_model
from kititans.quantize.imatrix import run_shards
from kititans.runtimes import load_runtime

DEFAULT_TYPES = ["f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
IMATRIX_TYPES = ["q4_k_m", "q4_0"]


def bench_run(run: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    meta = read_meta(run)
    val = np.asarray(TokenData(run_shards(run)).splits["val"])
    n_ctx = min(args.n_ctx, meta["model"]["context_length"])
    vocab = meta["model"]["vocab_size"]
    scored = n_ctx - 1 - n_ctx // 2
    cap = max(1, int(args.max_ref_mib * 2**20 // (scored * vocab * 2)))
    chunks = make_chunks(val.tolist(), n_ctx, 1, max_chunks=min(args.chunks, cap))
    out_dir = Path(args.out_dir or run / "export" / "bench")
    opts = lambda im=None: ExportOptions(imatrix=im, progress=False, extra={"threads": args.threads})  # noqa: E731
    rows = []

    def add(label: str, quant: str, imatrix: str | None, res: Any, stats: dict[str, Any]) -> None:
        size = res.path.stat().st_size if res else None
        rows.append(
            {
                "run": run.name,
                "type": label,
                "imatrix": imatrix or "",
                "size_mib": round(size / 2**20, 2) if size else "",
                "bits_per_weight": res.manifest["weight_bits_per_weight"] if res else "",
                "export_s": round(res.seconds, 2) if res else "",
                **stats,
            }
        )

    base_res = export_model(run, "gguf", "f32", out_dir / "model.f32.gguf", opts())
    # float16 reference, clipped at the llama-perplexity floor (what --kl-divergence-base stores)
    ref = out_dir / "reference.npz"
    lps = tqdm(
        chunk_logprobs(load_runtime(base_res.path, threads=args.threads), chunks),
        total=len(chunks),
        desc="f32 base",
        leave=False,
    )
    save_reference(ref, chunks, lps)

    def stats(path: Path, desc: str) -> dict[str, Any]:
        q = measure(load_runtime(path, threads=args.threads), ref, progress=True, desc=desc)
        return {k: v for k, v in q.to_dict().items() if not isinstance(v, dict)}

    add("f32 (base)", "f32", None, base_res, stats(base_res.path, "f32"))
    if not args.no_torch:
        add("pytorch fp32", "", None, None, stats(run, "torch"))
    plan = [(q, None) for q in args.types] + [(q, args.calib) for q in args.imatrix_types]
    for quant, calib in plan:
        name = f"model.{quant}{'.imatrix' if calib else ''}.gguf"
        res = export_model(run, "gguf", quant, out_dir / name, opts(calib))
        st = stats(res.path, quant)
        add(quant, quant, calib, res, st)
        print(
            f"  {run.name} {quant:<8} {calib or '':<6} KLD {st['kld_mean']:.6f} same-top {st['same_top']:.2%}",
            file=sys.stderr,
        )
    if not args.keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    for r in rows:
        r.update(n_ctx=n_ctx, chunks=len(chunks))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--types", default=",".join(DEFAULT_TYPES), help="comma-separated gguf types")
    p.add_argument("--imatrix-types", default=",".join(IMATRIX_TYPES), help="also measured with an imatrix")
    p.add_argument("--calib", default="train", help="imatrix calibration: train | val | a text file")
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=32, help="at most this many chunks of n_ctx tokens")
    p.add_argument("--max-ref-mib", type=float, default=512, help="cap on the float16 reference's size")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch-vs-f32-GGUF row")
    p.add_argument("--out-dir", help="where the files go (default RUN/export/bench, removed unless --keep)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--json", default="bench_out/gguf_quality.json")
    args = p.parse_args()
    args.types = [t for t in args.types.split(",") if t]
    args.imatrix_types = [t for t in args.imatrix_types.split(",") if t]
    t0 = time.time()
    rows = [r for run in args.runs for r in bench_run(run, args)]
    fmt = {
        "ppl": "{:.4f}",
        "ppl_drift_pct": "{:+.3f}",
        "kld_mean": "{:.6f}",
        "same_top": "{:.2%}",
        "delta_p_rms": "{:.3%}",
    }
    shown = [{**r, **{k: f.format(r[k]) for k, f in fmt.items()}} for r in rows]
    cols = [
        "run",
        "type",
        "imatrix",
        "size_mib",
        "bits_per_weight",
        "export_s",
        "ppl",
        "ppl_drift_pct",
        "kld_mean",
        "same_top",
        "delta_p_rms",
    ]
    print(md_table(shown, cols))
    write_json(
        args.json,
        {
            "machine": machine(),
            "seconds": round(time.time() - t0, 1),
            "args": {k: str(v) for k, v in vars(args).items()},
            "rows": rows,
        },
    )
    print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
