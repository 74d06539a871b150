"""Evaluation speed, interleaved in one process: the KiTitans lm-eval backend over each runtime, and lm-eval's
own `hf` backend on the same run directory, on the same task items.

    /work/bin/timing-lock python benchmarks/eval_speed.py runs/tiny --include-path /tmp/eval-tasks \\
        --tasks kt_tinystories_cloze --limit 200 --artifacts torch:fp32,gguf:q8_0,onnx:int8 --hf --rounds 3

Each round runs every contender once, in the same order; a contender's time is lm-eval's whole
simple_evaluate (items/s) and the time inside its loglikelihood calls (requests/s). Reported: medians over
rounds and each contender's ratio to the first one (torch fp32), with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any


def timed_loglikelihood(lm: Any) -> dict[str, float]:
    """Wrap lm.loglikelihood / loglikelihood_rolling to add their wall time and request count to a dict."""
    acc = {"seconds": 0.0, "requests": 0}
    for name in ("loglikelihood", "loglikelihood_rolling"):
        inner = getattr(lm, name)

        def wrapped(requests, *a, _inner=inner, **kw):
            t0 = time.perf_counter()
            try:
                return _inner(requests, *a, **kw)
            finally:
                acc["seconds"] += time.perf_counter() - t0
                acc["requests"] += len(requests)

        setattr(lm, name, wrapped)
    return acc


def contenders(args: argparse.Namespace) -> list[tuple[str, Any]]:
    from kititans.eval.artifacts import parse_item
    from kititans.eval.backend import KititansLM

    out = []
    for item in args.artifacts.split(","):
        art = parse_item(args.run, item)
        dtype = art.quant if art.runtime == "torch" else "fp32"
        lm = KititansLM(art.path, runtime=art.runtime, dtype=dtype, batch_size=args.batch_size)
        out.append((f"kititans {art.key}", lm))
    if args.hf:
        from lm_eval.models.huggingface import HFLM

        hf = HFLM(pretrained=str(args.run), dtype="float32", batch_size=args.batch_size, device="cpu")
        out.append(("lm-eval hf (torch fp32)", hf))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--include-path", type=Path, action="append", default=[])
    ap.add_argument("--limit", type=float, default=100)
    ap.add_argument("--num-fewshot", type=int)
    ap.add_argument("--artifacts", default="torch:fp32", help="kititans backends, the first is the reference")
    ap.add_argument("--hf", action="store_true", help="also lm-eval's own hf backend on the run directory")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args()

    import lm_eval

    from kititans.eval.tasks import require_lm_eval, resolve_tasks, task_manager

    require_lm_eval()
    tm = task_manager(args.include_path, builtin=not args.include_path)
    tasks = resolve_tasks(tm, args.tasks.split(","))
    limit = int(args.limit) if args.limit >= 1 else args.limit
    load0 = os.getloadavg()
    lms = contenders(args)
    times: dict[str, list[dict[str, float]]] = {name: [] for name, _ in lms}
    for r in range(args.rounds):
        for name, lm in lms:
            acc = timed_loglikelihood(lm) if r == 0 else lm._kt_acc
            lm._kt_acc = acc
            before = dict(acc)
            t0 = time.perf_counter()
            res = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, task_manager=tm, limit=limit, num_fewshot=args.num_fewshot,
                bootstrap_iters=0, log_samples=False,
            )  # fmt: skip
            wall = time.perf_counter() - t0
            items = sum(v["effective"] for v in res["n-samples"].values())
            ll_s = acc["seconds"] - before["seconds"]
            times[name].append(
                {
                    "wall": wall,
                    "items": items,
                    "ll_seconds": ll_s,
                    "requests": acc["requests"] - before["requests"],
                }
            )
            print(
                f"round {r + 1} {name:<28} {items / wall:8.2f} items/s  loglikelihood {ll_s:6.2f} s",
                flush=True,
            )
    load1 = os.getloadavg()
    ref = None
    rows = []
    for name, ts in times.items():
        wall = statistics.median(t["wall"] for t in ts)
        ll = statistics.median(t["ll_seconds"] for t in ts)
        row = {
            "name": name,
            "items": ts[0]["items"],
            "requests": ts[0]["requests"],
            "median_wall_s": wall,
            "items_per_s": ts[0]["items"] / wall,
            "median_loglikelihood_s": ll,
            "requests_per_s": ts[0]["requests"] / ll if ll > 0 else None,
        }
        ref = ref or row
        row["loglikelihood_speed_vs_first"] = ref["median_loglikelihood_s"] / ll if ll > 0 else None
        rows.append(row)
    print(f"\nload average {load0[0]:.2f} before, {load1[0]:.2f} after; medians of {args.rounds} rounds")
    print(f"{'contender':<28} {'items/s':>8} {'req/s':>8} {'ll s':>7} {'speed vs first':>15}")
    for row in rows:
        print(
            f"{row['name']:<28} {row['items_per_s']:8.2f} {row['requests_per_s'] or 0:8.1f} "
            f"{row['median_loglikelihood_s']:7.2f} {row['loglikelihood_speed_vs_first'] or 0:14.2f}x"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"load": [load0, load1], "rows": rows, "args": vars(args)}, default=str, indent=2)
        )


if __name__ == "__main__":
    main()
