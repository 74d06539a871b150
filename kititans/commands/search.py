"""kititans search: rank documents against a query: dense, lexical (BM25) or hybrid, over a saved index or a
folder embedded on the fly."""

from __future__ import annotations

import argparse

from kititans.commands.common import add_runtime_args

HELP = (
    "rank documents against a query with an encoder: dense, lexical (BM25) or hybrid, over --index or --docs"
)
EXAMPLES = """  kititans search runs/enc --docs notes/ --query "reset password" --top 5
  kititans search runs/enc --index idx/ --query "reset password" --mode hybrid
  kititans search runs/enc/export/model.q8_0.gguf --index idx/ --query "refund" --mode dense
  kititans search runs/enc --index idx/ --query "refund" --mode lexical"""


def configure(p: argparse.ArgumentParser) -> None:
    from kititans.commands.index import add_fusion_args, add_passage_args

    add_runtime_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--docs", nargs="+", help="files, folders or globs (as kititans data reads)")
    src.add_argument("--index", help="a folder written by `kititans index`")
    p.add_argument("--query", required=True, action="append", help="the query (repeatable)")
    p.add_argument("--top", type=int, default=5, help="results per query (default 5)")
    p.add_argument("--mode", choices=["dense", "lexical", "hybrid"], default="hybrid",
                   help="dense (cosine), lexical (BM25) or hybrid (both fused, see --fusion; default)")  # fmt: skip
    add_fusion_args(p, "the index's, else the run's, else rrf:1")
    add_passage_args(p)
    p.add_argument("--batch-size", type=int, default=32, help="passages per forward pass (default 32)")


def run(args: argparse.Namespace) -> int:
    import tempfile

    from kititans.commands.common import open_runtime
    from kititans.errors import KititansError
    from kititans.retrieval.fusion import fusion_choice, saved_fusion
    from kititans.retrieval.index import build_index, load_index
    from kititans.retrieval.search import Searcher
    from kititans.retrieval.settings import encoder_of, passage_args, read_documents, run_settings

    if args.top < 1:
        raise KititansError(f"--top must be >= 1, got {args.top}")
    given = args.fusion is not None or args.lexical_weight is not None
    chosen = fusion_choice(args.fusion, args.lexical_weight, {}) if given else None  # else the index's
    index = load_index(args.index) if args.index else None  # a corrupted index fails before the model loads
    docs = read_documents(args.docs) if args.docs else None
    rt = open_runtime(args, task="embed")
    enc = encoder_of(rt, args.model)
    with tempfile.TemporaryDirectory(prefix="kititans-search-") as tmp:
        if index is None:
            saved = run_settings(args.model)
            pt, stride = passage_args(args, enc.context, saved)
            fusion = chosen or saved_fusion(saved)
            build_index(f"{tmp}/idx", enc, docs, passage_tokens=pt, stride=stride, fusion=fusion)  # type: ignore[arg-type]
            index = load_index(f"{tmp}/idx", verify=False)
        searcher = Searcher(index, enc)
        n_split = int(searcher.splits.sum())
        if n_split:
            print(f"note: {n_split} of {searcher.n_docs} documents were longer than {index.manifest['passages']['tokens']} "
                  "tokens and were split into passages; a document scores as its best passage")  # fmt: skip
        for query in args.query:
            print(f"query: {query}  ({args.mode})")
            for rank, hit in enumerate(searcher.search(query, args.mode, args.top, chosen), 1):
                snippet = " ".join(hit.passage.split())[:100]
                print(f"  {rank}. {hit.score:.4f}  {hit.source}  {snippet}")
    return 0
