"""kititans embed: sentence vectors from an encoder (run dir, ONNX folder, .gguf or .mlpackage)."""

from __future__ import annotations

import argparse

from kititans.commands.common import add_runtime_args, open_runtime

HELP = "embed texts with an encoder: print the vectors, or save them as .npy"
EXAMPLES = """  kititans embed runs/enc --text "how do I reset my password?"
  kititans embed runs/enc --text "first" --text "second"          # one JSON vector per line
  kititans embed runs/enc --file questions.txt --out vecs.npy     # one text per line -> (N, dim) float32
  kititans embed runs/enc/export/onnx/int8 --file questions.txt --out vecs.npy
  kititans embed runs/enc --file long_notes.txt --passage-tokens 127 --stride 96   # long texts: passages"""


def configure(p: argparse.ArgumentParser) -> None:
    add_runtime_args(p)
    p.add_argument("--text", action="append", default=[], help="a text to embed (repeatable)")
    p.add_argument("--file", help="a UTF-8 file with one text per line")
    p.add_argument("--out", help="write the vectors to this .npy file instead of printing them")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    p.add_argument("--passage-tokens", type=int, default=None,
                   help="a longer text is split into passages of this many tokens and its vector is the "
                        "normalised mean of theirs (default: the context - 1)")  # fmt: skip
    p.add_argument(
        "--stride", type=int, default=None, help="tokens between passage starts (default 3/4 of a passage)"
    )


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    import numpy as np

    from kititans.embedding import embed_passages
    from kititans.errors import KititansError
    from kititans.files import atomic_path

    texts = list(args.text)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise KititansError(f"--file: no such file: {path}")
        try:
            texts += [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError as e:
            raise KititansError(f"--file {path}: not UTF-8 text (byte {e.start})") from None
    if not texts:
        raise KititansError("nothing to embed: pass --text TEXT or --file FILE")
    if args.batch_size < 1:
        raise KititansError(f"--batch-size must be >= 1, got {args.batch_size}")
    rt = open_runtime(args, task="embed")
    from kititans.retrieval.passages import check_passages

    pt, stride = check_passages(args.passage_tokens or rt.context_length - 1, args.stride, rt.context_length)
    vecs, n_split = embed_passages(rt, texts, pt, stride, args.batch_size)
    if n_split:
        print(f"note: {n_split} of {len(texts)} inputs were longer than {pt} tokens: each was split into passages "
              "(--passage-tokens, --stride) and its vector is the normalised mean of theirs", file=sys.stderr)  # fmt: skip
    if args.out:
        out = Path(args.out)
        if out.suffix != ".npy":
            raise KititansError(f"--out {out}: give a .npy file name")
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, vecs, allow_pickle=False)
        print(f"wrote {out}: {vecs.shape[0]} vectors of {vecs.shape[1]} floats")
        return 0
    for v in vecs:
        print(json.dumps([round(float(x), 6) for x in v]))
    return 0
