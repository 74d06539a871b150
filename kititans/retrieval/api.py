"""The /v1/search wire format, for `kititans serve` (kititans/serve/) to route to: a JSON body in, a JSON body
out, every user error a KititansError whose text the server returns with status 400.

    POST /v1/search  {"query": "reset password" | ["q1", "q2"], "top_k": 5, "mode": "hybrid", "fusion": "convex:0.1"}
    ("fusion" also as {"method": "rrf", "lexical_weight": 2}; "lexical_weight": 2 alone means rrf:2; default: the
    index's fusion)
    -> {"object": "list", "model": ..., "mode": ..., "data": [{"object": "search_result", "query_index": 0,
        "rank": 1, "score": 0.03, "document": 12, "source": "notes/a.txt", "text": "<best passage>",
        "split": false}, ...]}
"""

from __future__ import annotations

from typing import Any

from kititans.errors import KititansError
from kititans.retrieval.fusion import MODES, Fusion
from kititans.retrieval.search import Searcher

MAX_TOP_K = 100
MAX_QUERIES = 64


def search_request(searcher: Searcher, body: Any, model: str = "") -> dict[str, Any]:
    """Validate a /v1/search body and answer it."""
    if not isinstance(body, dict):
        raise KititansError("the body must be a JSON object with a 'query'")
    query = body.get("query")
    queries = [query] if isinstance(query, str) else query
    if (
        not isinstance(queries, list)
        or not queries
        or not all(isinstance(q, str) and q.strip() for q in queries)
    ):
        raise KititansError("'query' must be a non-empty string or a list of them")
    if len(queries) > MAX_QUERIES:
        raise KititansError(f"at most {MAX_QUERIES} queries per request, got {len(queries)}")
    top = body.get("top_k", 5)
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= MAX_TOP_K:
        raise KititansError(f"'top_k' must be an integer from 1 to {MAX_TOP_K}, got {top!r}")
    mode = body.get("mode", "hybrid")
    if mode not in MODES:
        raise KititansError(f"'mode' must be one of {', '.join(MODES)}, got {mode!r}")
    fusion = _fusion(body.get("fusion"), body.get("lexical_weight"))
    data = []
    for qi, q in enumerate(queries):
        for rank, hit in enumerate(searcher.search(q, mode, top, fusion), 1):
            data.append({"object": "search_result", "query_index": qi, "rank": rank, "score": hit.score,
                         "document": hit.doc, "source": hit.source, "text": hit.passage, "split": hit.split})  # fmt: skip
    return {"object": "list", "model": model, "mode": mode, "data": data}


def _fusion(spec: Any, weight: Any) -> Fusion | None:
    if weight is not None and (
        isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0
    ):
        raise KititansError(f"'lexical_weight' must be a number >= 0, got {weight!r}")
    if spec is None:
        return None if weight is None else Fusion("rrf", float(weight))
    if weight is not None:
        raise KititansError("give 'fusion' or 'lexical_weight', not both")
    if isinstance(spec, str):
        return Fusion.parse(spec)
    if isinstance(spec, dict):
        return Fusion.from_json(spec)
    raise KititansError(
        f'\'fusion\' must be like "convex:0.1" or {{"method": "rrf", "lexical_weight": 2}}, got {spec!r}'
    )
