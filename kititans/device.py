"""Device, precision and compile choices ("auto" resolves per machine), shared by training and the runtimes
(below both: a runtime never imports the trainer).

Each choice is checked against the device before anything runs, so a first run on a new GPU or a Mac fails
(if it must) in one line at start-up, not minutes in: a GPU index that does not exist, bf16 on a GPU that only
emulates it, `--compile on` without a working compiler. `auto` picks what is native: bf16 on CUDA from compute
capability 8.0 (A100, RTX 30xx and newer), fp16 with a GradScaler below it (T4, V100, RTX 20xx), fp32 on MPS.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
from functools import lru_cache

import torch

from kititans.errors import KititansError

log = logging.getLogger("kititans")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """auto: CUDA, else Apple's MPS, else the CPU. An explicit device must exist on this machine."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise KititansError(f"--device {name!r}: not a device (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise KititansError(f"--device {name}: no CUDA GPU is visible to torch (use --device cpu)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise KititansError(
                f"--device {name}: this machine has {n} CUDA GPU{'s' if n != 1 else ''} "
                f"(cuda:0{f' .. cuda:{n - 1}' if n > 1 else ''})"
            )
        return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    if dev.type == "mps" and not mps_available():
        raise KititansError(f"--device {name}: MPS is not available on this machine (use --device cpu)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise KititansError(f"--device {name}: kititans trains on cpu, cuda or mps")
    return dev


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def macos_version() -> tuple[int, ...]:
    """(major, minor) of macOS, or () elsewhere."""
    ver = platform.mac_ver()[0]
    return tuple(int(x) for x in ver.split(".")[:2] if x.isdigit()) if ver else ()


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 autocast is 1.1-1.7x faster than fp32 there, and slower on other CPUs."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device.index if device.index is not None else None)


def native_bf16(device: torch.device) -> bool:
    """bf16 runs in hardware: CUDA compute capability >= 8.0 (torch.cuda.is_bf16_supported() also counts
    emulation, and asks only the current device), MPS from macOS 14, any CPU (correct, not always fast)."""
    if device.type == "cuda":
        return cuda_capability(device) >= (8, 0)
    if device.type == "mps":
        return macos_version() >= (14, 0)
    return True


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if native_bf16(device) else torch.float16
        if device.type == "cpu" and cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32  # MPS: fp32 by default (bf16 on request from macOS 14)
    if name not in DTYPES:
        raise KititansError(f"--dtype {name!r}: valid dtypes are auto, {', '.join(DTYPES)}")
    if name == "fp16" and device.type != "cuda":
        raise KititansError("fp16 training needs a CUDA GPU (it uses a GradScaler); use bf16 or fp32 here")
    if name == "bf16" and not native_bf16(device):
        if device.type == "cuda":
            major, minor = cuda_capability(device)
            raise KititansError(
                f"--dtype bf16: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) "
                "has no native bf16 and would emulate it slowly; use --dtype fp16 (or auto)"
            )
        raise KititansError("--dtype bf16 on MPS needs macOS 14 or newer; use --dtype fp32 (or auto)")
    return DTYPES[name]


COMPILE_MIN_PARAMS = 10_000_000


def compile_blocker(device: torch.device) -> str | None:
    """Why torch.compile cannot work on `device` here (None: it can): Inductor needs a C++ compiler on the
    CPU, and Triton with compute capability >= 7.0 on CUDA; its MPS backend is not production-ready."""
    if device.type == "cuda":
        major, minor = cuda_capability(device)
        if (major, minor) < (7, 0):
            return f"Triton needs CUDA compute capability 7.0 or newer (this GPU has {major}.{minor})"
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return "this torch has no Triton support"
        return None if has_triton() else "Triton is not installed or cannot run here (pip install triton)"
    if device.type == "mps":
        return "torch.compile does not support MPS training reliably"
    compilers = (os.environ.get("CXX", "g++"), "c++", "clang++")
    if device.type == "cpu" and not any(shutil.which(c) for c in compilers):
        return "no C++ compiler on PATH (install g++ or clang++, or set CXX)"
    return None


def resolve_compile(setting: str, device: torch.device, n_params: int = 0) -> bool:
    """auto: on for CUDA, on CPU only for models >= 10M params (compiling costs 20-60 s, which the ~5% it
    gains on a 4M model never pays back in a short run), off on MPS; and only where a working compiler
    exists (auto without one: off with a one-line warning; `on` without one: a one-line error)."""
    setting = str(setting).lower()
    if setting in ("off", "false"):
        return False
    if setting not in ("on", "true", "auto"):
        raise KititansError(f"--compile {setting!r}: use auto, on or off")
    blocker = compile_blocker(device)
    if setting in ("on", "true"):
        if blocker:
            raise KititansError(f"--compile on: {blocker}; use --compile off")
        return True
    wanted = device.type == "cuda" or (device.type == "cpu" and n_params >= COMPILE_MIN_PARAMS)
    if wanted and blocker:
        log.warning("torch.compile skipped: %s", blocker)
        return False
    return wanted


def set_threads(n: int = 0) -> int:
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


OOM_ADVICE = (
    "lower --batch-size (keep the global batch with --global-batch), lower --seq-len, turn on activation "
    "checkpointing (--set train.activation_checkpointing=true), or shard the model with --parallel fsdp"
)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; MPS raises a plain RuntimeError("MPS backend out of memory")."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return (
        isinstance(exc, RuntimeError)
        and ("out of memory" in text.lower())
        and ("MPS backend" in text or "CUDA" in text or "HIP" in text)
    )
