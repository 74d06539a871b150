"""The machine a bench ran on (so reports from a desktop GPU, a Mac and a Raspberry Pi sit side by side),
its memory bandwidth (a short copy test), and a process's resident memory.

Peak memory: on Linux, VmHWM from /proc/self/status is the high-water mark of this process's own address
space; `getrusage().ru_maxrss` is not used there because exec() carries the parent's peak over into it.

Torch-free, and psutil is optional (a device running a bench pack may have neither): /proc, sysctl and
os.sysconf stand in for it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kititans.runtimes.host import core_types, performance_threads, run_tool, sysctl

PACKAGES = (
    "kititans",
    "torch",
    "numpy",
    "llama-cpp-python",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-genai",
    "onnx",
    "coremltools",
    "gguf",
)


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return ""


def cpu_model() -> str:
    if sys.platform == "darwin":
        return run_tool(["sysctl", "-n", "machdep.cpu.brand_string"], 10.0) or platform.processor()
    info = _read("/proc/cpuinfo")
    for key in ("model name", "Model", "Hardware", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", info, re.M)
        if m:
            return m.group(1).strip()
    return platform.processor() or platform.machine()


def caches() -> dict[str, int]:
    """CPU cache sizes in bytes (L1d, L2, L3 of one core): a model smaller than L3 can beat the DRAM bound."""
    found: dict[str, int] = {}
    if sys.platform == "darwin":
        for name, key in (("L1d", "hw.l1dcachesize"), ("L2", "hw.l2cachesize"), ("L3", "hw.l3cachesize")):
            v = run_tool(["sysctl", "-n", key], 10.0)
            if v.isdigit() and int(v):
                found[name] = int(v)
        return found
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        kind, level, size = (_read(str(d / f)) for f in ("type", "level", "size"))
        if kind == "Instruction" or not size:
            continue
        n = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        found[f"L{level}{'d' if kind == 'Data' else ''}"] = n
    return found


def gpus() -> list[dict[str, Any]]:
    """NVIDIA GPUs as nvidia-smi lists them (name, driver, memory)."""
    out = run_tool(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"], 10.0
    )
    found = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            mem = int(parts[2]) * 2**20 if parts[2].isdigit() else None
            found.append({"name": parts[0], "driver": parts[1], "memory_bytes": mem})
    return found


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def ram_bytes() -> int:
    """Physical memory (unified memory on Apple silicon)."""
    m = re.search(r"^MemTotal:\s*(\d+)\s*kB", _read("/proc/meminfo"), re.M)
    if m:
        return int(m.group(1)) * 1024
    mem = sysctl("hw.memsize")
    if mem.isdigit():
        return int(mem)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def device_record(threads: int, label: str | None = None) -> dict[str, Any]:
    """Everything about this machine that a reader needs to compare reports: CPU, core types, board/SoC,
    governor, memory, caches, OS, package versions, GPUs, llama.cpp's build features, onnxruntime's
    providers."""
    from kititans.bench.board import board, governors, runtime_info

    cores = core_types()
    rec: dict[str, Any] = {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "physical_cores": cores["physical_cores"],
        "logical_cores": os.cpu_count(),
        "performance_cores": cores["performance_cores"],
        "core_types": cores,
        "threads_used": threads,
        "ram_bytes": ram_bytes(),
        "cache_bytes": caches(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions(),
        "gpus": gpus(),
        "governors": governors(),
        "soc": board(),
        **runtime_info(),
    }
    if sys.platform == "darwin":
        rec["apple_chip"] = run_tool(["sysctl", "-n", "machdep.cpu.brand_string"], 10.0)
        rec["mac_model"] = run_tool(["sysctl", "-n", "hw.model"], 10.0)
    model = rec["soc"].get("model") or rec["soc"].get("android", {}).get("model")
    if model:
        rec["board"] = model
    rec["label"] = label or default_label(rec)
    return rec


def default_label(rec: dict[str, Any]) -> str:
    """A short name for the machine in comparison tables: the board, the GPU, or the CPU."""
    if rec.get("board"):
        return rec["board"]
    if rec.get("gpus"):
        return f"{rec['gpus'][0]['name']} / {rec['cpu']}"
    n = rec["threads_used"]
    return f"{rec['cpu']} ({n} thread{'s' if n != 1 else ''})"


def default_threads() -> int:
    """The performance cores this process may run on (physical cores; the LITTLE cores of a big.LITTLE CPU
    and the E-cores of a hybrid one left out; runtimes/host.py)."""
    return performance_threads()


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> dict[str, Any]:
    """Host memory bandwidth from the best of `repeats` copies of a `mib` buffer (read + write counted),
    far larger than the caches. One thread: a lower bound on machines whose bandwidth needs many cores."""
    n = mib * 2**20 // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page before timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return {"gbs": 2 * src.nbytes / best / 1e9, "method": f"numpy copy of {mib} MiB, best of {repeats}"}


def cuda_copy_bandwidth(mib: int = 1024, repeats: int = 10) -> dict[str, Any] | None:
    """GPU memory bandwidth from device-to-device copies (torch), or None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    src = torch.ones(mib * 2**20 // 4, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    nbytes = src.numel() * 4
    del src, dst
    torch.cuda.empty_cache()
    return {"gbs": 2 * nbytes / best / 1e9, "method": f"torch cuda copy of {mib} MiB, best of {repeats}"}


def rss_bytes() -> int:
    """This process's resident memory now (/proc/self/statm on Linux, psutil elsewhere)."""
    statm = _read("/proc/self/statm").split()
    if len(statm) > 1 and statm[1].isdigit():
        return int(statm[1]) * os.sysconf("SC_PAGE_SIZE")
    try:
        import psutil
    except ImportError:
        return peak_rss_bytes()  # the best figure left without psutil
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """This process's peak resident memory (see the module docstring for why not ru_maxrss on Linux)."""
    status = _read("/proc/self/status")
    m = re.search(r"^VmHWM:\s*(\d+)\s*kB", status, re.M)
    if m:
        return int(m.group(1)) * 1024
    try:
        import psutil

        info = psutil.Process().memory_info()
        if hasattr(info, "peak_wset"):  # Windows
            return int(info.peak_wset)
    except ImportError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


def reset_peak_rss() -> bool:
    """Start a new high-water mark (Linux: write 5 to /proc/self/clear_refs); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def gpu_memory_of(pid: int) -> int | None:
    """GPU memory nvidia-smi attributes to a process now (bytes), for runtimes that are not torch."""
    out = run_tool(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"], 10.0
    )
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            return int(parts[1]) * 2**20
    return None
