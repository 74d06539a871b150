"""kititans data: stream a corpus of any size, train (or reuse) a tokenizer, and write token shards."""

from __future__ import annotations

import argparse

from kititans.config import DataConfig

HELP = (
    "prepare token shards (train/val split, tokenizer) from text files, a hub dataset or the built-in corpus"
)
EXAMPLES = """  kititans data --out data/builtin                      # the built-in corpus
  kititans data notes/ books/*.txt chats.jsonl --vocab-size 8000 --out data/mine
  kititans data cc_ja/*.jsonl.zst wiki/*.txt.gz --vocab-size 32000 --workers 8 --out data/ja
  kititans data --dataset HuggingFaceFW/fineweb-edu:sample-10BT --max-tokens 2e9 --out data/fw   # hub stream
  kititans data more/*.txt --append data/ja               # add sources, same tokenizer, nothing re-tokenized
  kititans train --data data/mine                        # train on the prepared shards
  kititans train --data data/ja data/fw --weights 0.7,0.3   # a mixture of prepared datasets"""


def _count(text: str) -> int:
    """2e9, 2000000000 or 2_000_000_000 -> an integer."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(value)


def add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "sources",
        nargs="*",
        help=".txt .md .jsonl .json .parquet files (optionally .gz .bz2 .xz .zst), directories or globs",
    )
    p.add_argument(
        "--dataset",
        help="a Hugging Face dataset NAME[:CONFIG] or a local dataset folder, streamed (needs kititans[data])",
    )
    p.add_argument("--split", default="train", help="the --dataset split to stream (default: train)")
    p.add_argument("--text-field", default="text", help="JSON/parquet/dataset text column (default: text)")
    p.add_argument(
        "--skip-invalid", action="store_true", help="skip undecodable, binary or truncated files (counted)"
    )
    p.add_argument("--val-fraction", type=float, default=0.02, help="documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="split and sample seed (and built-in corpus seed)")
    p.add_argument("--max-docs", type=_count, default=0, help="read at most this many documents (0 = all)")
    p.add_argument(
        "--builtin-mb", type=float, default=6.0, help="size of the built-in corpus in MB (default 6)"
    )
    g = p.add_argument_group("tokenizer training")
    g.add_argument(
        "--tokenizer-sample-mb",
        type=float,
        default=100.0,
        help="the tokenizer learns from a uniform sample of this many MB of distinct documents (default 100)",
    )
    g.add_argument(
        "--tokenizer-read-mb",
        type=float,
        default=0.0,
        help="draw that sample from the first N MB read (default: all of local files, 1000 MB of a --dataset)",
    )
    g.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="characters the vocabulary covers before byte fallback (default 0.9995, right for CJK too)",
    )


def data_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(
        sources=list(args.sources),
        dataset=args.dataset,
        split=args.split,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        seed=args.seed,
        skip_invalid=args.skip_invalid,
        builtin_bytes=int(args.builtin_mb * 1e6),
        max_docs=args.max_docs,
        tokenizer_sample_mb=args.tokenizer_sample_mb,
        tokenizer_read_mb=args.tokenizer_read_mb,
        character_coverage=args.character_coverage,
        **{k: getattr(args, k) for k in ("workers", "dedup", "max_tokens", "shard_mb") if hasattr(args, k)},
    )


def configure(p: argparse.ArgumentParser) -> None:
    add_corpus_args(p)
    p.add_argument(
        "--tokenizer",
        help="reuse this tokenizer (a tokenizer, run or dataset directory) instead of training one",
    )
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary of a newly trained tokenizer")
    p.add_argument("--out", help="output directory for the dataset")
    p.add_argument(
        "--append", metavar="DATASET", help="add the sources to this prepared dataset (same tokenizer)"
    )
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: one per CPU core)")
    p.add_argument(
        "--max-tokens", type=_count, default=0, help="stop after this many tokens, e.g. 2e9 (0 = all)"
    )
    p.add_argument("--shard-mb", type=float, default=1024.0, help="token shard size cap in MB (default 1024)")
    p.add_argument(
        "--dedup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="drop exact duplicate documents (default on; 16-32 bytes of memory per unique document)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kititans.data.prepare import prepare_dataset
    from kititans.errors import KititansError

    if bool(args.out) == bool(args.append):
        raise KititansError("give exactly one of --out DIR (a new dataset) or --append DATASET")
    out = Path(args.append or args.out)
    m = prepare_dataset(
        data_config(args),
        out,
        args.vocab_size,
        args.tokenizer,
        append=bool(args.append),
        progress=not args.quiet,
    )
    seg = m["segments"][-1]
    verb = "appended to" if args.append else "wrote"
    shards = sum(len(m["splits"][s]["shards"]) for s in ("train", "val"))
    print(
        f"{verb} {out}: {m['train_tokens']:,} train tokens ({m['train_documents']:,} documents), "
        f"{m['val_tokens']:,} val tokens ({m['val_documents']:,}), vocab {m['vocab_size']}, {shards} shard(s)"
    )
    print(f"read {seg['documents_read']:,} documents; dropped {seg['duplicates']:,} exact duplicates")
    if seg["skipped_files"]:
        print(f"skipped {len(seg['skipped_files'])} invalid file(s): {seg['skipped_files'][0]}")
    for stage, s in seg["stages"].items():
        if s.get("seconds"):
            print(f"  {stage:<9} {s['mb']:10,.1f} MB in {s['seconds']:8.1f} s = {s['mb_per_s']:7.2f} MB/s")
    print(f"next: kititans train --data {out}")
    return 0
