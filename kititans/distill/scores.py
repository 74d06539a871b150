"""The teacher-scores folder (`kititans distill score` writes it, `kititans distill RUN --teacher-scores` reads it).

    DIR/manifest.json             format, version, tokenizer_sha256, vocab_size, top_k, teacher, sources,
                                  records_done (input conversations consumed), shards [{file, records, tokens}]
    DIR/shard-00000.safetensors   one block of conversations, tensors over all their tokens (N) and records (R):
        ids            int32 (N,)      the rendered conversation's token ids
        mask           uint8 (N,)      1 where the SFT loss counts (assistant content and its end token)
        offsets        int64 (R+1,)    record r is tokens offsets[r]:offsets[r+1]
        topk_ids       int32 (N, k)    the teacher's k most likely tokens at each position (-1: none)
        topk_logprobs  float16 (N, k)  their log-probabilities
        rest_logprob   float32 (N,)    log of the probability mass outside the top k

Row i is the teacher's distribution over token i given tokens < i (row 0, with nothing before it, is empty:
rest 0). A shard and then the manifest are written atomically, so a killed `score` resumes after the last
whole shard. No pickle: safetensors and JSON.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kititans.errors import KititansError
from kititans.files import atomic_path, read_json, write_json

FORMAT, VERSION = "kititans-teacher-scores", 1


@dataclass
class Scored:
    """One conversation's ids, loss mask and the teacher's top-k rows."""

    ids: np.ndarray  # (L,) int32
    mask: np.ndarray  # (L,) uint8
    topk_ids: np.ndarray  # (L, k) int32
    topk_logprobs: np.ndarray  # (L, k) float32
    rest_logprob: np.ndarray  # (L,) float32


def write_shard(path: Path, items: list[Scored]) -> int:
    """One shard file (atomic); returns its token count."""
    from safetensors.numpy import save_file

    lengths = [len(s.ids) for s in items]
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    tensors = {
        "ids": np.concatenate([s.ids for s in items]).astype(np.int32),
        "mask": np.concatenate([s.mask for s in items]).astype(np.uint8),
        "offsets": offsets,
        "topk_ids": np.concatenate([s.topk_ids for s in items]).astype(np.int32),
        "topk_logprobs": np.concatenate([s.topk_logprobs for s in items]).astype(np.float16),
        "rest_logprob": np.concatenate([s.rest_logprob for s in items]).astype(np.float32),
    }
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
    except OSError as e:
        raise KititansError(
            f"cannot write {path} ({e.strerror or e}): the scores up to the last whole shard are kept; "
            "free space and re-run the same command to continue"
        ) from None
    return int(offsets[-1])


def read_manifest(folder: Path) -> dict[str, Any]:
    m = read_json(folder / "manifest.json", "teacher scores manifest")
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise KititansError(f"{folder}: not a teacher-scores folder (made by `kititans distill score`)")
    return m


def save_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    try:
        write_json(folder / "manifest.json", manifest)
    except OSError as e:
        raise KititansError(
            f"cannot write {folder}/manifest.json ({e.strerror or e}): free space and re-run"
        ) from None


class TeacherScores:
    """Random access to the records of a scores folder; tensors are read lazily (safetensors slices)."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.dir = Path(folder)
        self.manifest = read_manifest(self.dir)
        self.top_k = int(self.manifest["top_k"])
        self.files: list[Any] = []
        self.index: list[tuple[int, int, int]] = []  # record -> (shard, start, end)
        for i, sh in enumerate(self.manifest["shards"]):
            f = safe_open(str(self.dir / sh["file"]), framework="pt")
            self.files.append(f)
            off = f.get_tensor("offsets").tolist()
            self.index += [(i, a, b) for a, b in itertools.pairwise(off)]
        if not self.index:
            raise KititansError(f"{self.dir}: no scored conversations in it")

    def __len__(self) -> int:
        return len(self.index)

    def length(self, i: int) -> int:
        _, a, b = self.index[i]
        return b - a

    def check_tokenizer(self, sha256: str, vocab_size: int, who: str) -> None:
        m = self.manifest
        if m["tokenizer_sha256"] != sha256 or int(m["vocab_size"]) != vocab_size:
            raise KititansError(
                f"{self.dir} was scored with another tokenizer (sha256 {m['tokenizer_sha256'][:12]}, vocab "
                f"{m['vocab_size']}) than {who} ({sha256[:12]}, vocab {vocab_size}): score again with "
                f"`kititans distill score ... --tokenizer {who}`"
            )

    def record(self, i: int) -> tuple[torch.Tensor, ...]:
        """(ids int64 (L,), mask bool (L,), topk_ids int64 (L,k), topk_logprobs fp32 (L,k), rest fp32 (L,))."""
        s, a, b = self.index[i]
        f = self.files[s]
        get = lambda name: f.get_slice(name)[a:b]  # noqa: E731
        return (
            get("ids").long(),
            get("mask").bool(),
            get("topk_ids").long(),
            get("topk_logprobs").float(),
            get("rest_logprob").float(),
        )


def split_records(scores: TeacherScores, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A deterministic train/val split by a hash of each record's token ids (as SFT splits by content)."""
    import hashlib

    train, val = [], []
    for i in range(len(scores)):
        ids = scores.record(i)[0].numpy().astype("<i4").tobytes()
        h = int.from_bytes(hashlib.sha1(f"{seed}\0".encode() + ids).digest()[:8], "big") / 2**64
        (val if h < val_fraction else train).append(i)
    if not val:
        val.append(train.pop())
    if not train:
        raise KititansError(f"{scores.dir}: need at least 2 scored conversations for a train/val split")
    return train, val


def collate_scored(
    records: list[tuple[torch.Tensor, ...]], pad_id: int, limit: int, multiple: int = 8
) -> tuple:
    """Right-padded (x, y, mask, topk_ids, topk_logprobs, rest_logprob): (B, T) and (B, T, k); the teacher's
    rows are those of the targets y (row j+1 of a record is its distribution over token j+1)."""
    longest = max(len(r[0]) for r in records) - 1
    t = min(-(-longest // multiple) * multiple, limit)
    k = records[0][2].shape[1]
    b = len(records)
    x = torch.full((b, t), pad_id, dtype=torch.long)
    y = torch.full((b, t), pad_id, dtype=torch.long)
    m = torch.zeros((b, t), dtype=torch.bool)
    tk = torch.full((b, t, k), -1, dtype=torch.long)
    lp = torch.full((b, t, k), float("-inf"))
    rest = torch.zeros((b, t))
    for i, (ids, mask, tki, lpi, ri) in enumerate(records):
        n = min(len(ids) - 1, t)
        x[i, :n], y[i, :n], m[i, :n] = ids[:n], ids[1 : n + 1], mask[1 : n + 1]
        tk[i, :n], lp[i, :n], rest[i, :n] = tki[1 : n + 1], lpi[1 : n + 1], ri[1 : n + 1]
    return x, y, m, tk, lp, rest


class ScoreBatches:
    """train_batch(step, index, count) over scored records, deterministic (exact resume): each epoch a
    seeded permutation; every 32 batches' worth sorted by length (less padding), the batches shuffled."""

    GROUP = 32

    def __init__(
        self, scores: TeacherScores, indices: list[int], batch_size: int, seed: int, pad_id: int, limit: int
    ):
        self.scores, self.idx, self.b, self.seed = scores, indices, batch_size, seed
        self.pad_id, self.limit = pad_id, limit
        self._cached: tuple[int, list[list[int]]] = (-1, [])

    def _perm(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 1009 + 7)
        return torch.randperm(len(self.idx), generator=gen).tolist()

    def _group(self, g: int) -> list[list[int]]:
        if self._cached[0] != g:
            n, size = len(self.idx), self.GROUP * self.b
            perms: dict[int, list[int]] = {}
            chosen = []
            for j in range(g * size, (g + 1) * size):
                e = j // n
                perms.setdefault(e, self._perm(e))
                chosen.append(self.idx[perms[e][j % n]])
            chosen.sort(key=lambda i: (self.scores.length(i), i))
            chunks = [chosen[k : k + self.b] for k in range(0, size, self.b)]
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + g * 1009 + 11)
            self._cached = (g, [chunks[o] for o in torch.randperm(len(chunks), generator=gen).tolist()])
        return self._cached[1]

    def __call__(self, step: int, index: int, count: int) -> tuple:
        g, r = divmod(step * count + index, self.GROUP)
        return collate_scored([self.scores.record(i) for i in self._group(g)[r]], self.pad_id, self.limit)

    def eval_batches(self, indices: list[int]) -> list[tuple]:
        order = sorted(indices, key=lambda i: self.scores.length(i))
        return [
            collate_scored([self.scores.record(i) for i in order[k : k + self.b]], self.pad_id, self.limit)[
                :3
            ]
            for k in range(0, len(order), self.b)
        ]
