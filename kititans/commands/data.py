"""kititans data: read a corpus, train (or reuse) a tokenizer, and write token shards."""

from __future__ import annotations

import argparse

from kititans.config import DataConfig

HELP = (
    "prepare token shards (train/val split, tokenizer) from text files, a hub dataset or the built-in corpus"
)
EXAMPLES = """  kititans data --out data/builtin                      # the built-in corpus
  kititans data notes/ books/*.txt chats.jsonl --vocab-size 8000 --out data/mine
  kititans data --dataset roneneldan/TinyStories --out data/ts    # needs the hub: pip install 'kititans[data]'
  kititans train --data data/mine                        # train on the prepared shards"""


def add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="*", help=".txt .md .jsonl .json .parquet files, directories or globs")
    p.add_argument(
        "--dataset", help="a Hugging Face dataset NAME[:CONFIG] (needs network and kititans[data])"
    )
    p.add_argument("--text-field", default="text", help="JSON/parquet/dataset text column (default: text)")
    p.add_argument("--skip-invalid", action="store_true", help="skip undecodable/binary files with a warning")
    p.add_argument("--val-fraction", type=float, default=0.02, help="documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="split seed (and built-in corpus seed)")
    p.add_argument(
        "--builtin-mb", type=float, default=6.0, help="size of the built-in corpus in MB (default 6)"
    )


def data_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(
        sources=list(args.sources),
        dataset=args.dataset,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        seed=args.seed,
        skip_invalid=args.skip_invalid,
        builtin_bytes=int(args.builtin_mb * 1e6),
    )


def configure(p: argparse.ArgumentParser) -> None:
    add_corpus_args(p)
    p.add_argument(
        "--tokenizer", help="reuse this tokenizer (a tokenizer or run directory) instead of training one"
    )
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of a newly trained tokenizer")
    p.add_argument("--out", required=True, help="output directory for the shards")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kititans.data.shards import MANIFEST
    from kititans.errors import KititansError
    from kititans.files import read_json
    from kititans.train.setup import prepare_data

    out = Path(args.out)
    if (out / MANIFEST).exists():
        raise KititansError(f"{out} already holds prepared shards; choose another --out or delete it")
    prepare_data(data_config(args), out, args.vocab_size, args.tokenizer, progress=not args.quiet)
    m = read_json(out / MANIFEST)
    print(
        f"shards in {out}: {m['train_tokens']:,} train tokens ({m['train_documents']} documents), "
        f"{m['val_tokens']:,} val tokens ({m['val_documents']}), vocab {m['vocab_size']}"
    )
    print(f"next: kititans train --data {out}")
    return 0
