"""Titans training step time at a long sequence: the masked attention (a dense (T, n_p + T) mask, the previous
path) against the blocked windowed attention (kititans/models/titans/windowed.py), interleaved in one process.

    python benchmarks/titans_train_attention.py                          # T 2048, window 512, every block
    python benchmarks/titans_train_attention.py --seq-len 4096 --blocks mac --reps 3

step:      one AdamW step (forward, backward, update) of titans-tiny's shape (256 x 4 layers, vocab 4096) with
           window (mal, mag) / segment (mac) `--window`, on batch x seq_len random tokens, fp32;
attention: the attention alone (windowed.local_attention forward + backward) at the same shape, per layer.
Reported: the median over `reps` interleaved rounds of wall seconds and of process CPU seconds (robust to other
jobs on a shared machine), and the median per-round ratio masked / blocked (> 1: the blocked path is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from kititans.models.lite import lm_loss
from kititans.models.spec import find_preset
from kititans.models.titans import windowed

IMPLS = ("masked", "blocked")


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def model_step(block: str, args: argparse.Namespace):
    spec, p = find_preset("titans-tiny")
    cfg = spec.make_config(p.name, {"block": block, "window": args.window, "context_length": args.seq_len})
    torch.manual_seed(0)
    model = spec.build(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(
        0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0)
    )

    def step() -> None:
        lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def attention_step(kind: str, args: argparse.Namespace):
    g = torch.Generator().manual_seed(0)
    B, T, D, n = args.batch, args.seq_len, 256, 4
    q, k, v = (torch.randn(B, T, D, generator=g, requires_grad=True) for _ in range(3))
    pk, pv = (torch.randn(B, n, D, generator=g, requires_grad=True) for _ in range(2))

    def step() -> None:
        windowed.local_attention(q, k, v, pk, pv, 4, args.window, kind).sum().backward()

    return step


def compare(make, args: argparse.Namespace) -> dict:
    steps = {}
    for impl in IMPLS:
        steps[impl] = make()
        with windowed.attention_impl(impl):
            steps[impl]()  # warm-up
    wall: dict[str, list[float]] = {i: [] for i in IMPLS}
    cpu: dict[str, list[float]] = {i: [] for i in IMPLS}
    for _ in range(args.reps):
        for impl in IMPLS:
            with windowed.attention_impl(impl):
                w, c = timed(steps[impl])
            wall[impl].append(w)
            cpu[impl].append(c)
    return {
        "wall_s": {i: statistics.median(v) for i, v in wall.items()},
        "cpu_s": {i: statistics.median(v) for i, v in cpu.items()},
        "speedup_wall": statistics.median(a / b for a, b in zip(wall["masked"], wall["blocked"])),
        "speedup_cpu": statistics.median(a / b for a, b in zip(cpu["masked"], cpu["blocked"])),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--blocks", default="mal,mac,mag")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res: dict = {k: getattr(args, k) for k in ("seq_len", "window", "batch", "reps", "threads")}
    res["load_before"] = os.getloadavg()
    for kind in ("sliding", "segment"):
        res[f"attention {kind}"] = compare(lambda kind=kind: attention_step(kind, args), args)
    for block in args.blocks.split(","):
        res[f"step {block}"] = compare(lambda block=block: model_step(block, args), args)
    res["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    r = main(sys.argv[1:])
    print(
        f"T {r['seq_len']}, window {r['window']}, batch {r['batch']}, {r['threads']} thread(s), {r['reps']} rounds"
    )
    for k, v in r.items():
        if isinstance(v, dict) and "wall_s" in v:
            print(
                f"{k}: masked {v['wall_s']['masked']:.2f} s / blocked {v['wall_s']['blocked']:.2f} s wall "
                f"-> {v['speedup_wall']:.2f}x; CPU {v['cpu_s']['masked']:.2f} / {v['cpu_s']['blocked']:.2f} s "
                f"-> {v['speedup_cpu']:.2f}x"
            )
    print(
        f"load average {tuple(round(x, 1) for x in r['load_before'])} -> {tuple(round(x, 1) for x in r['load_after'])}"
    )
