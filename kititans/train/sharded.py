"""Sharded optimizer state: every rank writes its own shard in parallel, and any world size or parallelism
(one process, DDP, FSDP2) reads back exactly the pieces it holds. Nothing is unpickled.

Format (inside a step folder, next to the consolidated model.safetensors):
  optimizer.index.json                    {"format", "world", "shards": [file names], "tree": the optimizer
                                          state dicts' structure, tensors replaced by {"__tensor__": key}}
  optimizer-RRRRR-of-WWWWW.safetensors    rank R's pieces: key -> its local tensor; the header's metadata
                                          "kititans" (JSON) gives each piece's global offset and global shape

The state comes from torch.distributed.checkpoint's state-dict API (`get_optimizer_state_dict` with
full_state_dict=False: FQN-keyed, DTensor shards under FSDP2, plain tensors otherwise); a replicated tensor
(DDP, one process, optimizer step counters) is written by one rank, chosen round-robin so that the ranks share
the writing. On load each rank asks the same API for its own (empty-initialised) state, fills each local
piece from the overlapping saved pieces (safetensors reads only those slices: memory per rank stays its shard),
and hands it to `set_optimizer_state_dict` (the resharding). DCP's own FileSystemWriter is not used: its
`.metadata` is a pickle, and its tensor files are torch.save archives.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kititans.errors import KititansError
from kititans.files import fsync_file, read_json, write_json

INDEX = "optimizer.index.json"
FORMAT = "kititans-sharded-1"
Piece = tuple[Path, list[int], list[int]]  # file, global offset, local size


def shard_name(rank: int, world: int) -> str:
    return f"optimizer-{rank:05d}-of-{world:05d}.safetensors"


def is_sharded(folder: Path) -> bool:
    return (folder / INDEX).is_file()


def shards_complete(folder: Path) -> bool:
    try:
        index = read_json(folder / INDEX)
    except KititansError:
        return False
    return all((folder / n).is_file() for n in index.get("shards", []))


def _options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=False)


def local_states(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[dict[str, Any]]:
    """Each optimizer's state as this rank holds it (no gather, no copy)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():  # FSDP2 leaves the root unsharded after a no-grad forward (an eval): the
        if isinstance(m, FSDPModule):  # optimizer holds the sharded parameters, so match those
            m.reshard()

    return [get_optimizer_state_dict(model, o, options=_options()) for o in optimizers]


# ------------------------------------------------------------------------------------ structure
def _flatten(obj: Any, path: str, leaves: dict[str, torch.Tensor]) -> Any:
    """JSON structure of `obj` with every tensor replaced by {"__tensor__": its path}."""
    if isinstance(obj, torch.Tensor):
        leaves[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, f"{path}/{k}", leaves)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, f"{path}/{i}", leaves) for i, v in enumerate(obj)]
        return {"__list__": items, "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _local(t: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int], bool]:
    """(this rank's tensor, its global offset, the global shape, replicated on every rank?)."""
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(t, DTensor):
        chunk = t.__create_chunk_list__()[0]
        replicated = all(isinstance(p, Replicate) for p in t.placements)
        return t.to_local(), list(chunk.offsets), list(t.shape), replicated
    return t, [0] * t.dim(), list(t.shape), True


# ------------------------------------------------------------------------------------------ save
def write_shard(folder: Path, states: list[dict[str, Any]], rank: int, world: int) -> dict[str, Any]:
    """Write this rank's pieces of `states` (every rank calls it, into the same folder); return the index
    (rank 0 writes it once every rank has written: write_index)."""
    from safetensors.torch import save_file

    leaves: dict[str, torch.Tensor] = {}
    tree = _flatten({"optimizers": states}, "", leaves)
    tensors: dict[str, torch.Tensor] = {}
    table: dict[str, dict[str, list[int]]] = {}
    for i, key in enumerate(sorted(leaves)):
        local, offset, shape, replicated = _local(leaves[key])
        if (replicated and i % world != rank) or (local.dim() and local.numel() == 0):
            continue
        tensors[key] = local.detach().to("cpu").contiguous()
        table[key] = {"offset": offset, "size": list(local.shape), "shape": shape}
    path = folder / shard_name(rank, world)
    save_file(tensors, str(path), metadata={"kititans": json.dumps(table)})
    fsync_file(path)
    return {"format": FORMAT, "world": world, "shards": [shard_name(r, world) for r in range(world)],
            "tree": tree}  # fmt: skip


def write_index(folder: Path, index: dict[str, Any]) -> None:
    write_json(folder / INDEX, index)


# ------------------------------------------------------------------------------------------ load
class ShardReader:
    """The saved pieces of a sharded checkpoint, read slice by slice."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        self.index = read_json(folder / INDEX)
        if self.index.get("format") != FORMAT:
            raise KititansError(f"{folder / INDEX}: unknown format {self.index.get('format')!r}")
        self.stack = contextlib.ExitStack()
        self.files: dict[Path, Any] = {}
        self.pieces: dict[str, list[Piece]] = {}
        for name in self.index["shards"]:
            path = folder / name
            try:
                f = self.stack.enter_context(safe_open(str(path), framework="pt"))
            except Exception as e:
                self.stack.close()
                raise KititansError(f"{path}: unreadable ({e})") from None
            self.files[path] = f
            for key, c in json.loads((f.metadata() or {}).get("kititans", "{}")).items():
                self.pieces.setdefault(key, []).append((path, c["offset"], c["size"]))

    def close(self) -> None:
        self.stack.close()

    def read(self, key: str, offset: list[int], size: list[int], like: torch.Tensor) -> torch.Tensor:
        """The region [offset, offset + size) of saved tensor `key`, as like's dtype and device."""
        out = torch.empty(size, dtype=like.dtype, device="cpu")
        covered = 0
        for path, off, sz in self.pieces.get(key, []):
            lo = [max(a, b) for a, b in zip(offset, off)]
            hi = [min(a + s, b + t) for a, s, b, t in zip(offset, size, off, sz)]
            if any(h <= lo_ for lo_, h in zip(lo, hi)):
                continue
            f = self.files[path]
            if not size:  # a scalar (an optimizer step counter)
                piece = f.get_tensor(key)
            else:
                piece = f.get_slice(key)[tuple(slice(a - b, h - b) for a, h, b in zip(lo, hi, off))]
            out[tuple(slice(a - b, h - b) for a, h, b in zip(lo, hi, offset))] = piece.to(out.dtype)
            covered += math.prod(h - a for a, h in zip(lo, hi))
        if covered != math.prod(size):
            raise KititansError(
                f"{self.folder}: the sharded optimizer state lacks part of {key.strip('/')} (a shard file is "
                "missing or from another run); resume from an earlier checkpoint"
            )
        return out.to(like.device)


def _fill(saved: Any, target: Any, reader: ShardReader, where: str) -> Any:
    """The saved structure with every tensor read as this rank's piece of the matching target tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(saved, dict) and "__tensor__" in saved:
        if not isinstance(target, torch.Tensor):
            raise KeyError(where)
        local, offset, _, _ = _local(target)
        data = reader.read(saved["__tensor__"], offset, list(local.shape), local)
        if isinstance(target, DTensor):
            return DTensor.from_local(data, target.device_mesh, target.placements, run_check=False,
                                      shape=target.shape, stride=target.stride())  # fmt: skip
        return data
    if isinstance(saved, dict) and "__dict__" in saved:
        tgt = target if isinstance(target, dict) else {}
        return {k: _fill(v, tgt.get(k), reader, f"{where}/{k}") for k, v in saved["__dict__"]}
    if isinstance(saved, dict) and "__list__" in saved:
        tgt = target if isinstance(target, (list, tuple)) else []
        items = [_fill(v, tgt[i] if i < len(tgt) else None, reader, f"{where}/{i}")
                 for i, v in enumerate(saved["__list__"])]  # fmt: skip
        return tuple(items) if saved.get("tuple") else items
    return saved


def load_optimizers(model: nn.Module, optimizers: list[torch.optim.Optimizer], folder: Path) -> None:
    """Every rank: read its pieces of the saved optimizer state into its (possibly sharded) optimizers."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    reader = ShardReader(folder)
    try:
        saved = reader.index["tree"]["__dict__"][0][1]["__list__"]
        if len(saved) != len(optimizers):
            raise KititansError(
                "the saved optimizer state does not fit this optimizer (was --optimizer changed?); resume "
                "with the run's optimizer"
            )
        for o, s, target in zip(optimizers, saved, local_states(model, optimizers)):
            try:
                state = _fill(s, target, reader, "")
                set_optimizer_state_dict(model, o, state, options=_options())
            except (KeyError, ValueError, RuntimeError) as e:
                raise KititansError(
                    f"the saved optimizer state does not fit (was the optimizer changed?): {str(e)[:200]}"
                ) from None
    finally:
        reader.close()
