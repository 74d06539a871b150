"""Shared plumbing of the retrieval verbs: an encoder from a runtime, a run's saved search defaults, reading
documents from files and folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kititans.errors import KititansError
from kititans.retrieval.index import Encoder
from kititans.retrieval.passages import DEFAULT_PASSAGE_TOKENS, check_passages

SETTINGS = "retrieval.json"  # written by train-retriever next to the encoder


def encoder_of(rt: Any, name: str = "") -> Encoder:
    from kititans.embedding import embed_rows

    return Encoder(lambda rows: embed_rows(rt, rows), rt.codec, int(rt.context_length), str(name))


def run_settings(model: str | Path) -> dict[str, Any]:
    """The search defaults train-retriever saved in the run (for the run dir or an export inside it)."""
    path = Path(model).resolve()
    for d in [path, *list(path.parents)[:4]]:
        f = d / SETTINGS
        if f.is_file():
            try:
                return dict(json.loads(f.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                return {}
    return {}


def passage_args(args: Any, context: int, saved: dict[str, Any]) -> tuple[int, int]:
    """--passage-tokens / --stride, else the run's saved ones, else 127 (capped at the context)."""
    pt = args.passage_tokens or saved.get("passage_tokens") or min(DEFAULT_PASSAGE_TOKENS, context - 1)
    stride = args.stride or (saved.get("stride") if not args.passage_tokens else None)
    return check_passages(int(pt), stride, context)


def read_documents(sources: list[str]) -> list[dict[str, str]]:
    """Every document of files, folders or globs (as kititans data reads them), with where it came from."""
    from kititans.data.readers import Corpus

    corpus = Corpus(sources)
    docs = []
    for doc in corpus:  # an empty folder or a missing file fails here with one line
        if doc.strip():
            docs.append({"source": str(corpus.source), "text": doc})
    if not docs:
        raise KititansError(f"{' '.join(sources)}: no document with text (an empty corpus)")
    return docs
