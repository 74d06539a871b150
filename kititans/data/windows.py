"""Overlapping token windows over a long document: the passages an encoder reads (kititans.retrieval.passages
builds its rows from them) and the window of a long positive a training pair keeps (data/pairs.py)."""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_OVERLAP = 0.25  # stride = 3/4 of a passage unless given


def default_stride(passage_tokens: int) -> int:
    return max(1, round(passage_tokens * (1 - DEFAULT_OVERLAP)))


def windows(n: int, size: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) token windows covering n tokens; the last one ends at n (one empty window if n == 0)."""
    if n <= size:
        return [(0, n)]
    starts = [*range(0, n - size, stride), n - size]
    return [(s, s + size) for s in starts]


def best_window(ids: Sequence[int], query_ids: Sequence[int], passage_tokens: int, stride: int) -> list[int]:
    """The window of a long positive that shares the most distinct tokens with its query (training pairs:
    the passage a question is about, rather than the first `passage_tokens` of the document)."""
    ws = windows(len(ids), passage_tokens, stride)
    if len(ws) == 1:
        return list(ids)
    q = set(query_ids)
    s, e = max(ws, key=lambda w: len(q.intersection(ids[w[0] : w[1]])))
    return list(ids[s:e])
