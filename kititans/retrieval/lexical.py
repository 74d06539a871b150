"""The lexical side: BM25 (Lucene's variant, via the maintained `bm25s` library: numpy sparse columns, saved
as .npy + JSON, no pickle, no torch) over one of three analyzers:

  pieces  the encoder's SentencePiece pieces (what the encoder reads; space-delimited text)
  words   lowercased NFKC word characters (\\w+)
  chars   lowercased NFKC character bigrams without whitespace (Japanese, Chinese: text without spaces)

`auto` picks chars for text without spaces and words otherwise (measured in docs/encoder.md).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kititans.errors import KititansError

ANALYZERS = ("auto", "pieces", "words", "chars")
_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")


def _bm25s() -> Any:
    try:
        import bm25s
    except ImportError:
        raise KititansError("lexical search needs bm25s: pip install 'kititans[retrieval]'") from None
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def detect_analyzer(texts: Iterable[str], limit: int = 200_000) -> str:
    """chars for text with almost no spaces (a space every 20 characters or less), else words."""
    from kititans.data.tokenizer import space_delimited

    chars = spaces = 0
    for t in texts:
        chars += len(t)
        spaces += t.count(" ") + t.count("\n")
        if chars >= limit:
            break
    return "words" if space_delimited(chars, spaces) else "chars"


def terms(text: str, analyzer: str, codec: Any = None) -> list[str]:
    """The index terms of a text under an analyzer (never `auto`: resolve it first)."""
    if analyzer == "pieces":
        if codec is None:
            raise KititansError("the 'pieces' analyzer needs the encoder's tokenizer")
        return [codec.id_to_piece(i) for i in codec.encode(text)]
    norm = unicodedata.normalize("NFKC", text).lower()
    if analyzer == "words":
        return _WORD.findall(norm)
    if analyzer == "chars":
        s = _SPACE.sub("", norm)
        return [s[i : i + 2] for i in range(len(s) - 1)] if len(s) > 1 else ([s] if s else [])
    raise KititansError(f"unknown lexical analyzer {analyzer!r}; valid: {', '.join(ANALYZERS)}")


class LexicalIndex:
    """BM25 over a list of passages' terms: scores(query_terms) -> one score per passage."""

    def __init__(self, bm25: Any, analyzer: str):
        self.bm25, self.analyzer = bm25, analyzer

    @classmethod
    def build(
        cls, passage_terms: Sequence[list[str]], analyzer: str, k1: float = 1.5, b: float = 0.75
    ) -> LexicalIndex:
        if not passage_terms:
            raise KititansError("nothing to index: the corpus has no text")
        bm25 = _bm25s().BM25(k1=k1, b=b)
        # a passage with no term at all still gets a column (bm25s gives it the empty token)
        bm25.index([t if t else [""] for t in passage_terms], show_progress=False)
        return cls(bm25, analyzer)

    @property
    def size(self) -> int:
        return int(self.bm25.scores["num_docs"])

    def scores(self, query_terms: Sequence[str]) -> np.ndarray:
        ids = self.bm25.get_tokens_ids([t for t in query_terms if t])
        if not ids:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self.bm25.get_scores_from_ids(ids), dtype=np.float32)

    def save(self, folder: str | Path) -> None:
        self.bm25.save(str(folder), show_progress=False)

    @classmethod
    def load(cls, folder: str | Path, analyzer: str) -> LexicalIndex:
        try:
            bm25 = _bm25s().BM25.load(str(folder), mmap=False, load_corpus=False)
        except (OSError, ValueError, KeyError) as e:
            raise KititansError(
                f"{folder}: unreadable lexical index ({type(e).__name__}): rebuild the index"
            ) from None
        return cls(bm25, analyzer)
