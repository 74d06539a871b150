"""Embedding with any runtime, once: texts -> [BOS] ids (cut to the model's context) -> length-sorted batches
-> the runtime's `embed_batch` -> unit vectors in the input order; and a small top-k search over them.
The twin of generate.py for "embed" families: the torch, ONNX, llama.cpp and CoreML runtimes all go through it,
so every one tokenizes exactly as training did."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def token_rows(codec: Any, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """Each text as [BOS] + ids, at most max_len tokens (what the encoder was trained on)."""
    return [[codec.bos_id, *codec.encode(t)][:max_len] for t in texts]


def embed_rows(runtime: Any, rows: Sequence[Sequence[int]], batch_size: int = 32) -> np.ndarray:
    """Vectors (N, dim) for token rows; batches of similar length pad less."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[np.ndarray] = [np.zeros(0)] * len(rows)
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        vecs = np.asarray(runtime.embed_batch([rows[i] for i in idx]), dtype=np.float32)
        for i, v in zip(idx, vecs):
            out[i] = v
    return np.stack(out) if out else np.zeros((0, 0), dtype=np.float32)


def embed_texts(runtime: Any, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    return embed_rows(runtime, token_rows(runtime.codec, texts, runtime.context_length), batch_size)


def embed_passages(
    runtime: Any, texts: Sequence[str], passage_tokens: int, stride: int, batch_size: int = 32
) -> tuple[np.ndarray, int]:
    """Vectors for texts of any length: a text longer than passage_tokens is split into overlapping passages
    (kititans.retrieval.passages) and its vector is the normalised mean of theirs. Returns (vectors, how many
    texts were split)."""
    from kititans.retrieval.passages import split_documents

    ps = split_documents(runtime.codec, texts, passage_tokens, stride)
    pv = embed_rows(runtime, ps.rows, batch_size)
    out = np.zeros((len(texts), pv.shape[1]), dtype=np.float32)
    np.add.at(out, np.asarray(ps.owner), pv)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out, ps.split_docs


def retrieval_scores(queries: np.ndarray, cands: np.ndarray) -> dict[str, float]:
    """Query i's positive is candidate i, every other candidate a negative: retrieval@1, recall@5, MRR and
    the mean margin (positive similarity minus the best negative's). Vectors are unit length."""
    sims = np.asarray(queries, np.float64) @ np.asarray(cands, np.float64).T  # (N, M)
    n = len(sims)
    pos = sims[np.arange(n), np.arange(n)]
    rank = (sims > pos[:, None]).sum(1) + 1  # 1 = the positive is the most similar candidate
    others = sims.copy()
    others[np.arange(n), np.arange(n)] = -np.inf
    return {
        "retrieval_at1": float((rank == 1).mean()),
        "recall_at5": float((rank <= 5).mean()),
        "mrr": float((1.0 / rank).mean()),
        "mean_margin": float((pos - others.max(1)).mean()),
        "pairs": n,
        "candidates": int(sims.shape[1]),
    }


@dataclass
class Hit:
    score: float
    index: int


def top_k(query: np.ndarray, docs: np.ndarray, k: int) -> list[Hit]:
    """The k documents most similar to the query (cosine: the vectors are unit length)."""
    sims = docs @ query
    best = np.argsort(-sims, kind="stable")[:k]
    return [Hit(float(sims[i]), int(i)) for i in best]
