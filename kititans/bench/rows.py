"""The rows a bench measures for one (runtime, quant) pair, each with the settings it ran with, and the
numbers derived from a measured row (roofline). Shared by `kititans bench` and a bench pack's runner, so it
is torch-free.

Per-row settings (recorded in each result's `settings`):
    llama.cpp   repack auto (on unless the CPU/build has AMX, runtimes/host.py) | on | off | both (two rows),
                n_gpu_layers (0 = CPU; -1 = all layers; `placement` says where the row ran)
    CoreML      compute units cpu, cpu+gpu, cpu+ane, all: one row each (key `coreml:int4@cpu+ane`)
    all         threads, OpenMP wait policy (passive | active | unset = the library's default), delay
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from kititans.bench import artifact as art

COREML_UNITS = ("cpu", "cpu+gpu", "cpu+ane", "all")
REPACK = ("auto", "on", "off", "both")
OMP_POLICIES = ("passive", "active", "unset")


@dataclass
class RowOptions:
    repack: str = "auto"
    n_gpu_layers: int = 0
    coreml_units: tuple[str, ...] = COREML_UNITS


@dataclass(frozen=True)
class Row:
    runtime: str
    quant: str
    label: str = ""  # "" when the pair has one row
    settings: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def pair_key(self) -> str:
        return f"{self.runtime}:{self.quant}"

    @property
    def key(self) -> str:
        return f"{self.pair_key}@{self.label}" if self.label else self.pair_key

    @property
    def slug(self) -> str:
        return self.key.replace(":", "-").replace("@", "-").replace("+", "_").replace("=", "")


def rows_for(runtime: str, quant: str, opts: RowOptions) -> list[Row]:
    """The rows of one pair: several for CoreML compute units and for --repack both, else one."""
    if runtime == "llamacpp":
        base = {"n_gpu_layers": opts.n_gpu_layers}
        if opts.repack == "both":
            return [
                Row(runtime, quant, "repack", {**base, "repack": True}),
                Row(runtime, quant, "no-repack", {**base, "repack": False}),
            ]
        choice = {"auto": None, "on": True, "off": False}[opts.repack]
        return [Row(runtime, quant, "", {**base, "repack": choice})]
    if runtime == "coreml":
        return [Row(runtime, quant, u, {"coreml_units": u}) for u in opts.coreml_units]
    return [Row(runtime, quant)]


def check_options(opts: RowOptions) -> RowOptions:
    """The options with their names checked (a KititansError names the valid ones)."""
    from kititans.errors import KititansError

    if opts.repack not in REPACK:
        raise KititansError(f"--repack {opts.repack!r}: use one of {', '.join(REPACK)}")
    bad = [u for u in opts.coreml_units if u not in COREML_UNITS]
    if bad or not opts.coreml_units:
        raise KititansError(
            f"--coreml-units {bad[0] if bad else ''!r}: use some of {', '.join(COREML_UNITS)}"
        )
    return opts


def roofline(
    row: dict[str, Any], dims: dict[str, int], bw: dict[str, Any], device: str, gen_tokens: int
) -> dict[str, Any] | None:
    """Decode tokens/s against the bandwidth bound BW / (weight bytes + KV bytes read per token)."""
    decode = (row.get("speed") or {}).get("decode")
    if not decode or not row.get("weight_bytes_per_token"):
        return None
    on_gpu = device.startswith("cuda") and row["runtime"] in ("torch", "onnx", "genai")
    gbs = bw.get("given_gbs") or (bw.get("gpu_gbs") if on_gpu else bw.get("cpu_gbs"))
    if not gbs:
        return None
    n_past = 1 + row["speed"].get("gen_tokens", gen_tokens) / 2  # the mean depth of the decode test
    kv = art.kv_bytes_per_token(dims, n_past, art.kv_element_bytes(row["runtime"], row["quant"]))
    per_token = row["weight_bytes_per_token"] + kv
    bound = gbs * 1e9 / per_token
    return {
        "bandwidth_gbs": gbs,
        "bytes_per_token": per_token,
        "kv_bytes_per_token": kv,
        "bound_tps": bound,
        "fraction": decode["median"] / bound,
    }


def placement(row: dict[str, Any], device: str) -> str:
    """Where a measured row ran, from its runtime's own record (llama.cpp layers, ONNX provider, CoreML
    units), else the bench's device."""
    where = (row.get("runtime_settings") or {}).get("placement")
    return str(where) if where else device


UNITS = {
    "speed.prefill": "tokens/s per prompt length (median, min, max, q1, q3, mean, stdev over trials)",
    "speed.decode": "tokens/s",
    "speed.ttft_ms": "milliseconds from the prompt to the first chosen token, per prompt length",
    "*_bytes": "bytes",
    "*_s": "seconds",
    "bandwidth.*_gbs": "GB/s (1e9 bytes/s)",
    "bits_per_weight": "8 x weight bytes read per token / parameters read per token",
    "quality.ppl_drift_pct": "percent, 100 x (PPL / PPL(reference) - 1)",
    "quality.kld_*": "nats, KL(reference || pair) per token",
    "quality.same_top": "fraction of tokens whose most likely next token equals the reference's",
    "quality.delta_p_*": "probability of the true next token, pair minus reference",
    "roofline.fraction": "decode tokens/s / (bandwidth / bytes per token)",
    "thermal.*.temps_c": "degrees Celsius per thermal zone, before and after the row",
}


# ------------------------------------------------------------------------------------------ flags


def _units(value: str) -> list[str]:
    units = [u.strip() for u in value.split(",") if u.strip()]
    bad = [u for u in units if u not in COREML_UNITS]
    if bad or not units:
        raise argparse.ArgumentTypeError(f"use some of {','.join(COREML_UNITS)}")
    return units


def add_row_options(p: argparse.ArgumentParser) -> None:
    """The per-row settings flags of `kititans bench` and a bench pack's run.py."""
    g = p.add_argument_group("row settings")
    g.add_argument(
        "--repack",
        choices=REPACK,
        default="auto",
        help="llama.cpp weight repacking: auto = on unless the CPU has AMX; both = one row each (default auto)",
    )
    g.add_argument(
        "--n-gpu-layers",
        type=int,
        default=0,
        metavar="N",
        help="llama.cpp layers on the GPU (-1 = all; default 0)",
    )
    g.add_argument(
        "--coreml-units",
        type=_units,
        default=list(COREML_UNITS),
        metavar="U,U",
        help="CoreML compute units, one row each (default cpu,cpu+gpu,cpu+ane,all)",
    )
    g.add_argument(
        "--omp-wait-policy",
        choices=OMP_POLICIES,
        default=None,
        help="OpenMP threads between ops: passive (sleep; shared machines), active (spin), unset (the "
        "library's default, as llama-bench runs); default: $OMP_WAIT_POLICY or passive",
    )
    g.add_argument(
        "--delay", type=float, default=0.0, metavar="S", help="seconds of rest before each trial and row"
    )
