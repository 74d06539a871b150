"""Passage scores -> document scores (a document is its best passage), and fusion of rankings.

Reciprocal-rank fusion (Cormack et al. 2009): fused(d) = sum_m w_m / (k + rank_m(d)), k = 60. It needs no
score calibration between BM25 (unbounded) and cosine (-1..1), which is why it is the default; the lexical
weight is a flag (measured in docs/encoder.md)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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


def fuse(dense: np.ndarray, lexical: np.ndarray, lexical_weight: float = 1.0) -> np.ndarray:
    return rrf([dense, lexical], [1.0, lexical_weight])
