"""Peak memory of training, per logged interval (metrics.jsonl `peak_mem_mb`, `mem_kind`):

cuda   torch.cuda.max_memory_allocated (tensors), reset after each reading
mps    torch.mps.driver_allocated_memory (what Metal holds; MPS keeps no peak, so this is the value at the
       reading), and `mps_allocated_mb`: torch.mps.current_allocated_memory (what tensors hold)
cpu    the process's peak resident set (VmHWM), reset after each reading through /proc/self/clear_refs
       (Linux); elsewhere the lifetime peak (ru_maxrss), which cannot be reset
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_peak_bytes() -> int:
    """This process's peak resident memory since the last reset_rss_peak() (or since it started)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else rss_peak_bytes()


def reset_rss_peak() -> bool:
    """Reset the peak resident set to the current one (Linux >= 4.0); False where it cannot be reset."""
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a device between readings."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = {"cuda": "cuda_allocated", "mps": "mps_driver"}.get(device.type, "cpu_rss")
        self.reset()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu":
            reset_rss_peak()

    def extra(self) -> dict[str, float]:
        """Figures a logged row carries besides the peak: on MPS the memory held by tensors
        (torch.mps.current_allocated_memory; the peak reading is what the Metal driver holds)."""
        if self.device.type == "mps":
            return {"mps_allocated_mb": round(torch.mps.current_allocated_memory() / 2**20, 1)}
        return {}

    def read(self, reset: bool = True) -> int:
        """Peak bytes since the last reset (then reset, by default)."""
        if self.device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self.device.type == "mps":
            peak = int(torch.mps.driver_allocated_memory())
        else:
            peak = rss_peak_bytes()
        if reset:
            self.reset()
        return peak
