"""kititans index: a saved search index (passages, their vectors, BM25) that any runtime searches."""

from __future__ import annotations

import argparse

HELP = "build (or --add to) a saved search index over documents: passages, vectors and BM25, no torch to read"
EXAMPLES = """  kititans index notes/ --model runs/enc --out idx/                  # build
  kititans index more_notes/ --model runs/enc --out idx/ --add      # embed only the new documents
  kititans index faq.jsonl --model runs/enc/export/onnx/int8 --out idx/ --passage-tokens 96 --stride 64
  kititans search runs/enc --index idx/ --query "reset password" --mode hybrid"""


def add_encoder_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--model", required=required, help="the encoder: run dir, .gguf, ONNX folder or .mlpackage"
    )
    p.add_argument("--runtime", choices=["torch", "llamacpp", "onnx", "coreml"], default=None,
                   help="default: chosen from the model path")  # fmt: skip
    p.add_argument("--device", default="cpu", help="the runtime's device (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: all cores)")


def add_passage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--passage-tokens", type=int, default=None,
                   help="tokens per passage (default: the run's, else 127; at most the context - 1)")  # fmt: skip
    p.add_argument(
        "--stride", type=int, default=None, help="tokens between passage starts (default 3/4 of a passage)"
    )


def add_fusion_args(p: argparse.ArgumentParser, default: str = "the run's, else rrf:1") -> None:
    p.add_argument("--fusion", default=None, metavar="METHOD:W",
                   help="hybrid scores: rrf:W (reciprocal-rank fusion, BM25 weight W) or convex:A (min-max "
                        f"normalised scores, the encoder's share A); default: {default}")  # fmt: skip
    p.add_argument("--lexical-weight", type=float, default=None, help="the same as --fusion rrf:W")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("docs", nargs="+", help="files, folders or globs (as kititans data reads them)")
    p.add_argument("--out", required=True, help="the index folder")
    add_encoder_args(p)
    add_passage_args(p)
    p.add_argument("--add", action="store_true", help="append these documents to the existing index at --out")
    p.add_argument("--analyzer", choices=["auto", "pieces", "words", "chars"], default="auto",
                   help="BM25 terms: auto = character bigrams for text without spaces, else words")  # fmt: skip
    add_fusion_args(p)
    p.add_argument(
        "--dtype", choices=["float32", "float16"], default="float32", help="stored vectors (default float32)"
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kititans.commands.common import open_runtime
    from kititans.errors import KititansError
    from kititans.retrieval.fusion import fusion_choice
    from kititans.retrieval.index import build_index, check_encoder, load_index
    from kititans.retrieval.settings import encoder_of, passage_args, read_documents, run_settings

    out = Path(args.out)
    old = None
    if args.add:
        old = load_index(out)  # a missing or corrupted index fails here, before any work
    elif (out / "manifest.json").exists():
        raise KititansError(f"{out} already holds an index: pass --add to extend it, or choose another --out")
    docs = read_documents(args.docs)
    rt = open_runtime(args, task="embed")
    enc = encoder_of(rt, args.model)
    saved = run_settings(args.model)
    if old is not None:
        check_encoder(old, enc)
        pt, stride = old.manifest["passages"]["tokens"], old.manifest["passages"]["stride"]
    else:
        pt, stride = passage_args(args, enc.context, saved)
    keep = old is not None and args.fusion is None and args.lexical_weight is None  # --add keeps the index's
    fusion = None if keep else fusion_choice(args.fusion, args.lexical_weight, saved)
    m = build_index(out, enc, docs, passage_tokens=pt, stride=stride, analyzer=args.analyzer,
                    fusion=fusion, dtype=args.dtype, add_to=old)  # fmt: skip
    a = m["added"]
    print(f"{'added to' if old else 'wrote'} {out}: {a['documents']} documents -> {a['passages']} passages of "
          f"{pt} tokens (stride {stride}); {m['documents']} documents, {m['passage_count']} passages in all; "
          f"BM25 on {m['lexical']['analyzer']}; {a['build_seconds']:.1f} s")  # fmt: skip
    if a["split_documents"]:
        print(f"note: {a['split_documents']} documents were longer than one passage and were split "
              f"(truncation would have dropped {100 * a['cut_share_without_passages']:.1f}% of their tokens)")  # fmt: skip
    return 0
