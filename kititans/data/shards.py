"""Token shards: documents -> deterministic train/val split -> [BOS] ids [EOS] concatenated into memmapped
uint16/uint32 files with a manifest. Training samples windows from them by step, so resuming is exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kititans.data.tokenizer import Tokenizer
from kititans.errors import KititansError
from kititans.files import atomic_path, read_json, sha256_file, write_json

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def is_val(doc: str, seed: int, val_fraction: float) -> bool:
    """The corpus slicer: a document's split depends only on its text and the seed, not on read order."""
    h = hashlib.blake2b(f"{seed}\x00{doc[:4096]}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


@dataclass
class Manifest:
    dtype: str
    vocab_size: int
    tokenizer_sha256: str
    train_tokens: int
    val_tokens: int
    train_documents: int
    val_documents: int
    sources: list[str]
    val_fraction: float
    seed: int
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "files": {"train": "train.bin", "val": "val.bin"}}


def prepare_shards(
    docs: Iterable[str],
    tok: Tokenizer,
    out_dir: str | Path,
    *,
    sources: list[str],
    val_fraction: float = 0.02,
    seed: int = 0,
    progress: Any = None,
) -> Manifest:
    """Tokenize documents into out_dir/{train,val}.bin + manifest.json (+ a copy of the tokenizer)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    counts = {"train": [0, 0], "val": [0, 0]}  # tokens, documents
    batches: dict[str, list[str]] = {"train": [], "val": []}
    held: str | None = None  # the latest train document, moved to val if nothing else lands there
    with (
        atomic_path(out_dir / "train.bin") as tr_path,
        atomic_path(out_dir / "val.bin") as va_path,
        open(tr_path, "wb") as ftr,
        open(va_path, "wb") as fva,
    ):

        def flush(split: str, force: bool = False) -> None:
            batch = batches[split]
            if not batch or (len(batch) < 256 and not force):
                return
            for ids in tok.sp.EncodeAsIds(batch):
                np.asarray([tok.bos_id, *ids, tok.eos_id], dtype=dtype).tofile(fva if split == "val" else ftr)
                counts[split][0] += len(ids) + 2
                counts[split][1] += 1
            batch.clear()

        for doc in docs:
            if is_val(doc, seed, val_fraction):
                batches["val"].append(doc)
                flush("val")
            else:
                if held is not None:
                    batches["train"].append(held)
                    flush("train")
                held = doc
            if progress is not None:
                progress.update(len(doc.encode("utf-8")))
        if held is not None:  # guarantee a non-empty validation split
            batches["val" if counts["val"][1] + len(batches["val"]) == 0 else "train"].append(held)
        flush("train", force=True)
        flush("val", force=True)
    if counts["train"][1] == 0:
        raise KititansError("the corpus is too small to split: it needs at least 2 documents")
    tok.save(out_dir)
    m = Manifest(
        dtype=np.dtype(dtype).name,
        vocab_size=tok.vocab_size,
        tokenizer_sha256=sha256_file(out_dir / "tokenizer.model"),
        train_tokens=counts["train"][0],
        val_tokens=counts["val"][0],
        train_documents=counts["train"][1],
        val_documents=counts["val"][1],
        sources=sources,
        val_fraction=val_fraction,
        seed=seed,
    )
    write_json(out_dir / MANIFEST, m.to_dict())
    return m


def is_shards_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


class TokenData:
    """Memmapped train/val tokens with deterministic batch sampling."""

    def __init__(self, shards_dir: str | Path):
        self.dir = Path(shards_dir)
        raw = read_json(self.dir / MANIFEST, "shard manifest")
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise KititansError(f"{self.dir}: shards were written by a newer kititans; upgrade kititans")
        self.manifest = raw
        self.splits: dict[str, np.ndarray] = {}
        for split, name in raw["files"].items():
            path = self.dir / name
            if not path.is_file():
                raise KititansError(f"{self.dir}: missing {name} (re-run `kititans data`)")
            n = raw[f"{split}_tokens"]
            self.splits[split] = (
                np.memmap(path, dtype=raw["dtype"], mode="r", shape=(n,)) if n else np.zeros(0, np.uint16)
            )

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.dir)

    def check_tokenizer(self, tok: Tokenizer) -> None:
        if self.manifest["vocab_size"] != tok.vocab_size or self.manifest["tokenizer_sha256"] != sha256_file(
            tok.model_path
        ):
            raise KititansError(
                f"{self.dir}: these shards were tokenized with a different tokenizer; "
                "re-run `kititans data` with this tokenizer or drop --tokenizer"
            )

    def _window(self, split: str, seq_len: int) -> np.ndarray:
        arr = self.splits[split]
        if len(arr) < seq_len + 1:
            raise KititansError(
                f"the {split} split has {len(arr)} tokens, fewer than one window of {seq_len + 1}: "
                "use more data or a shorter --set train.seq_len"
            )
        return arr

    def batch(
        self, split: str, batch_size: int, seq_len: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, ...]:
        """Random windows: x (B, T) int64 and y = x shifted by one."""
        arr = self._window(split, seq_len)
        starts = torch.randint(0, len(arr) - seq_len, (batch_size,), generator=gen).tolist()
        chunk = np.stack([arr[s : s + seq_len + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(chunk)
        return t[:, :-1], t[:, 1:]

    def eval_batches(self, n_batches: int, batch_size: int, seq_len: int) -> list[tuple[torch.Tensor, ...]]:
        """The same evenly spaced validation windows every time (at most what the split holds)."""
        arr = self._window("val", seq_len)
        n = min(n_batches * batch_size, max(1, (len(arr) - 1) // seq_len))
        starts = np.linspace(0, len(arr) - seq_len - 1, n).astype(np.int64)
        chunk = torch.from_numpy(np.stack([arr[s : s + seq_len + 1] for s in starts]).astype(np.int64))
        return [(c[:, :-1], c[:, 1:]) for c in chunk.split(batch_size)]
