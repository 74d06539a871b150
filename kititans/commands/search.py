"""kititans search: a tiny retrieval demo: embed a folder of documents, rank them against a query."""

from __future__ import annotations

import argparse

from kititans.commands.common import add_runtime_args, open_runtime

HELP = "rank the documents of a folder against a query with an encoder (a retrieval demo)"
EXAMPLES = """  kititans search runs/enc --docs notes/ --query "reset password" --top 5
  kititans search runs/enc/export/onnx/int8 --docs faq.jsonl --query "refund" --top 3"""


def configure(p: argparse.ArgumentParser) -> None:
    add_runtime_args(p)
    p.add_argument(
        "--docs", required=True, nargs="+", help="files, folders or globs (as kititans data reads)"
    )
    p.add_argument("--query", required=True, action="append", help="the query (repeatable)")
    p.add_argument("--top", type=int, default=5, help="results per query (default 5)")
    p.add_argument("--batch-size", type=int, default=32, help="documents per forward pass (default 32)")


def run(args: argparse.Namespace) -> int:
    from kititans.data.readers import Corpus
    from kititans.embedding import embed_texts, top_k
    from kititans.errors import KititansError

    if args.top < 1:
        raise KititansError(f"--top must be >= 1, got {args.top}")
    corpus = Corpus(args.docs)
    docs, where = [], []
    for doc in corpus:  # an empty folder or corpus fails here with one line
        docs.append(doc)
        where.append(corpus.source)
    rt = open_runtime(args, task="embed")
    dvecs = embed_texts(rt, docs, args.batch_size)
    for query in args.query:
        qvec = embed_texts(rt, [query])[0]
        print(f"query: {query}")
        for rank, hit in enumerate(top_k(qvec, dvecs, args.top), 1):
            snippet = " ".join(docs[hit.index].split())[:100]
            print(f"  {rank}. {hit.score:.4f}  {where[hit.index]}  {snippet}")
    return 0
