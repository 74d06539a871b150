"""KL divergence of scored continuations against the float reference.

The reference pass stores the log-prob row (vocab,) of every scored continuation position, keyed by the
tokens that condition it (a position's distribution depends only on its prefix, so the choices of one
question share their first row). Rows go to a float16 file as they come (clipped at ln p = -16, as
llama-perplexity stores its base log-probs), so memory does not grow with the number of items. Each other
artifact's rows are compared on the fly, once per distinct prefix:

    KLD_t = sum_i p_ref,i (ln p_ref,i - ln p_q,i)   over i with ln p_ref,i > -16     (KL(ref || q))
    same_top_t = argmax p_ref == argmax p_q
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

LOGP_FLOOR = -16.0


def prefix_keys(window: list[int], start: int, n: int) -> list[bytes]:
    """Keys of rows start..start+n-1 of `window`: a digest of the tokens up to and including each position."""
    ids = np.asarray(window[: start + n], dtype=np.int32)
    h = hashlib.blake2b(ids[: start + 1].tobytes(), digest_size=16)
    keys = [h.digest()]
    for j in range(1, n):
        h.update(ids[start + j : start + j + 1].tobytes())
        keys.append(h.digest())
    return keys


class ReferenceRows:
    """Write (reference pass) then read (every other pass) the reference's log-prob rows."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.index: dict[bytes, int] = {}
        self.vocab = 0
        self._file: Any = open(self.path, "wb")  # noqa: SIM115 (closed in finish)
        self._rows: np.ndarray | None = None

    def add(self, task: str, window: list[int], start: int, rows: np.ndarray) -> None:
        if self._file is None:
            raise RuntimeError("the reference rows are finished; no more can be added")
        self.vocab = rows.shape[1]
        for key, row in zip(prefix_keys(window, start, len(rows)), rows):
            if key not in self.index:
                self.index[key] = len(self.index)
                self._file.write(np.maximum(row, LOGP_FLOOR).astype(np.float16).tobytes())

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.index:
            self._rows = np.memmap(self.path, dtype=np.float16, mode="r", shape=(len(self.index), self.vocab))

    def row(self, key: bytes) -> np.ndarray | None:
        i = self.index.get(key)
        return None if i is None or self._rows is None else self._rows[i]


class KldMeter:
    """Per distinct scored position: KL(ref || this) and whether the top token agrees, per task."""

    def __init__(self, reference: ReferenceRows):
        self.ref = reference
        self.seen: set[bytes] = set()
        self.kld: dict[str, list[float]] = {}
        self.same: dict[str, list[bool]] = {}
        self.missing: dict[str, int] = {}  # positions the reference never scored (a different tokenization)

    def add(self, task: str, window: list[int], start: int, rows: np.ndarray) -> None:
        for key, row in zip(prefix_keys(window, start, len(rows)), rows):
            if key in self.seen:
                continue
            self.seen.add(key)
            ref = self.ref.row(key)
            if ref is None or ref.shape[0] != row.shape[0]:
                self.missing[task] = self.missing.get(task, 0) + 1
                continue
            b = ref.astype(np.float64)
            q = np.maximum(row.astype(np.float64), -1e30)
            self.kld.setdefault(task, []).append(
                float(np.where(b > LOGP_FLOOR, np.exp(b) * (b - q), 0.0).sum())
            )
            self.same.setdefault(task, []).append(bool(b.argmax() == q.argmax()))

    def summary(self, task: str | None = None) -> dict[str, Any]:
        """The statistics of one task, or of every task together."""
        names = [task] if task is not None else list(self.kld)
        k = np.asarray([x for t in names for x in self.kld.get(t, [])])
        same = [x for t in names for x in self.same.get(t, [])]
        missing = sum(self.missing.get(t, 0) for t in (names if task is not None else self.missing))
        n = len(k)
        if n == 0:
            return {"tokens": 0, "kld_mean": None, "kld_se": None, "same_top": None, "missing": missing}
        return {
            "tokens": n,
            "kld_mean": float(k.mean()),
            "kld_se": float(np.sqrt(k.var() / max(n - 1, 1))),
            "kld_p99": float(np.percentile(k, 99)),
            "kld_max": float(k.max()),
            "same_top": float(np.mean(same)),
            "missing": missing,
        }
