"""Titans' batched decode in process (models/titans/rows.py): tokens/s of one sequence decoding alone against
R sequences stepped together through `decode_rows`, with the sequences at unrelated positions (their memory
chunks close at different steps) and at aligned ones (their chunks close together), interleaved in rounds.

    python benchmarks/titans_rows.py --preset titans-tiny --blocks mac,mal,mag --rows 8 --threads 2

Random weights (speed only); the states first read prompts of different lengths.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, md_table, write_json


def states(model, lengths: list[int], seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.inference_mode():
        for n in lengths:
            st = model.new_state(1)
            model(torch.randint(0, model.cfg.vocab_size, (1, n), generator=g), state=st)
            out.append(st)
    return out


def rate(model, base: list, tokens: int) -> float:
    """Tokens/s of `tokens` steps of all sequences in `base` through decode_rows (one sequence: its lone call)."""
    sts = copy.deepcopy(base)
    with torch.inference_mode():
        t = time.perf_counter()
        for _ in range(tokens):
            model.decode_rows([7] * len(sts), sts, [s.pos for s in sts])
        return len(sts) * tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="titans-tiny")
    ap.add_argument("--blocks", default="mac,mal,mag")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=48, help="decode steps per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench-out/titans_rows")
    args = ap.parse_args()
    from kititans.models.titans.model import SPEC

    torch.set_num_threads(args.threads)
    rows = []
    for block in args.blocks.split(","):
        torch.manual_seed(0)
        model = SPEC.build(SPEC.make_config(args.preset, {"block": block})).eval()
        model.fuse_for_inference()
        chunk = model.cfg.mem_chunk
        unrelated = states(model, [40 + 7 * i for i in range(args.rows)], 1)  # distinct phases in the chunk
        aligned = states(model, [2 * chunk * (i + 1) + 1 for i in range(args.rows)], 2)  # one phase
        with torch.inference_mode():  # the batch-invariance probe runs once, outside the timings
            w = copy.deepcopy(unrelated[:2])
            model.decode_rows([1, 1], w, [s.pos for s in w])
        got: dict[str, list[float]] = {"alone": [], "unrelated": [], "aligned": []}
        for _ in range(args.rounds):
            got["alone"].append(rate(model, unrelated[:1], args.tokens))
            got["unrelated"].append(rate(model, unrelated, args.tokens))
            got["aligned"].append(rate(model, aligned, args.tokens))
        med = {k: statistics.median(v) for k, v in got.items()}
        ratios = {
            k: statistics.median(b / a for a, b in zip(got["alone"], got[k]))
            for k in ("unrelated", "aligned")
        }
        rows.append({
            "block": block, "chunk": chunk, "batched": bool(model._rows_independent),
            "alone tok/s": round(med["alone"]), f"{args.rows} rows, unrelated tok/s": round(med["unrelated"]),
            "x alone": f"{ratios['unrelated']:.2f}x", f"{args.rows} rows, aligned tok/s": round(med["aligned"]),
            "x alone ": f"{ratios['aligned']:.2f}x",
        })  # fmt: skip
        print(rows[-1], flush=True)
    print(md_table(rows, list(rows[0])))
    write_json(Path(args.out).with_suffix(".json"), {"machine": machine(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
