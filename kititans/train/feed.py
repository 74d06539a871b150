"""Batches fetched ahead: the next step's micro-batches are drawn on a background thread while this step
runs (all of a run's draws happen on that one thread, in step order, so the data position stays exact), pinned
on CUDA and copied with non_blocking=True so the host never waits for the transfer."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

Batch = tuple[torch.Tensor, ...]


class Prefetcher:
    """get(step): that step's micro-batches on the device; step + 1 is then drawn in the background."""

    def __init__(
        self, fetch: Callable[[int], list[Batch]], device: torch.device, last: int, enabled: bool = True
    ):
        self.fetch, self.device, self.last = fetch, device, last
        self.pin = device.type == "cuda" and torch.cuda.is_available()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kititans-batches") if enabled else None
        self.pending: dict[int, Future[list[Batch]]] = {}

    def _draw(self, step: int) -> list[Batch]:
        batches = self.fetch(step)
        if self.pin:
            batches = [tuple(t.pin_memory() for t in b) for b in batches]
        return batches

    def get(self, step: int) -> list[Batch]:
        if self.pool is None:
            batches = self._draw(step)
        else:
            future = self.pending.pop(step, None) or self.pool.submit(self._draw, step)
            self.pending.clear()  # a draw for another step (never, in order) is dropped
            batches = future.result()
            if step + 1 < self.last:
                self.pending[step + 1] = self.pool.submit(self._draw, step + 1)
        if self.device.type == "cuda":
            batches = [tuple(t.to(self.device, non_blocking=True) for t in b) for b in batches]
        return batches

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
