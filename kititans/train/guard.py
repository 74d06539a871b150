"""The loop's guards: activation checkpointing on by default for large models; a CUDA or MPS out-of-memory
error turned into one line that says what to lower, after saving what can be saved; SIGTERM and Ctrl-C turned
into a save and a stop."""

from __future__ import annotations

import contextlib
import logging
import signal
from typing import Any

import torch

from kititans.device import OOM_ADVICE
from kititans.errors import KititansError

log = logging.getLogger("kititans")

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


def catch_stop_signals(tr: Any) -> dict[int, Any]:
    """SIGTERM (preemption, torchrun stopping the job) and a first Ctrl-C finish the step, save and stop;
    a second Ctrl-C aborts at once."""

    def stop(signum: int, _frame: Any) -> None:
        if tr.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        tr.stop_requested = True
        log.warning("%s: saving a checkpoint after this step", signal.Signals(signum).name)

    handlers = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError):  # not the main thread (a test runner thread): leave them alone
            handlers[sig] = signal.signal(sig, stop)
    return handlers
