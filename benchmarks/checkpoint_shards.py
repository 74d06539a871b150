"""Checkpoint save and resume under FSDP2 on 2 gloo ranks (CPU): the optimizer state gathered to rank 0 (one
file, train.checkpoint_shards=false) vs sharded (every rank writes and reads its own piece, train/sharded.py).

Per rank: the peak resident memory above what the rank held before (model shard + optimizer shard), and the
wall time, of (1) taking and writing a checkpoint, (2) reading it back into the sharded model and optimizer.
The consolidated model.safetensors is gathered and written by rank 0 in both modes (the run's model directory).

    python -m benchmarks.checkpoint_shards --preset lite-125m --out /tmp/ckpt-bench [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, preset: str, mode: str, folder: str, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    from kititans.checkpoint import read_tree, write_tree
    from kititans.config import OptimConfig
    from kititans.models.spec import find_preset
    from kititans.train import distributed as D
    from kititans.train import sharded
    from kititans.train.checkpoints import Restored
    from kititans.train.memory import reset_rss_peak, rss_bytes, rss_peak_bytes
    from kititans.train.optim import build_optimizer
    from kititans.train.state import Snapshotter

    dist.init_process_group("gloo")
    d = D.Dist(rank, world, rank, "gloo")
    spec, p = find_preset(preset, None)
    torch.manual_seed(0)
    model = spec.build(spec.make_config(p.name, {}))
    D.wrap(model, "fsdp", d, torch.device("cpu"), torch.float32, spec)
    opt = build_optimizer(model, spec, OptimConfig(), fused=False)
    sharded.local_states(model, opt.optimizers)  # the optimizer state exists (as after a first step)
    snap = Snapshotter(model, opt, "fsdp", d, shards=mode == "sharded")
    out, where = {}, Path(folder)

    def measure(name: str, fn: Any) -> None:
        d.barrier()
        base = rss_bytes()
        reset_rss_peak()
        t0 = time.perf_counter()
        fn()
        d.barrier()
        out[f"{name}_s"] = round(time.perf_counter() - t0, 3)
        out[f"{name}_peak_extra_mb"] = round((rss_peak_bytes() - base) / 2**20, 1)
        out[f"{name}_rss_mb"] = round(rss_peak_bytes() / 2**20, 1)

    def save() -> None:
        s = snap.take(1, {})
        if rank == 0:
            where.mkdir(parents=True, exist_ok=True)
        d.barrier()
        if mode == "sharded":
            index = sharded.write_shard(where, s.optimizers, rank, world)
        if rank == 0:
            save_file(s.weights, str(where / "model.safetensors"))
            if mode == "sharded":
                sharded.write_index(where, index)
            else:
                write_tree(where, "optimizer", {"optimizers": s.optimizers})

    def load() -> None:
        main = rank == 0
        restored = Restored(
            1,
            load_file(str(where / "model.safetensors")) if main else {},
            read_tree(where, "optimizer")["optimizers"] if main and mode == "gather" else [],
            {},
            shards=where if mode == "sharded" else None,
        )
        snap.load_model(restored)
        snap.load_optimizer(restored, "fsdp")

    out["before_mb"] = round(rss_bytes() / 2**20, 1)
    measure("save", save)
    measure("load", load)
    out["files_mb"] = round(sum(f.stat().st_size for f in where.iterdir()) / 2**20, 1)
    (Path(result) / f"{mode}-rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="lite-125m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args()
    root = Path(a.out)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in range(a.rounds):
        for mode in ("gather", "sharded"):  # interleaved
            folder = root / f"ckpt-{mode}-{r}"
            mp.start_processes(_rank, args=(a.world, _port(), a.preset, mode, str(folder), str(root)),
                               nprocs=a.world, join=True, start_method="spawn")  # fmt: skip
            ranks = [json.loads((root / f"{mode}-rank{k}.json").read_text()) for k in range(a.world)]
            rows.append({"round": r, "mode": mode, "ranks": ranks})
            print(json.dumps(rows[-1]), flush=True)
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()
    (root / "results.json").write_text(
        json.dumps({"preset": a.preset, "world": a.world, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
