"""The loop's care for device memory: activation checkpointing on by default for large models, and a CUDA or
MPS out-of-memory error turned into one line that says what to lower, after saving what can be saved."""

from __future__ import annotations

from typing import Any

import torch

from kititans.device import OOM_ADVICE
from kititans.errors import KititansError

AC_MIN_PARAMS = 300_000_000  # auto: activation checkpointing from lite-350m / titans-500m up


def resolve_activation_checkpointing(setting: str | bool, n_params: int) -> bool:
    """on | off | auto (on from 300M parameters: their activations dominate a GPU's memory)."""
    value = str(setting).lower()
    return value in ("on", "true") or (value == "auto" and n_params >= AC_MIN_PARAMS)


def out_of_memory(tr: Any, seconds: float) -> None:
    """A CUDA/MPS out-of-memory error: save the last completed step when it is not saved yet (one process,
    parameters not half-updated), then stop with one line that says what to lower."""
    tr.opt.zero_grad(set_to_none=True)  # free the gradients before writing
    _empty_cache(tr.device)
    saved = ""
    if tr.step > tr.saved_step and not tr.dist.enabled and not tr.updating:
        tr.save(seconds)
        saved = f"; step {tr.step} is saved: after the change continue with `kititans train --resume {tr.run_dir}`"
    t = tr.t
    raise KititansError(
        f"out of memory on {tr.device} at step {tr.step + 1} (micro-batch {t.batch_size} x seq-len "
        f"{t.seq_len}): {OOM_ADVICE}{saved}"
    ) from None


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
