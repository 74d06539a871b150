"""Interleaved A/B of ONNX decode speed: several exports (the first is the reference) through kititans' ONNX
runtime, 1 intra-op thread, no spinning; each round runs every export once (a prompt, then single-token steps on
fixed ids), so all see the same machine load. Prints the median time per decode token and each
export's tokens/s as a multiple of the first's.

    python benchmarks/onnx_ab.py LITE_EXPORT OLD_TITANS_EXPORT NEW_TITANS_EXPORT --rounds 9
    python benchmarks/onnx_ab.py /tmp/ts/width256/lite/export/onnx/fp32 /tmp/ts/width256/mac/export/onnx/fp32

(exports as `benchmarks/titans_speed.py --onnx --work DIR` leaves them under DIR/width*/BLOCK/export/onnx/fp32)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from kititans.errors import KititansError
from kititans.runtimes.onnx import OnnxRuntime


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("exports", nargs="+", type=Path, help="ONNX export folders; the first is the reference")
    ap.add_argument("--rounds", type=positive, default=9, help="interleaved rounds (median taken)")
    ap.add_argument("--prompt", type=positive, default=64, help="prompt tokens before timing")
    ap.add_argument("--tokens", type=positive, default=64, help="decode tokens timed per round")
    args = ap.parse_args(argv)
    try:
        rts = [OnnxRuntime(p, threads=1, spin=False) for p in args.exports]
    except KititansError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    times: list[list[float]] = [[] for _ in rts]
    for r in range(args.rounds):
        for i, rt in enumerate(rts):
            rt.reset()
            rt.forward(list(range(3, 3 + args.prompt)))
            t = time.perf_counter()
            for j in range(args.tokens):
                rt.forward([5 + j % 64])
            times[i].append((time.perf_counter() - t) / args.tokens * 1e6)
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, end="\r")
    ref = statistics.median(times[0])
    for p, ts in zip(args.exports, times):
        med = statistics.median(ts)
        print(f"{p}: {med:,.0f} us/token, tok/s x the first's {ref / med:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
