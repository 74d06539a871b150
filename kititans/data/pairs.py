"""Training pairs for sentence encoders, from what people have, streamed into a memmapped pair store.

Sources (per JSON record or text document; files, folders and globs as everywhere, compressed or not):
  {"query": ..., "positive": ...[, "negative": ...]}   a labelled pair (with an optional hard negative)
  chat records ({"messages"}, alpaca, sharegpt)         each user turn and the assistant answer after it
  {"text"} records, text files, the built-in corpus     unsupervised: two disjoint token spans of the same
                                                        document (independent cropping, as Contriever)
The held-out split is grouped by positive document: a pair goes to it by a hash of its positive (of the
document, for span pairs), so no held-out positive is ever a training positive and held-out queries are
about documents training never showed. Each text becomes [BOS] ids; a positive (or negative) longer than
max_len is not cut at its start but replaced by its passage (overlapping window) sharing the most tokens with
the query, and the share of positive tokens that truncation would have dropped is recorded.

RUN/pairs/  pairs.json (manifest), {train,val}.{query,positive[,negative]}.{bin,idx}: tokens and offsets;
            heldout.jsonl ({"query", "doc"}: index into heldout_docs.jsonl, {"text"}): the held-out queries
            and every distinct held-out document in full, for document-level retrieval (kititans.retrieval).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kititans.data.chatdata import detect_format, record_messages
from kititans.data.readers import BuiltinCorpus, expand_sources
from kititans.data.shards import is_val, token_dtype
from kititans.data.streams import formats as file_formats
from kititans.data.streams import json_records, open_stream, parquet_values, text_documents
from kititans.data.tokenizer import Tokenizer
from kititans.data.windows import best_window, default_stride
from kititans.errors import KititansError
from kititans.files import atomic_path, read_json, write_json

COLUMNS = ("query", "positive", "negative")
MANIFEST = "pairs.json"
HELDOUT, HELDOUT_DOCS = "heldout.jsonl", "heldout_docs.jsonl"
SPLIT_RULE = "by positive document: hash(seed, positive text) < val_fraction; no held-out positive is a training positive"
MIN_SPAN = 8  # tokens of an unsupervised span at the least


@dataclass
class Item:
    kind: str  # "pair" (query, positive[, negative]) or "doc" (unsupervised spans come from it)
    texts: tuple[str, ...]
    where: str


def _record_items(rec: Any, where: str) -> Iterator[Item]:
    if isinstance(rec, dict) and ("query" in rec or "positive" in rec):
        q, p, n = rec.get("query"), rec.get("positive"), rec.get("negative")
        if not isinstance(q, str) or not isinstance(p, str) or not q.strip() or not p.strip():
            keys = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
            raise KititansError(
                f"{where}: a pair needs text fields 'query' and 'positive' (this record has {keys})"
            )
        if n is not None and not isinstance(n, str):
            raise KititansError(f"{where}: 'negative' must be a string")
        yield Item("pair", (q, p, n) if n else (q, p), where)
        return
    fmt = detect_format(rec)
    if fmt is not None and fmt != "guanaco":
        msgs = record_messages(rec, fmt, where)
        for a, b in itertools.pairwise(msgs):
            if a["role"] == "user" and b["role"] == "assistant":
                yield Item("pair", (a["content"], b["content"]), where)
        return
    if isinstance(rec, dict) and isinstance(rec.get("text"), str):
        if rec["text"].strip():
            yield Item("doc", (rec["text"],), where)
        return
    keys = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
    raise KititansError(
        f"{where}: not a pair ('query'/'positive'), a chat record or a 'text' document (keys: {keys})"
    )


def read_items(sources: list[str], builtin_bytes: int = 2_000_000, seed: int = 0) -> Iterator[Item]:
    """Every pair or document of the sources (the built-in corpus when there are none), in order."""
    if not sources:
        for i, doc in enumerate(BuiltinCorpus(seed=seed, target_bytes=builtin_bytes)):
            yield Item("doc", (doc,), f"builtin:{i}")
        return
    for path in expand_sources(sources):
        inner, _ = file_formats(path)
        if inner == ".parquet":
            for value, where, _frac in parquet_values(path, "text"):
                yield from _record_items(value if isinstance(value, dict) else {"text": value}, where)
            continue
        stream, _ = open_stream(path)
        with stream:
            if inner in (".jsonl", ".json"):
                for rec, where in json_records(stream, path):
                    yield from _record_items(rec, where)
            else:
                for i, doc in enumerate(text_documents(stream)):
                    yield Item("doc", (doc,), f"{path}: document {i}")


def spans(ids: list[int], key: str, max_len: int) -> tuple[list[int], list[int]] | None:
    """Two disjoint spans of a document's tokens, chosen from a hash of the document (deterministic).

    The two lengths are drawn independently (as Contriever's crops are): with one shared length, every positive
    pair matches in length while in-batch negatives mostly do not, and the encoder learns to embed length; that
    shortcut scored at chance on question -> paragraph retrieval, where the two sides never match in length."""
    n = len(ids)
    if n < 2 * MIN_SPAN:
        return None
    rng = random.Random(hashlib.blake2b(key.encode(), digest_size=8).digest())
    hi = min(max_len, n - MIN_SPAN)
    first_len = rng.randint(MIN_SPAN, hi)
    second_len = rng.randint(MIN_SPAN, min(max_len, n - first_len))
    a = rng.randint(0, n - first_len - second_len)
    b = rng.randint(a + first_len, n - second_len)
    first, second = ids[a : a + first_len], ids[b : b + second_len]
    return (first, second) if rng.random() < 0.5 else (second, first)


class _Column:
    def __init__(self, out: Path, name: str, dtype: np.dtype):
        self.tok_path, self.idx_path = out / f"{name}.bin", out / f"{name}.idx"
        self.f = open(self.tok_path, "wb")  # noqa: SIM115 - closed in close()
        self.offsets = [0]
        self.dtype = dtype

    def add(self, ids: list[int]) -> None:
        np.asarray(ids, dtype=self.dtype).tofile(self.f)
        self.offsets.append(self.offsets[-1] + len(ids))

    def close(self) -> None:
        self.f.close()
        np.asarray(self.offsets, dtype="<i8").tofile(self.idx_path)


def document_key(item: Item) -> str:
    """What the held-out split groups by: the positive document (the document itself for span pairs)."""
    return item.texts[0] if item.kind == "doc" else item.texts[1]


class DocumentSplit:
    """The split decision per positive document, remembered, so every pair of a document lands in the same
    split even after the held-out cap is reached (the cap then sends new documents to training, whole)."""

    def __init__(self, seed: int, val_fraction: float, max_val: int):
        self.seed, self.fraction, self.max_val = seed, val_fraction, max_val
        self.val: dict[bytes, int] = {}  # document hash -> held-out document index
        self.capped: set[bytes] = set()
        self.val_pairs = 0

    def __call__(self, key: str) -> int | None:
        """The held-out document index of this pair's document, or None for training."""
        h = hashlib.blake2b(key.encode(), digest_size=16).digest()
        if h in self.val:
            self.val_pairs += 1
            return self.val[h]
        if h in self.capped or not is_val(key, self.seed, self.fraction):
            return None
        if self.val_pairs >= self.max_val:
            self.capped.add(h)
            return None
        self.val[h] = len(self.val)
        self.val_pairs += 1
        return self.val[h]


def _row(tok: Tokenizer, item: Item, body: int, stride: int, counts: dict[str, int]) -> list[list[int]]:
    q = tok.encode(item.texts[0])[:body]
    row = [q]
    for t in item.texts[1:]:
        ids = tok.encode(t)
        if len(row) == 1:  # the positive: what truncation would have cut
            counts["positive_tokens"] += len(ids)
            counts["positive_tokens_cut"] += max(0, len(ids) - body)
            counts["split_positives"] += len(ids) > body
        row.append(best_window(ids, q, body, stride))
    return [[tok.bos_id, *r] for r in row]


def build_pairs(
    sources: list[str],
    tok: Tokenizer,
    out_dir: str | Path,
    *,
    max_len: int,
    val_fraction: float,
    seed: int = 0,
    builtin_bytes: int = 2_000_000,
    max_val: int = 2000,
) -> dict[str, Any]:
    """Tokenize every pair into out_dir (one pass, constant memory); pairs.json is written last."""
    dtype = token_dtype(tok.vocab_size)
    with atomic_path(Path(out_dir)) as tmp:
        tmp.mkdir()
        cols = {(s, c): _Column(tmp, f"{s}.{c}", dtype) for s in ("train", "val") for c in COLUMNS}
        counts = {"train": 0, "val": 0, "labelled": 0, "spans": 0, "negatives": 0, "skipped_short": 0,
                  "positive_tokens": 0, "positive_tokens_cut": 0, "split_positives": 0}  # fmt: skip
        body = max_len - 1  # room for BOS
        split = DocumentSplit(seed, val_fraction, max_val)
        with (
            open(tmp / HELDOUT, "w", encoding="utf-8") as held,
            open(tmp / HELDOUT_DOCS, "w", encoding="utf-8") as docs,
        ):
            for item in read_items(sources, builtin_bytes, seed):
                if item.kind == "doc":
                    ids = tok.encode(item.texts[0])
                    got = spans(
                        ids, f"{seed}\x00{item.where}\x00{item.texts[0][:4096]}", body
                    )  # a repeat: new crops
                    if got is None:
                        counts["skipped_short"] += 1
                        continue
                    row = [[tok.bos_id, *got[0]], [tok.bos_id, *got[1]]]
                    counts["spans"] += 1
                    query = tok.decode(got[0])
                else:
                    row = _row(tok, item, body, default_stride(body), counts)
                    counts["labelled"] += 1
                    counts["negatives"] += len(row) == 3
                    query = item.texts[0]
                n_docs = len(split.val)
                doc = split(document_key(item))
                name = "train" if doc is None else "val"
                if doc is not None:
                    if doc == n_docs:  # a new held-out document: keep it whole for document-level retrieval
                        docs.write(json.dumps({"text": document_key(item)}, ensure_ascii=False) + "\n")
                    held.write(json.dumps({"query": query, "doc": doc}, ensure_ascii=False) + "\n")
                for c, ids in zip(COLUMNS, [*row, []][:3]):
                    cols[(name, c)].add(ids)
                counts[name] += 1
        for col in cols.values():
            col.close()
        if counts["train"] < 2 or counts["val"] < 1:
            raise KititansError(
                f"too few pairs in a split ({counts['train']} train, {counts['val']} held out, grouped by "
                f"positive document, {len(split.val)} held-out documents): give pairs over more distinct "
                "documents or change contrastive.val_fraction (documents need at least 16 tokens for spans)"
            )
        manifest = {
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "max_len": max_len,
            "val_fraction": val_fraction,
            "seed": seed,
            "split_rule": SPLIT_RULE,
            "heldout_documents": len(split.val),
            "cut_share_without_passages": round(
                counts["positive_tokens_cut"] / max(counts["positive_tokens"], 1), 4
            ),
            "sources": sources or [f"builtin:{builtin_bytes}B"],
            **counts,
            "has_negatives": counts["negatives"] == counts["labelled"] > 0 and counts["spans"] == 0,
        }
        write_json(tmp / MANIFEST, manifest)
    return manifest


def read_heldout(folder: str | Path) -> tuple[list[str], list[int], list[str]]:
    """(queries, their document index, documents) of a pair store's held-out split."""
    folder = Path(folder)
    if not (folder / HELDOUT).is_file():
        raise KititansError(f"{folder} has no {HELDOUT}: it was built before document-level evaluation; "
                            "delete the pairs folder and train again")  # fmt: skip
    queries, gold, docs = [], [], []
    with open(folder / HELDOUT, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            queries.append(rec["query"])
            gold.append(int(rec["doc"]))
    with open(folder / HELDOUT_DOCS, encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    return queries, gold, docs


class PairStore:
    """Memmapped pairs of one split: rows(idx) -> lists of token ids per column."""

    def __init__(self, folder: str | Path, split: str):
        self.dir = Path(folder)
        self.manifest = read_json(self.dir / MANIFEST, "pairs manifest")
        self.columns = list(COLUMNS[:3] if self.manifest["has_negatives"] else COLUMNS[:2])
        self.data = {}
        for c in self.columns:
            idx = np.fromfile(self.dir / f"{split}.{c}.idx", dtype="<i8")
            n = int(idx[-1])
            toks = (np.memmap(self.dir / f"{split}.{c}.bin", dtype=self.manifest["dtype"], mode="r", shape=(n,))
                    if n else np.zeros(0, dtype=self.manifest["dtype"]))  # fmt: skip
            self.data[c] = (toks, idx)
        self.size = len(self.data["query"][1]) - 1

    def __len__(self) -> int:
        return self.size

    def get(self, column: str, i: int) -> np.ndarray:
        toks, idx = self.data[column]
        return toks[idx[i] : idx[i + 1]]
