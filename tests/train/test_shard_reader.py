"""The sharded format's reader: any region of a saved tensor assembled from the pieces that overlap it (the
resharding a new world size needs), in-process on hand-made shard files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kititans.errors import KititansError
from kititans.files import write_json
from kititans.train import sharded


def _write(folder, pieces_by_rank, tree=None):
    names = []
    for rank, pieces in enumerate(pieces_by_rank):
        name = sharded.shard_name(rank, len(pieces_by_rank))
        tensors = {k: t for k, (t, _) in pieces.items()}
        table = {
            k: {"offset": off, "size": list(t.shape), "shape": [10, 4]} for k, (t, off) in pieces.items()
        }
        save_file(tensors, str(folder / name), metadata={"kititans": json.dumps(table)})
        names.append(name)
    write_json(folder / sharded.INDEX, {"format": sharded.FORMAT, "world": len(names), "shards": names,
                                        "tree": tree or {}})  # fmt: skip


def test_regions_across_pieces_and_scalars(tmp_path):
    full = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    step = torch.tensor(7.0)
    # saved by 3 ranks, dim 0 split 4 / 4 / 2 (the scalar written once)
    _write(tmp_path, [{"/m": (full[:4], [0, 0]), "/step": (step, [])}, {"/m": (full[4:8], [4, 0])},
                      {"/m": (full[8:], [8, 0])}])  # fmt: skip
    reader = sharded.ShardReader(tmp_path)
    try:
        like = torch.empty(0, dtype=torch.bfloat16)
        for offset, size in [([0, 0], [5, 4]), ([5, 0], [5, 4]), ([3, 1], [6, 2]), ([0, 0], [10, 4])]:
            got = reader.read("/m", offset, size, like)
            want = full[offset[0] : offset[0] + size[0], offset[1] : offset[1] + size[1]]
            assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
        assert reader.read("/step", [], [], step).item() == 7.0
        with pytest.raises(KititansError, match="lacks part of m"):
            reader.read("/missing", [0, 0], [1, 4], like)
    finally:
        reader.close()


def test_a_lost_piece_or_shard_is_one_line(tmp_path):
    full = torch.ones(10, 4)
    _write(tmp_path, [{"/m": (full[:4], [0, 0])}, {}])
    (tmp_path / sharded.shard_name(1, 2)).unlink()
    assert not sharded.shards_complete(tmp_path)
    with pytest.raises(KititansError, match="unreadable"):
        sharded.ShardReader(tmp_path)
    _write(tmp_path, [{"/m": (full[:4], [0, 0])}, {}])  # rank 1's piece of /m never written
    reader = sharded.ShardReader(tmp_path)
    with pytest.raises(KititansError, match="lacks part of m"):
        reader.read("/m", [0, 0], [10, 4], full)
    reader.close()
