"""Document-level retrieval evaluation: held-out queries against every distinct held-out document (plus
optional distractors), each document split into passages and scored as its best passage, for the dense
encoder, the lexical baseline (BM25) on the same candidates, and their fusion, in one run.

The encoder is reached through `embed(rows) -> (N, dim) unit vectors` and its `codec`, so the same code scores
a model being trained (train/contrastive.py) and any exported artifact through its runtime (eval-retrieval).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kititans.errors import KititansError
from kititans.retrieval.fusion import Fusion, doc_scores
from kititans.retrieval.lexical import LexicalIndex, detect_analyzer, terms
from kititans.retrieval.metrics import scores_report
from kititans.retrieval.passages import Passages, split_documents

Embed = Callable[[Sequence[Sequence[int]]], np.ndarray]
QUERY_BATCH = 256
MAX_HELDOUT_PAIRS = 2000  # as training's pair store (kititans.data.pairs.build_pairs)


@dataclass
class EvalSet:
    queries: list[str]
    gold: list[int]  # index into docs
    docs: list[str]  # the held-out documents first, then distractors
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSettings:
    passage_tokens: int
    stride: int
    analyzer: str = "auto"
    fusion: Fusion = field(default_factory=Fusion)
    modes: tuple[str, ...] = ("lexical", "dense", "hybrid")


def heldout_set(
    pairs: Iterable[tuple[str, str]],
    seed: int,
    val_fraction: float,
    split: str = "heldout",
    where: str = "pairs",
) -> EvalSet:
    """(query, positive) pairs -> the held-out queries and their distinct documents, grouped by positive
    document with the rule training uses (kititans.data.pairs.DocumentSplit), or every pair (split="all")."""
    from kititans.data.pairs import DocumentSplit

    decide = DocumentSplit(seed, val_fraction, MAX_HELDOUT_PAIRS)
    index: dict[str, int] = {}
    queries, gold, docs = [], [], []
    train_docs: set[str] = set()
    n = 0
    for query, positive in pairs:
        n += 1
        if split == "heldout" and decide(positive) is None:
            train_docs.add(positive)
            continue
        if positive not in index:
            index[positive] = len(docs)
            docs.append(positive)
        queries.append(query)
        gold.append(index[positive])
    if n == 0:
        raise KititansError(f"{where}: no (query, positive) pair found")
    if split == "heldout" and (not docs or not train_docs):
        side = "training" if not docs else "held-out"
        raise KititansError(
            f"{where}: all {len(train_docs) or len(docs)} documents land in the {side} split (grouped by positive "
            "document): give pairs over more distinct documents, change --val-fraction, or pass --split all "
            "for a file kept apart from training"
        )
    rule = ("by positive document: hash(seed, positive) < val_fraction" if split == "heldout"
            else "every pair (a test file kept apart from training)")  # fmt: skip
    info = {"split_rule": rule, "seed": seed, "val_fraction": val_fraction if split == "heldout" else None,
            "pairs_read": n, "heldout_pairs": len(queries), "heldout_documents": len(docs),
            "training_documents": len(train_docs)}  # fmt: skip
    return EvalSet(queries, gold, docs, info)


def add_distractors(ev: EvalSet, texts: Iterable[str]) -> EvalSet:
    """Distractor documents join the candidates (a text equal to a held-out document is not added twice)."""
    have = set(ev.docs)
    extra = [t for t in texts if t.strip() and t not in have and not have.add(t)]  # type: ignore[func-returns-value]
    ev.docs += extra
    ev.info["distractors"] = len(extra)
    return ev


def passage_texts(codec: Any, passages: Passages) -> list[str]:
    return [codec.decode(r[1:]) for r in passages.rows]


def dense_scores(embed: Embed, codec: Any, queries: Sequence[str], passages: Passages, n_docs: int,
                 max_len: int) -> np.ndarray:  # fmt: skip
    pv = embed(passages.rows)
    owner = np.asarray(passages.owner)
    out = []
    for k in range(0, len(queries), QUERY_BATCH):
        rows = [[codec.bos_id, *codec.encode(q)][:max_len] for q in queries[k : k + QUERY_BATCH]]
        out.append(doc_scores(embed(rows) @ pv.T, owner, n_docs))
    return np.concatenate(out)


def lexical_scores(
    codec: Any, queries: Sequence[str], passages: Passages, n_docs: int, analyzer: str
) -> np.ndarray:
    lex = LexicalIndex.build([terms(t, analyzer, codec) for t in passage_texts(codec, passages)], analyzer)
    owner = np.asarray(passages.owner)
    out = [doc_scores(lex.scores(terms(q, analyzer, codec)), owner, n_docs) for q in queries]
    return np.stack(out)


def evaluate(
    ev: EvalSet, embed: Embed | None, codec: Any, settings: EvalSettings, max_len: int
) -> dict[str, Any]:
    """Every mode's R@1, R@5, MRR, nDCG@10 (and margin) on the same candidates; `embed=None`: lexical only."""
    if not ev.queries or not ev.docs:
        raise KititansError("nothing to evaluate: no held-out query or no candidate document")
    analyzer = detect_analyzer(ev.docs) if settings.analyzer == "auto" else settings.analyzer
    passages = split_documents(codec, ev.docs, settings.passage_tokens, settings.stride)
    gold = np.asarray(ev.gold)
    n = len(ev.docs)
    report: dict[str, Any] = {**ev.info, "candidates": n, "queries": len(ev.queries),
                              "passage_tokens": settings.passage_tokens, "stride": settings.stride,
                              **passages.summary(), "analyzer": analyzer,
                              "fusion": settings.fusion.to_json()}  # fmt: skip
    t0 = time.perf_counter()
    lex = lexical_scores(codec, ev.queries, passages, n, analyzer)
    report["lexical"] = {
        **scores_report(lex, gold, with_margin=False),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if embed is None or "dense" not in settings.modes:
        return report
    t0 = time.perf_counter()
    dense = dense_scores(embed, codec, ev.queries, passages, n, max_len)
    report["dense"] = {**scores_report(dense, gold), "seconds": round(time.perf_counter() - t0, 2)}
    report["hybrid"] = scores_report(settings.fusion(dense, lex), gold, with_margin=False)
    report["_scores"] = (dense, lex)  # for weight sweeps by the caller; dropped before writing
    return report


def lines(report: dict[str, Any]) -> list[str]:
    """The report as a few printable lines."""
    out = [
        f"split: {report['split_rule']}; {report['heldout_pairs']} held-out queries over {report['candidates']} "
        f"candidate documents ({report.get('distractors', 0)} distractors), {report['passages']} passages of "
        f"{report['passage_tokens']} tokens (stride {report['stride']}), {report['split_documents']} documents "
        f"split; truncation would have cut {100 * report['cut_share_without_passages']:.1f}% of their tokens",
    ]
    for mode in ("lexical", "dense", "hybrid"):
        m = report.get(mode)
        if m:
            extra = f"  margin {m['margin']:.3f}" if "margin" in m else ""
            name = f"lexical (BM25, {report['analyzer']})" if mode == "lexical" else mode
            out.append(f"  {name:<22} R@1 {m['r_at1']:.3f}  R@5 {m['r_at5']:.3f}  MRR {m['mrr']:.3f}  "
                       f"nDCG@10 {m['ndcg_at10']:.3f}{extra}")  # fmt: skip
    return out
