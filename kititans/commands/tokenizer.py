"""kititans tokenizer: train a SentencePiece BPE tokenizer and report on held-out text."""

from __future__ import annotations

import argparse

from kititans.commands.data import add_corpus_args, data_config

HELP = "train a SentencePiece BPE tokenizer (llama.cpp-compatible, with chat tokens) and evaluate it"
EXAMPLES = """  kititans tokenizer --vocab-size 4096 --out tok/builtin        # on the built-in corpus
  kititans tokenizer corpus/ --vocab-size 32000 --out tok/mine
  kititans train --data corpus/ --tokenizer tok/mine"""


def configure(p: argparse.ArgumentParser) -> None:
    add_corpus_args(p)
    p.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size (default 4096)")
    p.add_argument("--out", required=True, help="output directory (tokenizer.model + tokenizer_config.json)")
    p.add_argument("-q", "--quiet", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kititans.data.prepare import open_corpus
    from kititans.data.sampling import build_tokenizer
    from kititans.errors import KititansError

    out = Path(args.out)
    if (out / "tokenizer.model").exists():
        raise KititansError(f"{out} already holds a tokenizer; choose another --out")
    cfg = data_config(args)
    _, report = build_tokenizer(open_corpus(cfg), cfg, args.vocab_size, out)
    print(f"tokenizer written to {out}")
    for line in report.lines():
        print(f"  {line}")
    return 0
