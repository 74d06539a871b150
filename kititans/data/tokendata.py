"""Training-side reading of prepared token data: windows drawn deterministically from a generator, from one
dataset (TokenData) or a weighted mixture of datasets that share a tokenizer (Mixture).

Both draw a whole step's windows at once with `sample(split, n, seq_len, gen)` -> (n, 2) int64 rows of
(source, start), and build tensors with `gather(split, rows, seq_len)`; a training rank takes its slice of the
step's rows, so the windows of a step do not depend on how the global batch is split into ranks and micro-batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kititans.data.shards import SPLITS, load_manifest, open_split, verify_shards
from kititans.data.tokenizer import Tokenizer
from kititans.errors import KititansError
from kititans.files import sha256_file

Batch = tuple[torch.Tensor, torch.Tensor]


class TokenData:
    """A prepared dataset (`kititans data` output): memmapped splits over its shards."""

    def __init__(self, shards_dir: str | Path):
        self.dir = Path(shards_dir)
        self.manifest = load_manifest(self.dir)
        verify_shards(self.dir)
        self.splits = {split: open_split(self.dir, self.manifest, split) for split in SPLITS}

    @property
    def sources(self) -> list[TokenData]:
        return [self]

    def describe(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "path": str(self.dir),
            "train_tokens": m["splits"]["train"]["tokens"],
            "val_tokens": m["splits"]["val"]["tokens"],
            "tokenizer_sha256": m["tokenizer_sha256"],
        }

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

    def _split(self, split: str, seq_len: int) -> Any:
        arr = self.splits[split]
        if len(arr) < seq_len + 1:
            raise KititansError(
                f"{self.dir}: the {split} split has {len(arr)} tokens, fewer than one window of {seq_len + 1}: "
                "use more data or a shorter --set train.seq_len"
            )
        return arr

    def sample(self, split: str, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
        arr = self._split(split, seq_len)
        starts = torch.randint(0, len(arr) - seq_len, (n,), generator=gen)
        return torch.stack([torch.zeros_like(starts), starts], dim=1)

    def window(self, split: str, start: int, seq_len: int) -> np.ndarray:
        return self.splits[split][start : start + seq_len + 1]

    def gather(self, split: str, rows: torch.Tensor, seq_len: int) -> Batch:
        """x (B, T) int64 and y = x shifted by one, for rows of (source, start)."""
        srcs = self.sources
        chunk = np.stack([srcs[int(s)].window(split, int(p), seq_len) for s, p in rows.tolist()])
        t = torch.from_numpy(chunk.astype(np.int64))
        return t[:, :-1], t[:, 1:]

    def batch(self, split: str, batch_size: int, seq_len: int, gen: torch.Generator) -> Batch:
        """Random windows: x (B, T) int64 and y = x shifted by one."""
        return self.gather(split, self.sample(split, batch_size, seq_len, gen), seq_len)

    def eval_batches(self, n_batches: int, batch_size: int, seq_len: int) -> list[Batch]:
        """The same evenly spaced validation windows every time (at most what the split holds)."""
        arr = self._split("val", seq_len)
        n = min(n_batches * batch_size, max(1, (len(arr) - 1) // seq_len))
        starts = np.linspace(0, len(arr) - seq_len - 1, n).astype(np.int64)
        chunk = torch.from_numpy(
            np.stack([arr[int(s) : int(s) + seq_len + 1] for s in starts]).astype(np.int64)
        )
        return [(c[:, :-1], c[:, 1:]) for c in chunk.split(batch_size)]


class Mixture(TokenData):
    """Datasets sampled by weight at train time: each window first picks its source with probability
    weight / sum(weights), then a start inside that source's split."""

    def __init__(self, datas: list[TokenData], weights: list[float]):
        if len(weights) != len(datas):
            raise KititansError(
                f"--weights has {len(weights)} values for {len(datas)} data sources: give one weight per source"
            )
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise KititansError(f"--weights must be >= 0 with a positive sum, got {weights}")
        shas = {d.manifest["tokenizer_sha256"] for d in datas}
        if len(shas) > 1:
            raise KititansError(
                "the mixed datasets were tokenized with different tokenizers: prepare them with the same "
                "--tokenizer (kititans data SOURCES --tokenizer DIR --out ...)"
            )
        self.datas, self.weights = datas, [float(w) for w in weights]
        first = datas[0]
        self.dir, self.manifest, self.splits = first.dir, first.manifest, first.splits

    @property
    def sources(self) -> list[TokenData]:
        return list(self.datas)

    def describe(self) -> dict[str, Any]:
        return {
            "mixture": [{**d.describe(), "weight": w} for d, w in zip(self.datas, self.weights)],
            "tokenizer_sha256": self.manifest["tokenizer_sha256"],
        }

    def sample(self, split: str, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
        lens = [len(d._split(split, seq_len)) for d in self.datas]
        w = torch.tensor(self.weights, dtype=torch.float64)
        src = torch.multinomial(w / w.sum(), n, replacement=True, generator=gen)
        starts = torch.zeros(n, dtype=torch.int64)
        for k, length in enumerate(lens):
            idx = (src == k).nonzero().flatten()
            if len(idx):
                starts[idx] = torch.randint(0, length - seq_len, (len(idx),), generator=gen)
        return torch.stack([src, starts], dim=1)

    def eval_batches(self, n_batches: int, batch_size: int, seq_len: int) -> list[Batch]:
        """Each source's evenly spaced windows, in proportion to its weight (at least one batch each)."""
        total = sum(self.weights)
        out: list[Batch] = []
        for d, w in zip(self.datas, self.weights):
            if w > 0:
                out += d.eval_batches(max(1, round(n_batches * w / total)), batch_size, seq_len)
        return out


def open_token_data(sources: list[str], weights: list[float] | None = None) -> TokenData:
    """One prepared dataset, or a weighted Mixture of several."""
    datas = [TokenData(s) for s in sources]
    if len(datas) == 1 and not weights:
        return datas[0]
    return Mixture(datas, list(weights) if weights else [1.0] * len(datas))
