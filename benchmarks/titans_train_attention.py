"""Titans training step time at a long sequence, the previous path against this release's, interleaved in one
process:
    before   the previous training step: masked attention (a dense (T, n_p + T) mask) and the memory scan's
             per-chunk selects (each one's backward a full-size zero gradient: O(n_chunks^2))
    masked   masked attention, this release's scan (one unbind per tensor): the attention's share alone
    blocked  this release: the blocked windowed attention (kititans/models/titans/windowed.py) and the new scan

    python benchmarks/titans_train_attention.py                          # T 2048, window 512, every block
    python benchmarks/titans_train_attention.py --seq-len 4096 --blocks mac --reps 3

step:      one AdamW step (forward, backward, update) of titans-tiny's shape (256 x 4 layers, vocab 4096) with
           window (mal, mag) / segment (mac) `--window`, on batch x seq_len random tokens, fp32;
attention: the attention alone (windowed.local_attention forward + backward) at the same shape, per layer.
Reported: the median over `reps` interleaved rounds of wall seconds and of process CPU seconds (robust to other
jobs on a shared machine), and the median per-round ratio of each variant's time to blocked's (> 1: this
release is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from kititans.models.lite import lm_loss
from kititans.models.spec import find_preset
from kititans.models.titans import memory, windowed

VARIANTS = {"before": ("masked", "select"), "masked": ("masked", "unbind"), "blocked": ("blocked", "unbind")}


@contextmanager
def variant(name: str) -> Iterator[None]:
    """Run with variant `name`'s attention implementation and memory scan views (VARIANTS)."""
    impl, scan = VARIANTS[name]
    old = memory._chunk_columns
    if scan == "select":  # the previous scan: t[:, :, j] per chunk
        memory._chunk_columns = lambda n: lambda t: [t[:, :, j] for j in range(n)]
    try:
        with windowed.attention_impl(impl):
            yield
    finally:
        memory._chunk_columns = old


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


def compare(make, args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    steps = {}
    for name in names:
        steps[name] = make()
        with variant(name):
            steps[name]()  # warm-up
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.reps):
        for name in names:
            with variant(name):
                w, c = timed(steps[name])
            wall[name].append(w)
            cpu[name].append(c)
    ref = names[-1]
    return {
        "wall_s": {n: statistics.median(v) for n, v in wall.items()},
        "cpu_s": {n: statistics.median(v) for n, v in cpu.items()},
        "speedup_wall": {n: statistics.median(a / b for a, b in zip(wall[n], wall[ref])) for n in names[:-1]},
        "speedup_cpu": {n: statistics.median(a / b for a, b in zip(cpu[n], cpu[ref])) for n in names[:-1]},
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
        res[f"attention {kind}"] = compare(
            lambda kind=kind: attention_step(kind, args), args, ("masked", "blocked")
        )
    for block in args.blocks.split(","):
        res[f"step {block}"] = compare(lambda block=block: model_step(block, args), args, tuple(VARIANTS))
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
            cells = [
                f"{n} {v['cpu_s'][n]:.2f} s"
                + (f" ({v['speedup_cpu'][n]:.2f}x)" if n in v["speedup_cpu"] else "")
                for n in v["cpu_s"]
            ]
            walls = ", ".join(f"{n} {x:.2f} s" for n, x in v["wall_s"].items())
            print(f"{k}: CPU {', '.join(cells)}; wall {walls}")
    print(
        f"load average {tuple(round(x, 1) for x in r['load_before'])} -> {tuple(round(x, 1) for x in r['load_after'])}"
    )
