"""kititans eval-retrieval: document-level retrieval of any encoder artifact on a pairs file, with the lexical
baseline and the hybrid on the same candidates."""

from __future__ import annotations

import argparse

from kititans.commands.common import add_runtime_args

HELP = "score an encoder (run, .gguf, ONNX, .mlpackage) on held-out documents: R@1, R@5, MRR, nDCG@10, margin"
EXAMPLES = """  kititans eval-retrieval runs/ret --pairs qa.jsonl                  # the run's own document-grouped held-out split
  kititans eval-retrieval runs/ret/export/model.q8_0.gguf --pairs qa.jsonl --corpus wiki/   # + distractors
  kititans eval-retrieval runs/ret/export/onnx/int8 --pairs test.jsonl --split all --out report.json"""


def configure(p: argparse.ArgumentParser) -> None:
    from kititans.commands.index import add_fusion_args, add_passage_args

    add_runtime_args(p)
    p.add_argument(
        "--pairs", required=True, help='labelled pairs: JSONL {"query", "positive"} or chat records'
    )
    p.add_argument("--corpus", nargs="+", default=None, help="distractor documents joining the candidates")
    p.add_argument("--split", choices=["heldout", "all"], default="heldout",
                   help="heldout: the document-grouped held-out split (the run's seed and fraction); all: every pair")  # fmt: skip
    p.add_argument("--val-fraction", type=float, default=None, help="held-out share (default: the run's)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default: the run's)")
    add_passage_args(p)
    p.add_argument(
        "--analyzer", choices=["auto", "pieces", "words", "chars"], default="auto", help="BM25 terms"
    )
    add_fusion_args(p)
    p.add_argument(
        "--lexical-only", action="store_true", help="BM25 only (the encoder just tokenizes passages)"
    )
    p.add_argument("--out", help="also write the report as JSON here")


def _run_split(model: str) -> tuple[float | None, int | None]:
    """The held-out fraction and seed of the run the artifact comes from (its config.json), if found."""
    import json
    from pathlib import Path

    path = Path(model).resolve()
    for d in [path, *list(path.parents)[:4]]:
        try:
            run = json.loads((d / "config.json").read_text(encoding="utf-8"))["kititans"]["run"]
            return run["contrastive"]["val_fraction"], run["data"]["seed"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None, None


def run(args: argparse.Namespace) -> int:
    from kititans.commands.common import open_runtime
    from kititans.files import write_json
    from kititans.retrieval.evaluate import EvalSettings, add_distractors, evaluate, heldout_set, lines
    from kititans.retrieval.fusion import fusion_choice
    from kititans.retrieval.recipe import read_pairs
    from kititans.retrieval.settings import encoder_of, passage_args, read_documents, run_settings

    saved = run_settings(args.model)
    fusion = fusion_choice(args.fusion, args.lexical_weight, saved)  # a bad flag fails before any work
    frac, seed = _run_split(args.model)
    frac = args.val_fraction if args.val_fraction is not None else (frac or 0.1)
    seed = args.seed if args.seed is not None else (seed or 0)
    ev = heldout_set(read_pairs(args.pairs), seed, frac, args.split, where=args.pairs)
    if args.corpus:
        add_distractors(ev, (d["text"] for d in read_documents(args.corpus)))
    rt = open_runtime(args, task="embed")
    enc = encoder_of(rt, args.model)
    pt, stride = passage_args(args, enc.context, saved)
    embed = None if args.lexical_only else enc.embed
    report = evaluate(ev, embed, enc.codec, EvalSettings(pt, stride, args.analyzer, fusion), enc.context)
    report.pop("_scores", None)
    report["model"] = str(args.model)
    print(f"{args.model}:")
    print("\n".join(lines(report)))
    if args.out:
        write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0
