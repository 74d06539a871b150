"""Searching an index folder: dense (cosine of unit vectors), lexical (BM25) or hybrid (reciprocal-rank
fusion), each document scored by its best passage. numpy + bm25s only: `kititans search`, `kititans serve`'s
/v1/search and an app's own code call `Searcher.search`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kititans.errors import KititansError
from kititans.retrieval.fusion import MODES, Fusion, doc_scores
from kititans.retrieval.index import Encoder, Index, check_encoder
from kititans.retrieval.lexical import terms


@dataclass
class Result:
    doc: int
    score: float
    source: str
    passage: str  # the best passage's text (the one that matched)
    split: bool  # the document is longer than one passage


class Searcher:
    def __init__(self, index: Index, encoder: Encoder | None):
        self.index, self.encoder = index, encoder
        if encoder is not None:
            check_encoder(index, encoder)
        self.owner = index.owner
        self.n_docs = len(index.docs)
        self.splits = np.bincount(self.owner, minlength=self.n_docs) > 1

    def _dense(self, query: str) -> np.ndarray:
        if self.encoder is None:
            raise KititansError(
                "dense and hybrid search need the encoder: give the model (or use --mode lexical)"
            )
        c = self.encoder.codec
        q = np.asarray(
            self.encoder.embed([[c.bos_id, *c.encode(query)][: self.encoder.context]]), np.float32
        )[0]
        return self.index.vectors @ q

    def passage_scores(self, query: str, mode: str) -> tuple[np.ndarray | None, np.ndarray | None]:
        dense = self._dense(query) if mode in ("dense", "hybrid") else None
        lex = None
        if mode in ("lexical", "hybrid"):
            lex = self.index.lexical.scores(
                terms(query, self.index.lexical.analyzer, getattr(self.encoder, "codec", None))
            )
        return dense, lex

    def search(
        self, query: str, mode: str = "hybrid", top: int = 5, fusion: Fusion | None = None
    ) -> list[Result]:
        if mode not in MODES:
            raise KititansError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
        if top < 1:
            raise KititansError(f"--top must be >= 1, got {top}")
        dense, lex = self.passage_scores(query, mode)
        fusion = Fusion.from_json(self.index.manifest["fusion"]) if fusion is None else fusion
        parts = [s for s in (dense, lex) if s is not None]
        docs = [doc_scores(s, self.owner, self.n_docs) for s in parts]
        scores = fusion(docs[0], docs[1]) if mode == "hybrid" else docs[0]
        best = np.argsort(-scores, kind="stable")[:top]
        if mode == "lexical":  # a document sharing no term with the query is no match
            best = best[scores[best] > 0]
        pscore = dense if dense is not None else lex
        out = []
        for d in best:
            mask = self.owner == d
            p = int(np.flatnonzero(mask)[int(np.argmax(pscore[mask]))])  # type: ignore[index]
            out.append(Result(int(d), float(scores[d]), self.index.docs[d].get("source", ""),
                              self.index.passages[p]["text"], bool(self.splits[d])))  # fmt: skip
        return out
