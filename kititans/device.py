"""Device, precision and compile choices ("auto" resolves per machine), shared by training and the runtimes
(below both: a runtime never imports the trainer)."""

from __future__ import annotations

import os
import shutil
from functools import lru_cache

import torch

from kititans.errors import KititansError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KititansError("--device cuda: no CUDA GPU is visible to torch (use --device cpu)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise KititansError("--device mps: MPS is not available on this machine (use --device cpu)")
    return dev


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 autocast is 1.1-1.7x faster than fp32 there, and slower on other CPUs."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if name == "fp16" and device.type != "cuda":
        raise KititansError("fp16 training needs a CUDA GPU (it uses a GradScaler); use bf16 or fp32 here")
    return DTYPES[name]


COMPILE_MIN_PARAMS = 10_000_000


def resolve_compile(setting: str, device: torch.device, n_params: int = 0) -> bool:
    """auto: on for CUDA; on CPU only for models >= 10M params (compiling costs 20-60 s, which the ~5% it
    gains on a 4M model never pays back in a short run) and only if a C++ compiler exists; off on MPS."""
    setting = str(setting).lower()
    if setting in ("on", "true"):
        return True
    if setting in ("off", "false"):
        return False
    if device.type == "cuda":
        return True
    has_cxx = shutil.which(os.environ.get("CXX", "g++")) is not None
    return device.type == "cpu" and has_cxx and n_params >= COMPILE_MIN_PARAMS


def set_threads(n: int = 0) -> int:
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n
