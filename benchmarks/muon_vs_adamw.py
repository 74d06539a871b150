"""Muon (+ AdamW for embeddings/norms) vs AdamW on the same model, data, batches and schedule: validation
loss at equal steps, and the step at which Muon first reaches AdamW's final loss (target <= 0.65x).

usage: python benchmarks/muon_vs_adamw.py --corpus builtin|tinyshakespeare|tinystories [--steps 600]
         [--adamw-lrs 2e-3,3e-3,5e-3] [--muon-lrs 0.03,0.05] [--out bench_out/muon]
Each run goes through `kititans.train.pretrain` exactly as `kititans train` does.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from benchmarks.common import machine, md_table, write_json

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPORA = {
    "builtin": [],
    "tinyshakespeare": [str(SHARED / "tinyshakespeare" / "input.txt")],
    "tinystories": [str(SHARED / "tinystories" / "tinystories_valid_head.txt")],
}


def val_curve(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def first_step_reaching(curve: list[tuple[int, float]], target: float) -> float | None:
    """Linear interpolation between evaluations: the first step where val loss <= target."""
    prev = None
    for step, loss in curve:
        if loss <= target:
            if prev is None:
                return float(step)
            (s0, l0) = prev
            return s0 + (step - s0) * (l0 - target) / max(l0 - loss, 1e-12)
        prev = (step, loss)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="builtin", choices=sorted(CORPORA))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--adamw-lrs", default="2e-3,3e-3,5e-3")
    ap.add_argument("--muon-lrs", default="0.03,0.05")
    ap.add_argument(
        "--aux-lr", type=float, default=3e-3, help="AdamW lr of the embeddings/norms in Muon runs"
    )
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument(
        "--short",
        type=float,
        default=0.65,
        help="also train Muon with a full schedule of this fraction of the steps (0 = skip)",
    )
    ap.add_argument(
        "--muon-scale",
        default="original",
        choices=["original", "match_rms_adamw"],
        help="Muon's update scale (match_rms_adamw: pass AdamW-sized --muon-lrs)",
    )
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--out", default="bench_out/muon")
    args = ap.parse_args()
    from kititans.config import RunConfig, apply_overrides
    from kititans.models.spec import find_preset
    from kititans.train.pretrain import pretrain

    family = find_preset(args.preset)[0].name

    if args.corpus != "builtin" and not Path(CORPORA[args.corpus][0]).is_file():
        raise SystemExit(f"skipped: {CORPORA[args.corpus][0]} is absent")
    out = Path(args.out) / args.corpus
    shards = out / "data"
    short = round(args.short * args.steps)
    runs = [("adamw", float(lr), args.steps) for lr in args.adamw_lrs.split(",")]
    runs += [("muon", float(lr), args.steps) for lr in args.muon_lrs.split(",")]
    runs += [("muon", float(lr), short) for lr in args.muon_lrs.split(",")] if args.short else []
    curves: dict[str, list[tuple[int, float]]] = {}
    for opt, lr, steps in runs:
        scale = "-rms" if opt == "muon" and args.muon_scale != "original" else ""
        name = f"{opt}{scale}-{lr:g}" + (f"-{steps}steps" if steps != args.steps else "")
        run_dir = out / name
        if not (run_dir / "config.json").is_file():
            cfg = apply_overrides(
                RunConfig(preset=args.preset, family=family),
                list(
                    {
                        "data.sources": [str(shards)]
                        if (shards / "manifest.json").is_file()
                        else CORPORA[args.corpus],
                        "tokenizer.vocab_size": args.vocab,
                        "optim.name": opt,
                        "optim.lr" if opt == "adamw" else "optim.muon_lr": lr,
                        **({"optim.lr": args.aux_lr} if opt == "muon" else {}),
                        "train.steps": steps,
                        "train.batch_size": args.batch_size,
                        "train.seq_len": args.seq_len,
                        "train.eval_every": args.eval_every,
                        "train.save_every": 0,
                        "train.report": False,
                        "optim.warmup_steps": args.warmup,
                        "optim.muon_scale": args.muon_scale,
                        "out": str(run_dir),
                    }.items()
                ),
            )
            if not (shards / "manifest.json").is_file():
                cfg.out = str(run_dir)
            result = pretrain(cfg, progress=False)
            if not (shards / "manifest.json").is_file():  # reuse the first run's shards for the others
                (run_dir / "data").rename(shards)
            print(f"{name}: val {result.val_loss:.4f} in {result.seconds:.0f} s", flush=True)
        curves[name] = val_curve(run_dir)
    best_adamw = min((c for n, c in curves.items() if n.startswith("adamw")), key=lambda c: c[-1][1])
    # the claim checked: Muon with a schedule of `short` steps ends at or below AdamW's best final loss
    target = best_adamw[-1][1]
    rows = []
    for name, c in curves.items():
        reach = first_step_reaching(c, target)
        rows.append(
            {
                "run": name,
                "val@25%": c[len(c) // 4 - 1][1],
                "val@50%": c[len(c) // 2 - 1][1],
                "final val": c[-1][1],
                "steps to AdamW best": round(reach) if reach else "-",
                "fraction": f"{reach / args.steps:.2f}" if reach else "-",
            }
        )
    print(
        f"\n{args.corpus}: {args.preset}, {args.steps} steps x {args.batch_size * args.seq_len} tokens; "
        f"target = best AdamW final val loss {target:.4f}"
    )
    print(md_table(rows, list(rows[0])))
    write_json(
        out / "summary.json",
        {"machine": machine(), "args": vars(args), "target": target, "rows": rows, "curves": curves},
    )


if __name__ == "__main__":
    main()
