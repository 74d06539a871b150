"""Validation loss of Titans `titans-tiny` against Lite `tiny` at equal tokens, through `kititans train`'s own
code path (pretrain(): same data shards, same tokenizer, same seed, same batches, same optimizer settings).

    nice -n 10 python benchmarks/titans_valloss.py                                # builtin + tinystories
    nice -n 10 python benchmarks/titans_valloss.py --corpus builtin --steps 1200  # the presets' full schedule

Corpora: the built-in corpus (6 MB generated) and /work/shared/data/tinystories (0.8 MB of TinyStories
validation text; skipped with a note when absent). Each corpus gets one 4096-piece tokenizer shared by both
models, so their losses are in the same units (nats per token of that tokenizer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from kititans.config import RunConfig, apply_overrides
from kititans.train.pretrain import pretrain
from kititans.data.prepare import prepare_data

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CORPORA = {
    "builtin": None,
    "tinystories": SHARED / "tinystories",
    "tinyshakespeare": SHARED / "tinyshakespeare",
}
MODELS = (("lite", "tiny"), ("titans", "titans-tiny"))


def run_corpus(name: str, out: Path, args: argparse.Namespace) -> dict:
    src = CORPORA[name]
    if src is not None and not src.is_dir():
        return {"skipped": f"{src} not found"}
    base = RunConfig()
    if src is not None:
        base.data.sources = [str(src)]
    shards = out / name / "data"
    prepare_data(base.data, shards, 4096, progress=False)
    res: dict = {}
    for family, preset in MODELS:
        cfg = RunConfig(family=family, preset=preset)
        apply_overrides(
            cfg,
            [
                ("data.sources", [str(shards)]),
                ("tokenizer.path", str(shards)),
                ("optim.name", args.optimizer),
                ("train.steps", args.steps),
                ("train.batch_size", 16),
                ("train.seq_len", 256),
                ("train.eval_every", max(args.steps // 4, 1)),
                ("train.save_every", args.steps),
                ("train.eval_batches", 16),
                ("train.threads", args.threads),
                ("train.dtype", args.dtype),
                ("out", str(out / name / preset)),
            ],
        )
        r = pretrain(cfg, progress=not args.quiet)
        rows = [json.loads(ln) for ln in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
        res[preset] = {
            "val_loss": r.val_loss,
            "tokens": r.tokens,
            "seconds": round(r.seconds, 1),
            "tokens_per_s": round(r.tokens_per_s, 1),
            "params": r.params,
            "val_curve": [(x["step"], x["val_loss"]) for x in rows if "val_loss" in x],
        }
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", nargs="+", default=["builtin", "tinystories"], choices=list(CORPORA))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--out", default="runs/titans-valloss")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = {c: run_corpus(c, out, args) for c in args.corpus}
    print(f"val loss at equal tokens ({args.steps} steps x 4,096 tokens, {args.optimizer}):")
    for c, r in results.items():
        if "skipped" in r:
            print(f"  {c}: skipped ({r['skipped']})")
            continue
        lite, titans = r["tiny"], r["titans-tiny"]
        print(
            f"  {c:<16} lite tiny {lite['val_loss']:.4f} ({lite['tokens_per_s']:,.0f} tok/s)   "
            f"titans-tiny {titans['val_loss']:.4f} ({titans['tokens_per_s']:,.0f} tok/s)   "
            f"delta {titans['val_loss'] - lite['val_loss']:+.4f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
