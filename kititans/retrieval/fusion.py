"""Passage scores -> document scores (a document is its best passage), and fusion of dense and lexical scores.

Two fusions, one `Fusion` value (saved in a run's retrieval.json and an index's manifest):
- `rrf:W` reciprocal-rank fusion (Cormack et al. 2009): fused(d) = 1/(k + rank_dense(d)) + W/(k + rank_bm25(d)),
  k = 60. Needs no score calibration; but a rank carries no margin, so a weak encoder's rank-1 guess moves a
  document as far as a confident one, and fusion can rank below BM25 alone (docs/encoder.md).
- `convex:A` a convex combination of the per-query min-max normalised scores: fused(d) = A * dense(d) +
  (1 - A) * bm25(d). Scores keep their margins, so a small A lets the encoder break BM25's near-ties without
  overturning its confident answers (Bruch et al. 2023, "An Analysis of Fusion Functions for Hybrid
  Retrieval": convex beats RRF in and out of domain, and its one weight tunes on few queries).
`train-retriever` picks the method and weight on dev documents (docs/encoder.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kititans.errors import KititansError

RRF_K = 60
MODES = ("dense", "lexical", "hybrid")


def doc_scores(passage_scores: np.ndarray, owner: np.ndarray, n_docs: int) -> np.ndarray:
    """(P,) or (Q, P) passage scores -> (n_docs,) or (Q, n_docs): each document's best passage. Passages are
    stored in document order, every document with at least one, so a segmented max does it."""
    s = np.atleast_2d(np.asarray(passage_scores, dtype=np.float64))
    owner = np.asarray(owner)
    if len(owner) and np.all(owner[1:] >= owner[:-1]) and len(np.unique(owner)) == n_docs:
        out = np.maximum.reduceat(s, np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]]), axis=1)
    else:
        out = np.full((len(s), n_docs), -np.inf)
        for i in range(len(s)):
            np.maximum.at(out[i], owner, s[i])
    return out if np.ndim(passage_scores) == 2 else out[0]


def ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every entry of the last axis (ties broken by position, as a stable sort)."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    r = np.empty_like(order)
    np.put_along_axis(r, order, np.broadcast_to(np.arange(1, scores.shape[-1] + 1), order.shape), axis=-1)
    return r


def rrf(score_sets: Sequence[np.ndarray], weights: Sequence[float], k: int = RRF_K) -> np.ndarray:
    """Weighted reciprocal-rank fusion of several score arrays over the same candidates (last axis)."""
    return sum(w / (k + ranks(s)) for s, w in zip(score_sets, weights))  # type: ignore[return-value]


def minmax(scores: np.ndarray) -> np.ndarray:
    """Scores -> [0, 1] per query (last axis); a query whose candidates all score alike -> zeros."""
    lo = scores.min(axis=-1, keepdims=True)
    span = scores.max(axis=-1, keepdims=True) - lo
    return np.where(span > 0, (scores - lo) / np.where(span > 0, span, 1.0), 0.0)


METHODS = ("rrf", "convex")


@dataclass(frozen=True)
class Fusion:
    """How hybrid search combines the two scores: `rrf` with BM25's weight, or `convex` with the encoder's."""

    method: str = "rrf"
    weight: float = 1.0  # rrf: BM25's weight (>= 0); convex: the dense share A (0..1)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise KititansError(f"fusion method must be one of {', '.join(METHODS)}, got {self.method!r}")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
            raise KititansError(f"the fusion weight must be a finite number >= 0, got {w!r}")
        if self.method == "convex" and w > 1:
            raise KititansError(f"convex fusion's dense weight is a share from 0 to 1, got {w}")

    @classmethod
    def parse(cls, spec: str) -> Fusion:
        """`rrf:16`, `convex:0.1` (or a bare number: rrf with that BM25 weight)."""
        method, _, weight = spec.strip().partition(":")
        if not weight:
            method, weight = "rrf", method
        try:
            return cls(method.strip().lower(), float(weight))
        except ValueError:
            raise KititansError(
                f"--fusion must look like rrf:16 or convex:0.1 (method:weight), got {spec!r}"
            ) from None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fusion:
        """A manifest's, retrieval.json's or /v1/search body's `fusion` (to_json's form); an unknown method or a
        missing weight, or one that is not a number, is one clear error."""
        method = data.get("method", "rrf")
        if method not in METHODS:
            raise KititansError(f"fusion method must be one of {', '.join(METHODS)}, got {method!r}")
        key = "dense_weight" if method == "convex" else "lexical_weight"
        w = data.get(key)
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise KititansError(f"'fusion.{key}' must be a number, got {w!r}")
        return cls(method, float(w))

    def to_json(self) -> dict[str, Any]:
        if self.method == "convex":
            return {"method": "convex", "dense_weight": self.weight, "normalise": "minmax"}
        return {"method": "rrf", "k": RRF_K, "lexical_weight": self.weight}

    def __str__(self) -> str:
        return f"{self.method}:{self.weight:g}"

    def __call__(self, dense: np.ndarray, lexical: np.ndarray) -> np.ndarray:
        if self.method == "convex":
            return self.weight * minmax(dense) + (1.0 - self.weight) * minmax(lexical)
        return rrf([dense, lexical], [1.0, self.weight])


def saved_fusion(settings: dict[str, Any]) -> Fusion:
    """A run's retrieval.json -> its fusion (runs saved before `fusion` existed: rrf with their weight)."""
    if "fusion" in settings:
        return Fusion.from_json(settings["fusion"])
    return Fusion("rrf", float(settings.get("lexical_weight", 1.0)))


def fusion_choice(spec: str | None, lexical_weight: float | None, saved: dict[str, Any]) -> Fusion:
    """The fusion a command uses: `--fusion`, else `--lexical-weight` (rrf), else the run's, else rrf:1."""
    if spec is not None and lexical_weight is not None:
        raise KititansError(
            "give --fusion or --lexical-weight, not both (--lexical-weight W is --fusion rrf:W)"
        )
    if spec is not None:
        return Fusion.parse(spec)
    if lexical_weight is not None:
        return Fusion("rrf", lexical_weight)
    return saved_fusion(saved)
