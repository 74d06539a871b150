"""`kititans bench` on an encoder (a family whose task is "embed"): the same pair selection, exports, worker
processes and report files as a language model's bench; what each worker measures differs:

- speed: embeddings/s at batch 1 (one text per call) and batch 32 (one padded call), on held-out texts;
- memory: the worker's peak RSS, as for language models;
- quality on the run's held-out pairs (RUN/pairs, split val): each vector's cosine similarity to torch fp32's
  (the drift a quantization causes), and retrieval@1 / MRR / mean margin of the pair's own vectors.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from kititans.bench.speed import summarize
from kititans.embedding import embed_rows, retrieval_scores
from kititans.errors import KititansError

BATCHES = (1, 32)
MAX_PAIRS = 512


def eval_setup(run: Path, reference: tuple[str, str], max_pairs: int = MAX_PAIRS) -> tuple[dict, dict]:
    """The report's "eval" entry and the token rows: held-out queries and their candidates (positives, then
    hard negatives when the pairs have them)."""
    from kititans.data.pairs import PairStore

    folder = Path(run) / "pairs"
    if not (folder / "pairs.json").is_file():
        raise KititansError(
            f"{run} has no pairs/ folder (the encoder's held-out pairs): bench it with --no-quality"
        )
    store = PairStore(folder, "val")
    n = min(len(store), max_pairs)
    if n < 2:
        raise KititansError(f"{folder} holds {n} held-out pair(s): retrieval needs at least 2")
    queries = [store.get("query", i).tolist() for i in range(n)]
    cands: list[list[int]] = []
    index: dict[tuple[int, ...], int] = {}  # held-out pairs share documents (the split groups by document)
    gold = [index.setdefault(tuple(store.get("positive", i).tolist()), len(index)) for i in range(n)]
    cands = [list(k) for k in index]
    if "negative" in store.columns:
        cands += [store.get("negative", i).tolist() for i in range(n)]
    evald = {
        "task": "embed",
        "source": {"kind": "held-out pairs", "path": str(folder)},
        "pairs": n,
        "candidates": len(cands),
        "reference": {"runtime": reference[0], "quant": reference[1]},
        "definitions": "each query against every distinct held-out positive (and negative); cosine = each vector "
        "against the reference's",
    }
    return evald, {"queries": queries, "candidates": cands, "gold": gold}


def save_rows(path: Path, rows: dict[str, list[list[int]]]) -> None:
    path.write_text(json.dumps(rows))


def measure_speed(rt: Any, data_path: str, trials: int, warmup: int) -> dict[str, Any]:
    """Embeddings/s: batch 1 = the first 32 texts one call each; batch 32 = those texts in one call."""
    rows = json.loads(Path(data_path).read_text())["queries"]
    texts = (rows * (1 + BATCHES[-1] // max(len(rows), 1)))[: BATCHES[-1]]
    out: dict[str, Any] = {"tokens_per_text": float(np.mean([len(r) for r in texts])), "batch": {}}
    for b in BATCHES:
        groups = [texts[k : k + b] for k in range(0, len(texts), b)]
        samples = []
        for t in range(warmup + trials):
            t0 = time.perf_counter()
            for g in groups:
                rt.embed_batch(g)
            if t >= warmup:
                samples.append(len(texts) / (time.perf_counter() - t0))
        out["batch"][str(b)] = summarize(samples)
    return out


def measure_quality(rt: Any, q: dict[str, Any]) -> dict[str, Any]:
    """Retrieval on the held-out pairs; the reference job writes its vectors, the others compare with them."""
    data = json.loads(Path(q["data"]).read_text())
    qv = embed_rows(rt, data["queries"])
    cv = embed_rows(rt, data["candidates"])
    gold = data.get("gold", list(range(len(qv))))
    scores = retrieval_scores(qv, cv) if gold == list(range(len(qv))) else _gold_scores(qv, cv, gold)
    reference = Path(q["reference"])
    if q.get("make_reference"):
        with open(reference, "wb") as f:
            np.savez(f, queries=qv, candidates=cv)
        return {**scores, "cosine_mean": 1.0, "cosine_min": 1.0}
    ref = np.load(reference)
    cos = np.concatenate([(qv * ref["queries"]).sum(1), (cv * ref["candidates"]).sum(1)])
    return {**scores, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}


def _gold_scores(qv: np.ndarray, cv: np.ndarray, gold: list[int]) -> dict[str, Any]:
    """retrieval_scores' keys when query i's positive is candidate gold[i]."""
    from kititans.retrieval.metrics import scores_report

    m = scores_report(qv.astype(np.float64) @ cv.astype(np.float64).T, np.asarray(gold))
    return {"retrieval_at1": m["r_at1"], "recall_at5": m["r_at5"], "mrr": m["mrr"], "mean_margin": m["margin"],
            "pairs": len(qv), "candidates": len(cv)}  # fmt: skip


# ------------------------------------------------------------------------------------------ the report


def headers(report: dict[str, Any]) -> list[str]:
    return [
        "runtime",
        "quant",
        "size MiB",
        "bits/w",
        *(f"emb/s b{b}" for b in BATCHES),
        "peak RSS MiB",
        "model MiB",
        "cosine mean",
        "cosine min",
        "R@1",
        "MRR",
        "margin",
    ]


def result_cells(report: dict[str, Any], r: dict[str, Any], fmt: Any) -> list[str]:
    mib = 2**20
    mem, q = r.get("memory", {}), r.get("quality") or {}
    batch = (r.get("speed") or {}).get("batch", {})
    cells = [r["runtime"], r["quant"]]
    cells.append(fmt(r["size_bytes"] / mib) if r.get("size_bytes") else "–")
    cells.append(fmt(r.get("bits_per_weight")))
    cells += [fmt((batch.get(str(b)) or {}).get("median")) for b in BATCHES]
    cells.append(fmt(mem["peak_rss_bytes"] / mib) if mem.get("peak_rss_bytes") else "–")
    cells.append(fmt(mem["model_rss_bytes"] / mib) if mem.get("model_rss_bytes") is not None else "–")
    cells += [f"{q[k]:.5f}" if q.get(k) is not None else "–" for k in ("cosine_mean", "cosine_min")]
    cells += [fmt(q.get(k)) for k in ("retrieval_at1", "mrr", "mean_margin")]
    return cells


def notes(report: dict[str, Any]) -> list[str]:
    s, ev = report["settings"], report.get("eval")
    out = [
        f"embeddings/s: medians of {s['trials']} trials after {s['warmup']} warm-up over the same 32 held-out "
        f"texts, one per call (b1) or all in one padded call (b32); {s['threads']} threads.",
        "peak RSS: the worker process's high-water mark; model MiB: peak minus the size before loading.",
    ]
    if ev:
        ref = ev["reference"]
        out.append(
            f"Quality on {ev['pairs']} held-out pairs ({ev['candidates']} candidates, {ev['source']['path']}): "
            f"cosine of every vector to {ref['runtime']} {ref['quant']}'s; R@1, MRR and margin (positive "
            "similarity minus the best other candidate's) of the pair's own vectors."
        )
        if ref.get("status") == "failed":
            out.append(f"The reference failed ({ref.get('reason')}): no cosine numbers.")
    return out
