"""Parallel, ordered tokenization: chunks of documents go to worker processes and come back in submission
order, with a bounded number in flight, so the output is byte-identical for any number of workers and memory
does not depend on how far the reader runs ahead of the encoders.

A worker turns a chunk into one flat array of [BOS] ids [EOS] per document and the per-document lengths. This
module imports only numpy and sentencepiece, so spawned workers start in a fraction of a second.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

_SP: Any = None  # the worker's SentencePieceProcessor
_SPECIAL: tuple[int, int, Any] = (0, 0, np.uint16)


@dataclass
class Encoded:
    tokens: np.ndarray  # flat [BOS] ids [EOS] ... in the shard dtype
    lengths: np.ndarray  # (documents,) int64, each with its BOS and EOS


def _init(model: bytes, bos: int, eos: int, dtype: str) -> None:
    global _SP, _SPECIAL
    import sentencepiece as spm

    _SP = spm.SentencePieceProcessor(model_proto=model)
    _SPECIAL = (bos, eos, np.dtype(dtype))


def _encode(docs: list[str]) -> Encoded:
    bos, eos, dtype = _SPECIAL
    flat: list[int] = []
    lengths: list[int] = []
    for ids in _SP.EncodeAsIds(docs, num_threads=1):
        flat.append(bos)
        flat += ids
        flat.append(eos)
        lengths.append(len(ids) + 2)
    return Encoded(np.asarray(flat, dtype=dtype), np.asarray(lengths, dtype=np.int64))


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class EncoderPool:
    """submit(chunk) -> results() in order. workers=1 encodes in this process (no pool)."""

    def __init__(self, model: bytes, bos: int, eos: int, dtype: str, workers: int):
        self.workers = max(1, workers)
        self.pending: deque[Any] = deque()
        self.limit = 2 * self.workers + 1  # chunks in flight: enough to keep every worker busy
        if self.workers == 1:
            _init(model, bos, eos, dtype)
            self.pool = None
        else:
            ctx = mp.get_context("spawn")  # the parent holds torch/OpenMP threads: never fork it
            self.pool = ctx.Pool(self.workers, initializer=_init, initargs=(model, bos, eos, dtype))

    def submit(self, docs: list[str], tag: Any) -> Iterator[tuple[Any, Encoded]]:
        """Queue a chunk; yields the finished chunks (in order) that must be taken to stay under the limit."""
        if self.pool is None:
            yield tag, _encode(docs)
            return
        self.pending.append((tag, self.pool.apply_async(_encode, (docs,))))
        while len(self.pending) >= self.limit:
            tag0, res = self.pending.popleft()
            yield tag0, res.get()

    def drain(self) -> Iterator[tuple[Any, Encoded]]:
        while self.pending:
            tag, res = self.pending.popleft()
            yield tag, res.get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
        self.pending.clear()

    def __enter__(self) -> EncoderPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
