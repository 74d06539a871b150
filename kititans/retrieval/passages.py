"""Passages instead of truncation: a document's tokens in overlapping windows of `passage_tokens` that start
every `stride` tokens, each encoded as [BOS] + window; a document scores as its best passage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kititans.data.windows import DEFAULT_OVERLAP, best_window, default_stride, windows
from kititans.errors import KititansError

# the token windows themselves are data/windows.py (the pair builder picks a positive's window with them)
__all__ = [
    "DEFAULT_OVERLAP",
    "DEFAULT_PASSAGE_TOKENS",
    "Passages",
    "best_window",
    "check_passages",
    "default_stride",
    "split_documents",
    "split_ids",
    "windows",
]

DEFAULT_PASSAGE_TOKENS = 127  # + BOS = 128, the encoder presets' train.seq_len


def check_passages(passage_tokens: int, stride: int | None, context: int) -> tuple[int, int]:
    """(passage_tokens, stride) after checking them against the encoder's context (which holds BOS too)."""
    if passage_tokens < 1:
        raise KititansError(f"--passage-tokens must be >= 1, got {passage_tokens}")
    if context and passage_tokens + 1 > context:
        raise KititansError(
            f"--passage-tokens {passage_tokens} does not fit the encoder's context of {context} tokens "
            f"(with BOS): use at most {context - 1}"
        )
    stride = default_stride(passage_tokens) if stride is None else stride
    if not 1 <= stride <= passage_tokens:
        raise KititansError(f"--stride must be in 1..{passage_tokens} (--passage-tokens), got {stride}")
    return passage_tokens, stride


@dataclass
class Passages:
    rows: list[list[int]] = field(default_factory=list)  # [BOS] + window ids, one per passage
    owner: list[int] = field(default_factory=list)  # the document each passage comes from
    spans: list[tuple[int, int]] = field(default_factory=list)  # its token window in that document
    tokens: int = 0  # tokens of all documents
    cut_tokens: int = 0  # tokens past the first window: what truncation to passage_tokens would drop
    split_docs: int = 0  # documents longer than one passage

    @property
    def cut_share(self) -> float:
        return self.cut_tokens / self.tokens if self.tokens else 0.0

    def summary(self) -> dict[str, Any]:
        return {"passages": len(self.rows), "split_documents": self.split_docs,
                "cut_share_without_passages": round(self.cut_share, 4)}  # fmt: skip


def split_ids(
    docs_ids: Sequence[Sequence[int]], bos_id: int, passage_tokens: int, stride: int, first_doc: int = 0
) -> Passages:
    out = Passages()
    for d, ids in enumerate(docs_ids):
        ws = windows(len(ids), passage_tokens, stride)
        out.tokens += len(ids)
        out.cut_tokens += max(0, len(ids) - passage_tokens)
        out.split_docs += len(ws) > 1
        for s, e in ws:
            out.rows.append([bos_id, *ids[s:e]])
            out.owner.append(first_doc + d)
            out.spans.append((s, e))
    return out


def split_documents(codec: Any, texts: Sequence[str], passage_tokens: int, stride: int) -> Passages:
    """Every text as overlapping [BOS] + window rows (texts tokenized once)."""
    return split_ids([codec.encode(t) for t in texts], codec.bos_id, passage_tokens, stride)
