"""CoreML package size and weight error per compression scheme for one run (conversion works on Linux).

    python benchmarks/coreml_sizes.py runs/tiny [--schemes fp16,int8,int4,palettize4] [--out DIR]

Sizes are of the whole multifunction package and of its weight.bin; the weight error is the relative
Frobenius error ||W' - W|| / ||W|| of the decompressed package weights against the PyTorch weights (the
export's validation report), worst and mean over all parameters.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--schemes", default="fp16,int8,int4,palettize4")
    p.add_argument("--out", help="folder for the packages (default RUN/export)")
    args = p.parse_args(argv)

    from kititans.export import ExportOptions, default_output, export_model

    rows = []
    for q in args.schemes.split(","):
        out = (
            Path(args.out) / f"model.{q}.mlpackage"
            if args.out
            else default_output(Path(args.run), "coreml", q)
        )
        t0 = time.perf_counter()
        m = export_model(args.run, "coreml", q, out, ExportOptions(progress=True)).manifest
        w = m["validation"]["weights"]
        weight_bin = (out / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size
        rows.append(
            (
                q,
                m["size_bytes"],
                weight_bin,
                w["max_relative_error"],
                w["mean_relative_error"],
                time.perf_counter() - t0,
            )
        )
    base = next((r[2] for r in rows if r[0] == "fp16"), rows[0][2])
    print(
        f"\n{args.run}\n| scheme | package MB | weight.bin MB | vs fp16 | weight error max | mean | export s |"
    )
    print("|---|---|---|---|---|---|---|")
    for q, size, wb, emax, emean, secs in rows:
        print(
            f"| {q} | {size / 1e6:.3f} | {wb / 1e6:.3f} | {wb / base:.3f} | {emax:.4f} | {emean:.4f} | {secs:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
