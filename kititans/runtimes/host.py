"""The host CPU as the runtimes see it, without torch (the bench pack's runner imports this on a device):
its core types and how many performance cores it has (big.LITTLE phones and boards, Intel hybrid, Apple P/E
cores), and whether llama.cpp's weight repacking is safe here.

Performance cores: on Linux/Android, CPUs are grouped by `cpu_capacity` (arm64's relative core speed), else by
`cpuinfo_max_freq`; with more than one group, the slowest group is the LITTLE cluster and the rest are the
performance cores. Intel hybrid CPUs list their P-cores in /sys/devices/cpu_core/cpus; macOS tells
`hw.perflevel0.physicalcpu`. SMT siblings count once. llama.cpp itself skips E-cores only on x86-64 Linux
(research/wave3.md §0), so on a phone its default threads include the LITTLE cores; ours do not.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

# ARM "CPU part" ids (/proc/cpuinfo, implementer 0x41) of the cores found in boards, phones and Jetsons
ARM_PARTS = {
    "0xd03": "Cortex-A53",
    "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55",
    "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75",
    "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1",
    "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1",
    "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE",
    "0xd44": "Cortex-X1",
    "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710",
    "0xd48": "Cortex-X2",
    "0xd49": "Neoverse-N2",
    "0xd4b": "Cortex-A78C",
    "0xd4d": "Cortex-A715",
    "0xd4e": "Cortex-X3",
    "0xd4f": "Neoverse-V2",
    "0xd80": "Cortex-A520",
    "0xd81": "Cortex-A720",
    "0xd82": "Cortex-X4",
    "0xd87": "Cortex-A725",
    "0xd85": "Cortex-X925",
}


def read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return ""


def run_tool(cmd: list[str], timeout: float = 5.0) -> str:
    """A system tool's stripped stdout ('' when the tool is absent, fails to start or times out)."""
    if not shutil.which(cmd[0]):
        return ""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def sysctl(key: str) -> str:
    """A macOS sysctl value ('' elsewhere or when unknown)."""
    return run_tool(["sysctl", "-n", key]) if sys.platform == "darwin" else ""


def cpu_list(text: str) -> list[int]:
    """'0-3,6' (or '0 1 2 3 6', as affected_cpus lists them) -> [0, 1, 2, 3, 6]."""
    out: list[int] = []
    for part in re.split(r"[,\s]+", text):
        part = part.strip()
        if not part:
            continue
        a, _, b = part.partition("-")
        if a.isdigit() and (not b or b.isdigit()):
            out += list(range(int(a), int(b or a) + 1))
    return out


def _arm_parts(root: Path) -> dict[int, str]:
    """CPU number -> core name from /proc/cpuinfo's per-processor "CPU part" lines (ARM only)."""
    parts: dict[int, str] = {}
    for block in read_text(root / "proc/cpuinfo").split("\n\n"):
        cpu = re.search(r"^processor\s*:\s*(\d+)", block, re.M)
        part = re.search(r"^CPU part\s*:\s*(0x[0-9a-fA-F]+)", block, re.M)
        if cpu and part:
            parts[int(cpu.group(1))] = ARM_PARTS.get(part.group(1).lower(), f"part {part.group(1)}")
    return parts


def _allowed(root: Path) -> list[int]:
    online = cpu_list(read_text(root / "sys/devices/system/cpu/online"))
    if str(root) == "/" and hasattr(os, "sched_getaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        return [c for c in online if c in allowed] or allowed
    return online or list(range(os.cpu_count() or 1))


def _linux_cores(root: Path) -> dict[str, Any]:
    cpus = _allowed(root)
    sysd = root / "sys/devices/system/cpu"

    def num(cpu: int, rel: str) -> int | None:
        v = read_text(sysd / f"cpu{cpu}" / rel)
        return int(v) if v.isdigit() else None

    siblings = {c: read_text(sysd / f"cpu{c}/topology/thread_siblings_list") or str(c) for c in cpus}
    parts = _arm_parts(root)
    p_cores = set(cpu_list(read_text(root / "sys/devices/cpu_core/cpus")))
    e_cores = set(cpu_list(read_text(root / "sys/devices/cpu_atom/cpus")))
    capacity = {c: num(c, "cpu_capacity") for c in cpus}
    max_khz = {c: num(c, "cpufreq/cpuinfo_max_freq") for c in cpus}
    if p_cores and e_cores:  # Intel hybrid
        group, method = {c: 1 if c in p_cores else 0 for c in cpus}, "/sys/devices/cpu_core (Intel hybrid)"
    elif all(capacity.values()) and len(set(capacity.values())) > 1:
        group, method = {c: capacity[c] or 0 for c in cpus}, "cpu_capacity"
    elif all(max_khz.values()) and len(set(max_khz.values())) > 1:
        group, method = {c: max_khz[c] or 0 for c in cpus}, "cpuinfo_max_freq"
    else:
        group, method = {c: 0 for c in cpus}, "one core type"
    levels = sorted(set(group.values()), reverse=True)
    clusters = []
    for level in levels:
        members = [c for c in cpus if group[c] == level]
        names = sorted({parts[c] for c in members if c in parts})
        kind = (
            ("P-core" if level else "E-core")
            if method.startswith("/sys/devices/cpu_core")
            else ("/".join(names) or None)
        )
        clusters.append(
            {
                "cpus": members,
                "cores": len({siblings[c] for c in members}),
                "type": kind,
                "capacity": capacity[members[0]],
                "max_mhz": max_khz[members[0]] // 1000 if max_khz[members[0]] else None,
            }
        )
    perf = [c for c in cpus if len(levels) == 1 or group[c] != levels[-1]]
    return {
        "clusters": clusters,
        "performance_cpus": perf,
        "performance_cores": len({siblings[c] for c in perf}),
        "physical_cores": len({siblings[c] for c in cpus}),
        "logical_cpus": len(cpus),
        "method": method,
    }


def _mac_cores() -> dict[str, Any]:
    levels = int(sysctl("hw.nperflevels") or 0)
    clusters = []
    for i in range(levels):
        n = sysctl(f"hw.perflevel{i}.physicalcpu")
        clusters.append({"cores": int(n) if n.isdigit() else None, "type": sysctl(f"hw.perflevel{i}.name")})
    physical = int(sysctl("hw.physicalcpu") or os.cpu_count() or 1)
    perf = clusters[0]["cores"] if clusters and clusters[0]["cores"] else physical
    return {
        "clusters": clusters,
        "performance_cores": perf,
        "physical_cores": physical,
        "logical_cpus": int(sysctl("hw.logicalcpu") or os.cpu_count() or 1),
        "method": "hw.perflevel sysctl" if clusters else "hw.physicalcpu",
    }


def core_types(root: str | Path = "/") -> dict[str, Any]:
    """The CPU's core clusters (type, cores, capacity, max MHz), its performance cores and physical cores."""
    if sys.platform == "darwin" and str(root) == "/":
        return _mac_cores()
    if (Path(root) / "sys/devices/system/cpu").is_dir():
        return _linux_cores(Path(root))
    n = os.cpu_count() or 1
    return {
        "clusters": [],
        "performance_cores": n,
        "physical_cores": n,
        "logical_cpus": n,
        "method": "cpu_count",
    }


def performance_threads() -> int:
    """Default thread count: the performance cores this process may run on (physical, SMT counted once)."""
    return max(1, int(core_types()["performance_cores"] or 1))


def cpu_flags(root: str | Path = "/") -> set[str]:
    """The x86 feature flags (or ARM "Features") of the first CPU in /proc/cpuinfo."""
    m = re.search(r"^(flags|Features)\s*:\s*(.+)$", read_text(Path(root) / "proc/cpuinfo"), re.M)
    return set(m.group(2).split()) if m else set()


def repack_default(system_info: str = "", flags: set[str] | None = None) -> tuple[bool, str]:
    """(on, why) for llama.cpp weight repacking (`use_extra_bufts`): on, unless the CPU or the llama.cpp build
    has AMX, whose extra buffer type crashed multi-token decode of quantized models (research/gguf_llamacpp.md
    §5.5; ggml #20824)."""
    flags = cpu_flags() if flags is None else flags
    amx = sorted(f for f in flags if f.startswith("amx"))
    if amx or "AMX_INT8 = 1" in system_info:
        what = ", ".join(amx) if amx else "AMX_INT8 in llama.cpp's system_info"
        return False, f"off: AMX CPU ({what}), whose repack path crashed multi-token decode"
    arch = platform.machine().lower()
    return True, f"on: no AMX ({arch})"
