"""Re-tune a trained retriever's hybrid fusion on its dev documents and score every fusion on its held-out ones.

`kititans train-retriever` picks the fusion (method and weight) on dev documents it keeps out of stage 2; this
does the same for a run trained before a fusion existed, and prints every candidate's held-out R@1, R@5, MRR
and nDCG@10 beside BM25 alone, so the choice can be read against what it left. Nothing is written to the run.

    python benchmarks/retrieval_fusion.py RUN --pairs sets/jsquad.jsonl --val-fraction 0.3 [--json out.json]

(--val-fraction, --seed and --dev-fraction must be the run's: they rebuild its split.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kititans.retrieval.evaluate import EvalSet, heldout_set
from kititans.retrieval.metrics import scores_report
from kititans.retrieval.recipe import (
    CANDIDATES,
    RecipeConfig,
    evaluate_run,
    read_pairs,
    split_pairs,
    tune_fusion,
)

KEYS = ("r_at1", "r_at5", "mrr", "ndcg_at10")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--dev-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rc = RecipeConfig(pairs=args.pairs, out=args.run, val_fraction=args.val_fraction, seed=args.seed,
                      dev_fraction=args.dev_fraction)  # fmt: skip
    pairs = read_pairs(args.pairs)
    _, dev = split_pairs(rc, pairs)
    chosen, sweep = tune_fusion(Path(args.run), rc, pairs, dev, EvalSet)
    ev = heldout_set(pairs, rc.seed, rc.val_fraction)
    rep, _ = evaluate_run(Path(args.run), ev, rc)
    dense, lex = rep.pop("_scores")
    rows = {"BM25 alone": rep["lexical"], "dense alone": rep["dense"]}
    rows |= {str(f): scores_report(f(dense, lex), ev.gold, with_margin=False) for f in CANDIDATES}
    print(
        f"chosen on dev: {chosen} (the first candidate whose dev MRR >= {sweep.get('mrr_threshold', 0):.4f}, one standard error below the best)"
    )
    print(f"held-out: {rep['queries']} queries, {rep['candidates']} candidate documents; dev: "
          f"{sweep.get('queries', 0)} queries, {sweep.get('documents', 0)} documents")  # fmt: skip
    print(f"{'fusion':<14}{'dev MRR':>9}" + "".join(f"{k:>11}" for k in KEYS))
    for name, m in rows.items():
        dev_mrr = sweep.get("mrr_by_fusion", {}).get(name)
        mark = "  <- chosen" if name == str(chosen) else ""
        print(f"{name:<14}{'' if dev_mrr is None else f'{dev_mrr:.4f}':>9}"
              + "".join(f"{m[k]:>11.4f}" for k in KEYS) + mark)  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps({"chosen": str(chosen), "dev": sweep, "heldout": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
