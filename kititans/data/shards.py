"""The token store: each split is a list of numbered, size-capped shards of [BOS] ids [EOS] documents
(memmapped uint16/uint32), listed in manifest.json with per-shard token counts and checksums. Training reads a
split as one virtual concatenation of its shards, so windows are drawn exactly as from a single file, and
resuming is exact. Format 1 (one train.bin and one val.bin) still loads.

Only numpy here: `kititans data` never imports torch. The training-side reader is data/tokendata.py.
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kititans.errors import KititansError
from kititans.files import read_json, sha256_file

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
SHARD_BYTES = 1 << 30
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_val(doc: str, seed: int, val_fraction: float) -> bool:
    """The corpus slicer: a document's split depends only on its text and the seed, not on read order."""
    h = hashlib.blake2b(f"{seed}\x00{doc[:4096]}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def disk_full(e: OSError, path: Path) -> KititansError:
    return KititansError(
        f"no space left while writing {path} ({e.strerror}): free disk space (or choose another --out) and "
        "re-run; nothing was committed"
    )


@dataclass
class Shard:
    file: str
    tokens: int = 0
    documents: int = 0
    sha256: str = ""


@dataclass
class ShardWriter:
    """Writes one split into `<split>-NNNNN.bin` files of at most about `shard_bytes` (cut at document
    boundaries), checksumming as it goes. `files` lists what it created, for cleanup on failure."""

    out_dir: Path
    split: str
    dtype: np.dtype
    shard_bytes: int = SHARD_BYTES
    first_index: int = 0
    shards: list[Shard] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._f: Any = None
        self._sha: Any = None

    def _open(self) -> None:
        name = f"{self.split}-{self.first_index + len(self.shards):05d}.bin"
        path = self.out_dir / name
        self.files.append(path)
        self._f, self._sha = open(path, "wb"), hashlib.sha256()  # noqa: SIM115 - closed in _close
        self.shards.append(Shard(name))

    def _close(self) -> None:
        if self._f is None:
            return
        try:
            self._f.flush()
            os.fsync(self._f.fileno())  # the manifest commit must never point at unwritten data
        finally:
            self._f.close()
        self.shards[-1].sha256 = self._sha.hexdigest()
        self._f = None

    def write(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: tokens is their concatenation, lengths their sizes (BOS/EOS included)."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        cap = max(1, self.shard_bytes // self.dtype.itemsize)
        start = doc = 0
        while doc < len(lengths):
            if self._f is None:
                self._open()
            cur = self.shards[-1]
            ends = np.cumsum(lengths[doc:]) + start
            room = cap - cur.tokens
            take = int(np.searchsorted(ends - start, room, side="left")) + 1  # docs until the cap is reached
            take = min(take, len(lengths) - doc)
            end = int(ends[take - 1])
            block = tokens[start:end]
            path = self.files[-1]
            try:
                self._f.write(block.tobytes())
            except OSError as e:
                if e.errno in FULL_DISK:
                    raise disk_full(e, path) from None
                raise
            self._sha.update(block.tobytes())
            cur.tokens += end - start
            cur.documents += take
            start, doc = end, doc + take
            if cur.tokens >= cap:
                self._close()

    def close(self) -> list[Shard]:
        self._close()
        if self.shards and self.shards[-1].tokens == 0:  # never opened a file for nothing, but be safe
            self.shards.pop()
        return self.shards

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards)


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """manifest.json in the current layout (format 1 is converted in memory: one shard per split)."""
    data_dir = Path(data_dir)
    raw = read_json(data_dir / MANIFEST, "shard manifest")
    version = raw.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise KititansError(f"{data_dir}: shards were written by a newer kititans; upgrade kititans")
    if version < 2:
        raw = dict(raw)
        raw["splits"] = {
            split: {
                "tokens": raw[f"{split}_tokens"],
                "documents": raw[f"{split}_documents"],
                "shards": [
                    {
                        "file": raw["files"][split],
                        "tokens": raw[f"{split}_tokens"],
                        "documents": raw[f"{split}_documents"],
                    }
                ],
            }
            for split in SPLITS
        }
        raw.setdefault("segments", [])
    return raw


def is_shards_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def verify_shards(data_dir: str | Path, checksums: bool = False) -> None:
    """Every listed shard exists with the right size (and, with checksums, the right sha256)."""
    data_dir = Path(data_dir)
    m = load_manifest(data_dir)
    itemsize = np.dtype(m["dtype"]).itemsize
    for split in SPLITS:
        for s in m["splits"][split]["shards"]:
            path = data_dir / s["file"]
            if not path.is_file():
                raise KititansError(f"{data_dir}: missing shard {s['file']} (re-run `kititans data`)")
            if path.stat().st_size != s["tokens"] * itemsize:
                raise KititansError(
                    f"{path}: {path.stat().st_size} bytes, the manifest says {s['tokens'] * itemsize}: "
                    "the shard is damaged; re-run `kititans data`"
                )
            if checksums and s.get("sha256") and sha256_file(path) != s["sha256"]:
                raise KititansError(
                    f"{path}: checksum mismatch; the shard is damaged; re-run `kititans data`"
                )


class TokenStream:
    """One split: its shards' memmaps seen as one array (len, slices, np.asarray)."""

    def __init__(self, arrays: list[np.ndarray]):
        self.arrays = [a for a in arrays if len(a)]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        self.dtype = self.arrays[0].dtype if self.arrays else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenStream supports contiguous slices only")
        start, stop, _ = key.indices(len(self))
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        lo = start - int(self.offsets[i])
        if stop <= self.offsets[i + 1]:  # the common case: one shard
            return self.arrays[i][lo : lo + stop - start]
        parts, pos = [], start
        while pos < stop:
            i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            lo = pos - int(self.offsets[i])
            hi = min(stop - int(self.offsets[i]), len(self.arrays[i]))
            parts.append(self.arrays[i][lo:hi])
            pos += hi - lo
        return np.concatenate(parts)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[0 : len(self)] if len(self) else np.zeros(0, dtype=self.dtype)
        return np.asarray(out, dtype=dtype) if dtype is not None else np.asarray(out)


def open_split(data_dir: Path, manifest: dict[str, Any], split: str) -> TokenStream:
    arrays = []
    for s in manifest["splits"][split]["shards"]:
        path = data_dir / s["file"]
        if not path.is_file():
            raise KititansError(f"{data_dir}: missing {s['file']} (re-run `kititans data`)")
        if s["tokens"]:
            arrays.append(np.memmap(path, dtype=manifest["dtype"], mode="r", shape=(s["tokens"],)))
    return TokenStream(arrays)
