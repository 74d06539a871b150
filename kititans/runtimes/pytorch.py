"""The PyTorch runtime: a run directory's model with its static KV cache (or Titans state)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kititans.checkpoint import load_checkpoint
from kititans.device import DTYPES, resolve_device

log = logging.getLogger("kititans")


class TorchRuntime:
    name = "torch"

    def __init__(
        self,
        path: Path,
        device: str = "cpu",
        dtype: str = "fp32",
        threads: int = 0,
        compile: bool = False,
        **_: Any,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.ckpt = load_checkpoint(path, device=self.device, dtype=DTYPES[dtype])
        self.model = self.ckpt.model
        if hasattr(self.model, "fuse_for_inference"):
            self.model.fuse_for_inference()
        self.compiled = False
        if compile:  # Titans: one torch.compile'd fixed-shape step per kind of call (models without: eager)
            if hasattr(self.model, "compile_decode"):
                self.model.compile_decode()
                self.compiled = True
            else:
                log.warning(
                    "--compile: the %s family has no compiled decode step; decoding eagerly",
                    self.ckpt.spec.name,
                )
        self.codec = self.ckpt.tokenizer
        self.vocab_size = self.ckpt.config.vocab_size
        self.context_length = self.ckpt.config.context_length
        self.dtype = dtype
        self.task = self.ckpt.spec.task  # "lm": forward() gives logits; "embed": embed_batch() gives vectors
        self.state: Any = None

    @property
    def n_past(self) -> int:
        return self.state.pos if self.state is not None else 0

    def reset(self) -> None:
        self.state = self.model.new_state(batch_size=1)

    @torch.inference_mode()
    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        if self.state is None:
            self.reset()
        x = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        logits = self.model(x, state=self.state)[0]  # (T, V)
        out = logits if all_logits else logits[-1]
        return out.float().cpu().numpy()

    @torch.inference_mode()
    def embed_batch(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """An encoder's unit vectors (N, dim) float32 for token id lists (padded together, masked)."""
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), max(self.codec.pad_id, 0), dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
            mask[i, : len(r)] = 1
        return self.model(ids.to(self.device), mask.to(self.device)).float().cpu().numpy()
