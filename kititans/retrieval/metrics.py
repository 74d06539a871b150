"""Ranking metrics over document scores: one relevant document per query (its positive).

A tie with another candidate counts against the query (pessimistic rank), so a query that matches nothing
(all lexical scores 0) ranks last, not first."""

from __future__ import annotations

from typing import Any

import numpy as np


def gold_ranks(scores: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scores (Q, D), gold (Q,) -> the positive's pessimistic 1-based rank and its margin over the best other."""
    scores = np.asarray(scores, dtype=np.float64)
    q = np.arange(len(scores))
    pos = scores[q, gold]
    others = scores.copy()
    others[q, gold] = -np.inf
    rank = 1 + (others >= pos[:, None]).sum(1)
    best_other = others.max(1) if scores.shape[1] > 1 else np.zeros(len(scores))
    return rank, pos - best_other


def summarize(rank: np.ndarray, margin: np.ndarray | None = None) -> dict[str, Any]:
    rank = np.asarray(rank)
    out: dict[str, Any] = {
        "r_at1": float((rank == 1).mean()),
        "r_at5": float((rank <= 5).mean()),
        "mrr": float((1.0 / rank).mean()),
        "ndcg_at10": float(np.where(rank <= 10, 1.0 / np.log2(rank + 1), 0.0).mean()),
    }
    if margin is not None:
        out["margin"] = float(np.mean(margin))
    return out


def scores_report(scores: np.ndarray, gold: np.ndarray, with_margin: bool = True) -> dict[str, Any]:
    rank, margin = gold_ranks(scores, np.asarray(gold))
    return summarize(rank, margin if with_margin else None)
