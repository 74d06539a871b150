"""Validation loss of Titans `titans-tiny` variants against Lite `tiny` at equal tokens, through `kititans
train`'s own code path (pretrain(): same data shards, same tokenizer, same seed, same batches, same optimizer).

    nice -n 10 python benchmarks/titans_valloss.py                                # builtin + tinystories
    nice -n 10 python benchmarks/titans_valloss.py --corpus builtin --steps 1200  # the presets' full schedule
    nice -n 10 python benchmarks/titans_valloss.py --variant lite=tiny --variant mac=titans-tiny:block=mac \
        --variant conv=titans-tiny:mem_conv=4                                     # any presets + model keys

A variant is NAME=PRESET[:key=value,...] (model config keys, as `--set model.key=value`); the default set is
Lite tiny and titans-tiny as mal, mac and mag.

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
from kititans.data.prepare import prepare_data
from kititans.models.spec import find_preset
from kititans.train.pretrain import pretrain

# ../shared/data beside the checkout (a worktree under /work/wt: KITITANS_SHARED_DATA=/work/shared/data)
SHARED = Path(os.environ.get("KITITANS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
CORPORA = {
    "builtin": None,
    "tinystories": SHARED / "tinystories",
    "tinyshakespeare": SHARED / "tinyshakespeare",
}
DEFAULT_VARIANTS = (
    "lite=tiny",
    "mal=titans-tiny:block=mal",
    "mac=titans-tiny:block=mac",
    "mag=titans-tiny:block=mag",
)


def parse_variant(text: str) -> tuple[str, str, list[tuple[str, str]]]:
    """NAME=PRESET[:k=v,...] -> (name, preset, [("model.k", "v"), ...])."""
    name, _, rest = text.partition("=")
    preset, _, keys = rest.partition(":")
    over = [(f"model.{k}", v) for k, v in (kv.split("=", 1) for kv in keys.split(",") if kv)]
    return name, preset, over


def run_corpus(corpus: str, out: Path, args: argparse.Namespace) -> dict:
    src = CORPORA[corpus]
    if src is not None and not src.is_dir():
        return {"skipped": f"{src} not found"}
    base = RunConfig()
    if src is not None:
        base.data.sources = [str(src)]
    elif args.builtin_bytes:
        base.data.builtin_bytes = args.builtin_bytes
    shards = out / corpus / "data"
    prepare_data(base.data, shards, 4096, progress=False)
    res: dict = {}
    for name, preset, over in map(parse_variant, args.variant or DEFAULT_VARIANTS):
        family = find_preset(preset)[0].name
        cfg = RunConfig(family=family, preset=preset)
        apply_overrides(
            cfg,
            [
                *over,
                ("data.sources", [str(shards)]),
                ("tokenizer.path", str(shards)),
                ("optim.name", args.optimizer),
                ("train.steps", args.steps),
                ("train.batch_size", args.batch_size),
                ("train.seq_len", args.seq_len),
                ("train.eval_every", max(args.steps // 4, 1)),
                ("train.save_every", args.steps),
                ("train.eval_batches", 16),
                ("train.threads", args.threads),
                ("train.dtype", args.dtype),
                ("train.seed", args.seed),
                ("out", str(out / corpus / name)),
            ],
        )
        r = pretrain(cfg, progress=not args.quiet)
        rows = [json.loads(ln) for ln in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
        res[name] = {
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
    ap.add_argument("--builtin-bytes", type=int, default=0, help="size of the built-in corpus (0: default)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--variant", action="append", help="NAME=PRESET[:key=value,...] (repeatable)")
    ap.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--out", default="runs/titans-valloss")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--seed", type=int, default=0, help="train.seed: initial weights and batch order")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = {c: run_corpus(c, out, args) for c in args.corpus}
    tokens = args.batch_size * args.seq_len
    print(f"val loss at equal tokens ({args.steps} steps x {tokens:,} tokens, {args.optimizer}):")
    for c, r in results.items():
        if "skipped" in r:
            print(f"  {c}: skipped ({r['skipped']})")
            continue
        first = next(iter(r.values()))["val_loss"]
        for name, v in r.items():
            print(
                f"  {c:<14} {name:<16} val loss {v['val_loss']:.4f} (vs the first {v['val_loss'] - first:+.4f}) "
                f"{v['tokens_per_s']:,.0f} tok/s, {v['params'] / 1e6:.2f}M params"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
