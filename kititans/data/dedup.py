"""Exact document deduplication by a 64-bit content hash, in a compact open-addressing set.

8 bytes per table slot at a load factor of at most 1/2, so 16-32 bytes per unique document (20 million
documents, about 40 GB of 2 KB web documents, take 320-640 MB). That is the one structure of `kititans data`
that grows with the corpus; `--no-dedup` turns it off.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

EMPTY = np.uint64(0)


def doc_hash(data: bytes) -> int:
    """A document's 64-bit identity (never 0, which marks an empty slot)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") or 1


class HashSet:
    """A set of non-zero uint64 hashes: linear probing in a power-of-two numpy table."""

    def __init__(self, capacity: int = 1 << 16):
        size = 1 << max(4, (max(capacity, 1) * 2 - 1).bit_length())
        self.table = np.zeros(size, dtype=np.uint64)
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, h: int) -> bool:
        """Insert h; False if it was already present."""
        if (self.count + 1) * 2 > len(self.table):
            self._grow()
        table, mask = self.table, len(self.table) - 1
        i = h & mask
        while True:
            v = int(table[i])
            if v == 0:
                table[i] = h
                self.count += 1
                return True
            if v == h:
                return False
            i = (i + 1) & mask

    def _grow(self) -> None:
        old = self.table[self.table != EMPTY]
        self.table = np.zeros(len(self.table) * 2, dtype=np.uint64)
        self.count = 0
        for h in old.tolist():
            self.add(h)

    def values(self) -> np.ndarray:
        return np.sort(self.table[self.table != EMPTY])

    def save(self, path: Path) -> None:
        """Sorted raw little-endian uint64 values (no pickle)."""
        self.values().astype("<u8").tofile(path)

    @classmethod
    def load(cls, path: Path) -> HashSet:
        values = np.fromfile(path, dtype="<u8")
        s = cls(len(values) + 1)
        for h in values.tolist():
            s.add(h)
        return s
