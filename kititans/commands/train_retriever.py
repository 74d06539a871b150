"""kititans train-retriever: the two-stage recipe (span pairs, mined hard negatives, labelled pairs)."""

from __future__ import annotations

import argparse

HELP = "train a retrieval encoder in two stages (span pairs, then labelled pairs with mined hard negatives)"
EXAMPLES = """  kititans train-retriever --pairs qa.jsonl --out runs/ret                     # encoder-tiny, both stages
  kititans train-retriever --pairs qa.jsonl --corpus notes/ --preset encoder-33m --out runs/ret33
  kititans train-retriever --config configs/retriever-tiny.yaml --pairs qa.jsonl --out runs/ret
  kititans train-retriever --pairs qa.jsonl --init runs/my-lite --stage1-steps 0 --out runs/ret   # mine with BM25 + the Lite trunk"""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML recipe (keys as the flags, with underscores); flags win")
    p.add_argument("--pairs", help='labelled pairs: JSONL {"query", "positive"} or chat records')
    p.add_argument("--out", help="the run directory (the stage-2 encoder; stage 1 in OUT/stage1)")
    p.add_argument(
        "--corpus", nargs="+", default=None, help="more unlabelled text for stage 1 (files, folders)"
    )
    p.add_argument("--preset", default=None, help="encoder preset (default encoder-tiny)")
    p.add_argument(
        "--init", default=None, help="start stage 1 from this Lite (or encoder) run and its tokenizer"
    )
    p.add_argument(
        "--vocab-size", type=int, default=None, help="pieces of the tokenizer trained on the pairs"
    )
    p.add_argument("--stage1-steps", type=int, default=None, help="span-pair steps (default 600; 0 skips)")
    p.add_argument("--stage2-steps", type=int, default=None, help="labelled-pair steps (default 600)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (default 32)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per text, BOS included (default 128)")
    p.add_argument(
        "--val-fraction", type=float, default=None, help="held-out share of documents (default 0.1)"
    )
    p.add_argument("--seed", type=int, default=None, help="split and sampling seed (default 0)")
    p.add_argument(
        "--miners", choices=["lexical", "dense", "both"], default=None, help="hard-negative miners"
    )
    from kititans.commands.index import add_fusion_args

    add_fusion_args(p, "tuned on dev documents held back from stage 2")
    p.add_argument(
        "--set", action="append", default=None, metavar="KEY=VALUE", help="a config key for both stages"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from kititans.retrieval.fusion import Fusion
    from kititans.retrieval.recipe import RecipeConfig, run_recipe

    flags = {"pairs": args.pairs, "out": args.out, "corpus": args.corpus, "preset": args.preset, "init": args.init,
             "vocab_size": args.vocab_size, "stage1_steps": args.stage1_steps, "stage2_steps": args.stage2_steps,
             "batch_size": args.batch_size, "lr": args.lr, "seq_len": args.seq_len, "val_fraction": args.val_fraction,
             "seed": args.seed, "miners": args.miners, "lexical_weight": args.lexical_weight, "fusion": args.fusion,
             "sets": args.set}  # fmt: skip
    if args.config:
        rc = RecipeConfig.from_yaml(args.config, **flags)
    else:
        rc = RecipeConfig(**{k: v for k, v in flags.items() if v is not None})
    report = run_recipe(rc, progress=not args.quiet)
    c = report["candidates"]
    print(f"\nrun: {rc.out}  (stage 1: {rc.out}/stage1, mined pairs: {rc.out}/mined.jsonl)")
    print(f"held-out: {report['split']['split_rule']}; {c['queries']} queries, {c['candidates']} candidate "
          f"documents, {c['passages']} passages")  # fmt: skip
    rows = [("lexical (BM25, " + c["analyzer"] + ")", report["lexical"])]
    for stage in ("stage1", "stage2"):
        if stage in report:
            rows += [(f"{stage} dense", report[stage]["dense"]), (f"{stage} hybrid", report[stage]["hybrid"])]
    for name, m in rows:
        print(
            f"  {name:<20} R@1 {m['r_at1']:.3f}  R@5 {m['r_at5']:.3f}  MRR {m['mrr']:.3f}  nDCG@10 {m['ndcg_at10']:.3f}"
        )
    f = report["fusion"]
    how = "tuned on dev documents" if f.get("tuned_on_dev") else "fixed"
    print(f"  hybrid fusion: {Fusion.from_json(f)} ({how}; saved in {rc.out}/retrieval.json)")
    pl = report["pair_level"]
    print(
        f"pair-level report of the same run (old): retrieval@1 {pl.get('retrieval_at1', 0):.3f}  MRR {pl.get('mrr', 0):.3f}"
    )
    print(f"report: {rc.out}/retrieval_report.json")
    return 0
