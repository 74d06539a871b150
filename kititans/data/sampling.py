"""Pass 1 of `kititans data`: a bounded, deterministic, uniform sample of the training documents, drawn
while streaming the corpus once, and the SentencePiece tokenizer trained on it (with a report on held-out
documents). Memory is the sample's budget, whatever the corpus size.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kititans.config import DataConfig
from kititans.data.shards import is_val
from kititans.data.tokenizer import Tokenizer, TokenizerReport, evaluate_tokenizer, train_tokenizer

log = logging.getLogger("kititans")
MB = 1_000_000
MAX_SAMPLE_DOC = 1 << 16  # a sampled document is cut to this many bytes, so no single one dominates
VAL_SAMPLE_BYTES = 4 * MB  # held-out text for the tokenizer report
TRAINER_WORD_CHARS = 5_000_000  # SentencePiece's memory grows with the characters of distinct words
HUB_READ_MB = 1000.0  # default read limit of pass 1 on a hub stream


def progress_bar(corpus: Any, desc: str, progress: bool) -> tqdm:
    """Bytes of input read (compressed bytes for compressed files), with ETA when the total is known."""
    total = corpus.raw_total or None
    return tqdm(
        total=total, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False, smoothing=0.1
    )


@contextlib.contextmanager
def elapsed_bar(desc: str, progress: bool) -> Iterator[None]:
    """A bar that shows the elapsed time of work with no progress callback (SentencePiece training, which
    releases the GIL, so a thread can refresh it)."""
    if not progress:
        yield
        return
    bar = tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", leave=False)
    done = threading.Event()

    def refresh() -> None:
        while not done.wait(0.5):
            bar.refresh()

    th = threading.Thread(target=refresh, daemon=True)
    th.start()
    try:
        yield
    finally:
        done.set()
        th.join()
        bar.close()


# ------------------------------------------------------------------------------------ pass 1: the sample
class TokenizerSample:
    """A uniform sample of distinct documents bounded in bytes: the documents whose seeded hashes are the
    smallest (a bottom-k sketch). The same corpus gives the same sample in any read order, and duplicates
    count once."""

    def __init__(self, budget_bytes: int, seed: int):
        self.budget, self.key = budget_bytes, seed.to_bytes(8, "little", signed=True)
        self.heap: list[tuple[int, str, int]] = []  # (-hash, doc, bytes): the largest hash on top
        self.keys: set[int] = set()
        self.bytes = 0

    def offer(self, doc: str, data: bytes) -> None:
        h = int.from_bytes(hashlib.blake2b(data, digest_size=8, key=self.key).digest(), "little")
        if (self.bytes >= self.budget and h >= -self.heap[0][0]) or h in self.keys:
            return
        if len(data) > MAX_SAMPLE_DOC:
            doc = data[:MAX_SAMPLE_DOC].decode("utf-8", errors="ignore")
            data = doc.encode("utf-8")
        heapq.heappush(self.heap, (-h, doc, len(data)))
        self.keys.add(h)
        self.bytes += len(data)
        while self.bytes - self.heap[0][2] >= self.budget and len(self.heap) > 1:
            neg, _, n = heapq.heappop(self.heap)
            self.keys.discard(-neg)
            self.bytes -= n

    def documents(self) -> list[str]:
        return [doc for _, doc, _ in sorted(self.heap, reverse=True)]  # smallest hash first


def fit_trainer(docs: list[str], max_word_chars: int = TRAINER_WORD_CHARS) -> list[str]:
    """The longest prefix of the sample whose distinct whitespace-delimited words hold at most
    max_word_chars characters. English reaches the byte budget first; Japanese or Chinese text, where a
    whole line is one "word", reaches this cap at about 15 MB (and SentencePiece ~0.7 GB)."""
    seen: set[str] = set()
    chars = 0
    for i, doc in enumerate(docs):
        for word in doc.split():
            if word not in seen:
                seen.add(word)
                chars += len(word)
        if chars > max_word_chars and i:
            return docs[:i]
    return docs


@dataclass
class Sample:
    train: list[str]
    val: list[str]
    info: dict[str, Any] = field(default_factory=dict)


def draw_sample(corpus: Any, cfg: DataConfig, progress: bool = True) -> Sample:
    budget = int(cfg.tokenizer_sample_mb * MB)
    read_limit = int((cfg.tokenizer_read_mb or (HUB_READ_MB if cfg.dataset else 0)) * MB)
    train, val = TokenizerSample(budget, cfg.seed), TokenizerSample(VAL_SAMPLE_BYTES, cfg.seed)
    t0, read, docs = time.perf_counter(), 0, 0
    with progress_bar(corpus, "read (tokenizer sample)", progress) as bar:
        for doc in corpus:
            data = doc.encode("utf-8")
            (val if is_val(doc, cfg.seed, cfg.val_fraction) else train).offer(doc, data)
            read, docs = read + len(data), docs + 1
            bar.update(corpus.raw_read - bar.n)
            if docs % 256 == 0:
                bar.set_postfix(docs=f"{docs:,}", sample=f"{train.bytes / MB:.0f}MB")
            if read_limit and read >= read_limit:
                break
    seconds = time.perf_counter() - t0
    picked = fit_trainer(train.documents()) or val.documents()
    held_out = val.documents() or picked[-1:]
    info = {
        "documents": len(picked),
        "bytes": sum(len(d.encode("utf-8")) for d in picked),
        "read_bytes": read,
        "read_documents": docs,
        "budget_bytes": budget,
        "read_limit_bytes": read_limit,
        "seconds": round(seconds, 3),
        "mb_per_s": round(read / MB / max(seconds, 1e-9), 2),
    }
    return Sample(picked, held_out, info)


def build_tokenizer(
    corpus: Any, cfg: DataConfig, vocab_size: int, out_dir: str | Path, progress: bool = True
) -> tuple[Tokenizer, TokenizerReport]:
    """Pass 1 + SentencePiece training on the sample; the report is on held-out documents."""
    sample = draw_sample(corpus, cfg, progress)
    log.info(
        "training a SentencePiece BPE tokenizer (vocab %d) on %.1f MB (%d documents) sampled from %.1f MB",
        vocab_size,
        sample.info["bytes"] / MB,
        sample.info["documents"],
        sample.info["read_bytes"] / MB,
    )
    t0 = time.perf_counter()
    desc = f"train tokenizer (vocab {vocab_size}, {sample.info['bytes'] / MB:.0f} MB)"
    with elapsed_bar(desc, progress):
        tok = train_tokenizer(sample.train, out_dir, vocab_size, character_coverage=cfg.character_coverage)
    seconds = time.perf_counter() - t0
    report = evaluate_tokenizer(tok, sample.val)
    report.sample = {
        **sample.info,
        "character_coverage": cfg.character_coverage,
        "train_seconds": round(seconds, 3),
        "train_mb_per_s": round(sample.info["bytes"] / MB / max(seconds, 1e-9), 2),
    }
    return tok, report
