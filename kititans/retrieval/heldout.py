"""The document-level report of a training run's held-out split (RUN/pairs/heldout*.jsonl): every held-out
query against every distinct held-out document, dense beside BM25 and their fusion. Called at the end of
encoder training (train/contrastive.py) with the model being trained; numpy + bm25s only here."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from kititans.retrieval.evaluate import Embed, EvalSet, EvalSettings, evaluate, lines
from kititans.retrieval.passages import check_passages


def document_report(
    pairs_dir: str | Path, embed: Embed, codec: Any, context: int, max_len: int
) -> dict[str, Any]:
    """Passages of max_len - 1 tokens (what training saw); {} when the held-out split has no document text."""
    from kititans.data.pairs import HELDOUT, read_heldout
    from kititans.files import read_json

    folder = Path(pairs_dir)
    if not (folder / HELDOUT).is_file():
        return {}
    if importlib.util.find_spec("bm25s") is None:  # training works without the extra; this report needs BM25
        return {"lines": ["document-level report skipped: pip install 'kititans[retrieval]' (bm25s)"]}
    queries, gold, docs = read_heldout(folder)
    if not queries:
        return {}
    manifest = read_json(folder / "pairs.json", "pairs manifest")
    info = {"split_rule": manifest.get("split_rule", "by positive document"), "seed": manifest.get("seed"),
            "val_fraction": manifest.get("val_fraction"), "heldout_pairs": len(queries),
            "heldout_documents": len(docs), "training_pairs": manifest.get("train")}  # fmt: skip
    pt, stride = check_passages(min(max_len, context) - 1, None, context)
    report = evaluate(EvalSet(queries, gold, docs, info), embed, codec, EvalSettings(pt, stride), max_len)
    report.pop("_scores", None)
    report["lines"] = lines(report)
    return report
