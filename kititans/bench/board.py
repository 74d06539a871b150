"""What a device is beyond its CPU model (torch-free: the bench pack's runner records it on the device):
the board or SoC (device tree, Android `getprop`, Jetson's release file), the cpufreq governor, and its
thermal state (temperatures, current clocks, the Raspberry Pi firmware's throttle flags) read before and
after each row, so a throttled row can be recognised in the report.

Everything here is best effort: a field that cannot be read on this system is left out, never guessed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from kititans.runtimes.host import cpu_list, read_text, run_tool, sysctl

ANDROID_PROPS = {
    "model": "ro.product.model",
    "manufacturer": "ro.product.manufacturer",
    "soc_manufacturer": "ro.soc.manufacturer",
    "soc_model": "ro.soc.model",
    "platform": "ro.board.platform",
    "android": "ro.build.version.release",
}


def board(root: str | Path = "/") -> dict[str, Any]:
    """Board/SoC facts: device-tree model and compatible strings (Raspberry Pi, Jetson, most ARM boards),
    Jetson's L4T release, Android properties (Termux), macOS model and unified memory."""
    root = Path(root)
    out: dict[str, Any] = {}
    model = read_text(root / "proc/device-tree/model")
    if model:
        out["model"] = model
    compatible = read_text(root / "proc/device-tree/compatible")
    if compatible:
        out["compatible"] = [c for c in compatible.split("\x00") if c]
    tegra = read_text(root / "etc/nv_tegra_release")
    if tegra:
        out["jetson_l4t"] = tegra.splitlines()[0]
        mode = run_tool(["nvpmodel", "-q"]) if str(root) == "/" else ""
        if mode:
            out["jetson_power_mode"] = " ".join(mode.split())
    soc = read_text(root / "sys/devices/soc0/soc_id") or read_text(root / "sys/devices/soc0/machine")
    if soc:
        out["soc"] = soc
    if str(root) == "/" and shutil.which("getprop"):
        props = {k: run_tool(["getprop", v]) for k, v in ANDROID_PROPS.items()}
        props = {k: v for k, v in props.items() if v}
        if props:
            out["android"] = props
    if sys.platform == "darwin" and str(root) == "/":
        out["mac_model"] = sysctl("hw.model")
        mem = sysctl("hw.memsize")
        if mem.isdigit():
            out["unified_memory_bytes"] = int(mem)
    return out


def governors(root: str | Path = "/") -> dict[str, list[int]]:
    """cpufreq governor -> the CPUs using it ('performance', 'schedutil', 'ondemand', ...)."""
    found: dict[str, list[int]] = {}
    base = Path(root) / "sys/devices/system/cpu/cpufreq"
    for policy in sorted(base.glob("policy*")):
        gov = read_text(policy / "scaling_governor")
        if gov:
            found.setdefault(gov, []).extend(cpu_list(read_text(policy / "affected_cpus")))
    return found


def temperatures(root: str | Path = "/") -> dict[str, float]:
    """Thermal zone type -> degrees Celsius (Linux, Android where readable, Jetson, Raspberry Pi)."""
    temps: dict[str, float] = {}
    for zone in sorted(Path(root).glob("sys/class/thermal/thermal_zone*")):
        raw = read_text(zone / "temp")
        if not re.fullmatch(r"-?\d+", raw):
            continue
        name = read_text(zone / "type") or zone.name
        if name in temps:
            name = f"{name} ({zone.name})"
        value = int(raw)
        temps[name] = value / 1000.0 if abs(value) > 200 else float(value)  # millidegrees on most kernels
    return temps


def clocks_mhz(root: str | Path = "/") -> dict[str, int]:
    """Current clock of each cpufreq policy in MHz (a throttled core runs below its maximum)."""
    out: dict[str, int] = {}
    base = Path(root) / "sys/devices/system/cpu/cpufreq"
    for policy in sorted(base.glob("policy*")):
        cur = read_text(policy / "scaling_cur_freq")
        if cur.isdigit():
            out[policy.name] = int(cur) // 1000
    return out


# bits of `vcgencmd get_throttled` (Raspberry Pi firmware)
THROTTLE_BITS = {
    0: "under-voltage now",
    1: "ARM frequency capped now",
    2: "throttled now",
    3: "soft temperature limit now",
    16: "under-voltage has occurred",
    17: "frequency capping has occurred",
    18: "throttling has occurred",
    19: "soft temperature limit has occurred",
}


def pi_throttled() -> dict[str, Any] | None:
    """The Raspberry Pi firmware's throttle flags, or None where vcgencmd is absent."""
    out = run_tool(["vcgencmd", "get_throttled"])
    m = re.search(r"throttled=(0x[0-9a-fA-F]+)", out)
    if not m:
        return None
    bits = int(m.group(1), 16)
    return {"raw": m.group(1), "flags": [t for b, t in THROTTLE_BITS.items() if bits >> b & 1]}


def thermal_state() -> dict[str, Any]:
    """Temperatures, clocks and throttle flags now (taken before and after each row)."""
    state: dict[str, Any] = {"temps_c": temperatures(), "clocks_mhz": clocks_mhz()}
    throttled = pi_throttled()
    if throttled is not None:
        state["pi_throttled"] = throttled
    return state


RUNTIME_PROBE = """
import importlib.util, json
out = {"llama_system_info": None, "onnx_providers": None}
if importlib.util.find_spec("llama_cpp"):
    import llama_cpp
    llama_cpp.llama_backend_init()
    out["llama_system_info"] = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
if importlib.util.find_spec("onnxruntime"):
    import onnxruntime
    out["onnx_providers"] = list(onnxruntime.get_available_providers())
print(json.dumps(out))
"""


def runtime_info() -> dict[str, Any]:
    """llama.cpp's system_info (its SIMD, REPACK, OpenMP and GPU backends) and onnxruntime's providers, where
    installed. Read in a child process: a runtime build that crashes on this CPU cannot take the bench down,
    and the runner's own memory stays free of their libraries."""
    import json

    try:
        r = subprocess.run([sys.executable, "-c", RUNTIME_PROBE], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        return {"llama_system_info": f"unavailable ({e})", "onnx_providers": None}
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        return {"llama_system_info": f"unavailable ({tail[:200]})", "onnx_providers": None}
    return json.loads(r.stdout.strip().splitlines()[-1])
