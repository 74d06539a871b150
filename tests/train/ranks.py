"""Run a function on N gloo ranks (CPU processes, as torchrun would start them) and collect what each returns.

Workers are importable top-level functions (spawned processes import them); each gets its rank and writes
its result with torch.save (test-internal files: nothing a user receives)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int, fn: Callable[..., Any], world: int, port: int, out: str, args: tuple, kwargs: dict
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1)  # a hung rank: `kill -USR1 PID` prints where it waits
    try:
        result = fn(*args, **kwargs)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, Path(out) / f"rank{rank}.pt")


def run_ranks(fn: Callable[..., Any], world: int, tmp: Path, *args: Any, **kwargs: Any) -> list[Any]:
    """fn(*args, **kwargs) on `world` gloo ranks; the list of their results, rank by rank."""
    tmp.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_entry, args=(fn, world, free_port(), str(tmp), args, kwargs), nprocs=world, join=True,
                       start_method="spawn")  # fmt: skip
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
