"""Hard negatives for labelled pairs: for each training query, a training document that the lexical
retriever (BM25) or the stage-1 encoder ranks high but that is not its positive, written in the pairs format
({"query", "positive", "negative"}) so the contrastive loss takes them as they are.

Miners alternate pair by pair (lexical, dense, ...); each draws among its top `depth` non-positive documents
(seeded), since the very top of a strong miner is often a true positive nobody labelled. Held-out pairs get a
lexical negative drawn from the training documents only, so nothing about held-out documents leaks."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kititans.errors import KititansError
from kititans.files import atomic_path
from kititans.retrieval.evaluate import Embed, dense_scores, lexical_scores
from kititans.retrieval.lexical import detect_analyzer
from kititans.retrieval.passages import split_documents

MINERS = ("lexical", "dense", "both")


def _pick(scores: np.ndarray, banned: set[int], depth: int, rng: random.Random) -> int | None:
    order = np.argsort(-scores, kind="stable")
    cands = [int(d) for d in order[: depth + len(banned)] if int(d) not in banned][:depth]
    return rng.choice(cands) if cands else None


def mine_negatives(
    pairs: Sequence[tuple[str, str]], is_heldout: Sequence[bool], codec: Any, embed: Embed | None, *,
    passage_tokens: int, stride: int, max_len: int, miners: str = "both", depth: int = 3, seed: int = 0,
) -> tuple[list[str | None], dict[str, int]]:  # fmt: skip
    """One negative per pair (None when no document qualifies) and how many each miner gave."""
    if miners not in MINERS:
        raise KititansError(f"--miners must be one of {', '.join(MINERS)}, got {miners!r}")
    if miners != "lexical" and embed is None:
        raise KititansError("dense mining needs the stage-1 encoder")
    docs = sorted({p for (_, p), h in zip(pairs, is_heldout) if not h})
    index = {d: i for i, d in enumerate(docs)}
    passages = split_documents(codec, docs, passage_tokens, stride)
    queries = [q for q, _ in pairs]
    lex = lexical_scores(codec, queries, passages, len(docs), detect_analyzer(docs))
    dense = None
    if miners != "lexical":
        train_q = [i for i, h in enumerate(is_heldout) if not h]
        dense = np.full_like(lex, -np.inf)
        dense[train_q] = dense_scores(
            embed, codec, [queries[i] for i in train_q], passages, len(docs), max_len
        )  # type: ignore[arg-type]
    rng = random.Random(seed)
    out: list[str | None] = []
    counts = {"lexical": 0, "dense": 0, "none": 0}
    for i, ((_, p), held) in enumerate(zip(pairs, is_heldout)):
        banned = {index[p]} if p in index else set()
        use = "lexical" if held or miners == "lexical" or (miners == "both" and i % 2 == 0) else "dense"
        d = _pick(lex[i] if use == "lexical" else dense[i], banned, depth, rng)  # type: ignore[index]
        counts[use if d is not None else "none"] += 1
        out.append(docs[d] if d is not None else None)
    return out, counts


def write_pairs(path: str | Path, pairs: Sequence[tuple[str, str]], negatives: Sequence[str | None]) -> int:
    """The pairs with their negatives as JSONL (atomic); a pair without a negative is dropped (the loss
    takes negatives only when every pair has one). Returns the number written."""
    n = 0
    with atomic_path(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for (q, p), neg in zip(pairs, negatives):
            if neg is None:
                continue
            f.write(json.dumps({"query": q, "positive": p, "negative": neg}, ensure_ascii=False) + "\n")
            n += 1
    return n
