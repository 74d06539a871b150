"""CoreML weight compression with coremltools.optimize.coreml (research §3.2), and reading it back.

int8:        linear_symmetric int8, one fp16 scale per output channel  (constexpr_blockwise_shift_scale)
int4:        linear_symmetric int4, one fp16 scale per block of 32 inputs (constexpr_blockwise_shift_scale)
palettize4:  4-bit palettization, one 16-entry fp16 LUT per group of 16 output channels (constexpr_lut_to_dense);
             the LUT is a 1-D k-means computed here in numpy (coremltools' scikit-learn k-means took 30-50 s
             per function on a 1.3M-parameter model on 2 cores; this takes ~1 s and is deterministic, so the
             prefill and decode functions get identical weights and the package stores them once).
Tensors the family marks as float (RoPE tables, norms) are excluded by name, whatever their size.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from kititans.errors import require

SCHEMES = ("fp16", "int8", "int4", "palettize4")
INT4_BLOCK = 32
PALETTE_GROUP = 16
# relative Frobenius error ||W' - W|| / ||W|| a scheme may show on a trained weight
ERROR_BOUND = {"fp16": 1e-3, "int8": 0.02, "int4": 0.2, "palettize4": 0.2}


def coremltools(module: str = "coremltools", purpose: str = "CoreML export") -> Any:
    """Import coremltools (or a submodule) without its import-time chatter on Linux (untested torch and
    scikit-learn versions, no libcoremlpython), which would bury our one-line errors."""
    import warnings

    from kititans.quantize.onnx import quiet

    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return require(module, "coreml", purpose)


def kmeans_lut(values: np.ndarray, nbits: int = 4, iters: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means (Lloyd, quantile start) of one weight group: (LUT of 2**nbits sorted entries in the
    weight's dtype, uint8 index of the nearest entry for every value, flattened)."""
    x = values.astype(np.float32).ravel()
    k = 1 << nbits
    xs = np.sort(x)
    c = np.quantile(xs, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, xs)  # sorted data: nearest centroid by midpoints
        sums = np.bincount(idx, weights=xs, minlength=k)
        cnt = np.bincount(idx, minlength=k)
        new = np.sort(np.where(cnt > 0, sums / np.maximum(cnt, 1), c))
        if np.array_equal(new, c):
            break
        c = new
    lut = np.sort(c.astype(values.dtype))
    mids = (lut[1:].astype(np.float32) + lut[:-1].astype(np.float32)) / 2
    return lut, np.searchsorted(mids, x).astype(np.uint8)


def op_config(scheme: str) -> Any:
    """The coremltools op config of a scheme (None for fp16)."""
    cto = coremltools("coremltools.optimize.coreml", "CoreML compression")
    if scheme == "int8":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    if scheme == "int4":
        return cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=INT4_BLOCK
        )
    if scheme == "palettize4":
        return cto.OpPalettizerConfig(
            mode="custom",
            lut_function=kmeans_lut,
            granularity="per_grouped_channel",
            group_size=PALETTE_GROUP,
        )
    return None


def details(scheme: str) -> dict[str, Any]:
    """What the manifest records about a scheme."""
    return {
        "fp16": {"method": "none", "weights": "fp16"},
        "int8": {
            "method": "coremltools.optimize.coreml.linear_quantize_weights",
            "mode": "linear_symmetric",
            "dtype": "int8",
            "granularity": "per_channel",
            "mil_op": "constexpr_blockwise_shift_scale",
        },
        "int4": {
            "method": "coremltools.optimize.coreml.linear_quantize_weights",
            "mode": "linear_symmetric",
            "dtype": "int4",
            "granularity": "per_block",
            "block_size": INT4_BLOCK,
            "mil_op": "constexpr_blockwise_shift_scale",
        },
        "palettize4": {
            "method": "coremltools.optimize.coreml.palettize_weights",
            "mode": "custom (numpy 1-D k-means, quantile init)",
            "nbits": 4,
            "granularity": "per_grouped_channel",
            "group_size": PALETTE_GROUP,
            "mil_op": "constexpr_lut_to_dense",
        },
    }[scheme]


def compress(mlmodel: Any, scheme: str, keep_float: Callable[[str], bool]) -> tuple[Any, list[str]]:
    """Compress every weight const except those `keep_float(name)` selects; returns (model, kept names)."""
    if scheme == "fp16":
        return mlmodel, []
    cto = coremltools("coremltools.optimize.coreml", "CoreML compression")
    kept = [n for n in const_names(mlmodel) if keep_float(n)]
    config = cto.OptimizationConfig(global_config=op_config(scheme), op_name_configs=dict.fromkeys(kept))
    if scheme == "palettize4":
        return cto.palettize_weights(mlmodel, config), kept
    return cto.linear_quantize_weights(mlmodel, config), kept


def const_names(mlmodel: Any) -> list[str]:
    """Names of the array consts of a converted model, as cto.get_weights_metadata(weight_threshold=0) lists
    them; that function fails on a const feeding an op with a list input (a concat of persistent K/V)."""
    program = getattr(mlmodel, "_mil_program", None)  # set by ct.convert; None for a model read from disk
    if program is None:
        cto = coremltools("coremltools.optimize.coreml", "CoreML compression")
        return list(cto.get_weights_metadata(mlmodel, weight_threshold=0))
    names: list[str] = []

    def walk(block: Any) -> None:
        for op in block.operations:
            for inner in op.blocks:
                walk(inner)
            if op.op_type == "const" and isinstance(op.val.val, np.ndarray):
                names.append(op.name)

    for function in program.functions.values():
        walk(function)
    return names


def weight_values(function: Any) -> dict[str, np.ndarray]:
    """Every weight of a MIL function as the device sees it: const values and decompressed constexpr_*
    outputs (keyed by the original const name, without the _quantized/_palettized suffix)."""
    out: dict[str, np.ndarray] = {}
    for op in function.operations:
        if op.op_type.startswith("constexpr_"):
            name = op.name.removesuffix("_quantized").removesuffix("_palettized")
            out[name] = np.asarray(op.materialized_val_inference())
        elif op.op_type == "const" and isinstance(op.outputs[0].val, np.ndarray):
            out[op.name] = op.outputs[0].val
    return out


def proto_op_histogram(spec: Any) -> dict[str, dict[str, int]]:
    """Op types per function as serialized in the package (what the device will run), nested blocks too."""

    def walk(block: Any, counts: collections.Counter) -> None:
        for op in block.operations:
            counts[op.type] += 1
            for inner in op.blocks:
                walk(inner, counts)

    out = {}
    for name, fn in spec.mlProgram.functions.items():
        counts: collections.Counter = collections.Counter()
        walk(fn.block_specializations[fn.opset], counts)
        out[name] = dict(counts.most_common())
    return out


def unsupported_ops(op_types: Iterable[str], target: Any) -> list[str]:
    """Op types the deployment target's MIL opset does not define. write_state has no builder class in
    coremltools (it is how coreml_update_state is serialized) and exists from iOS18 on, like read_state."""
    ct = coremltools(purpose="CoreML validation")
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    serialized_only = {"write_state": ct.target.iOS18}

    def ok(t: str) -> bool:
        if target in SSAOpRegistry.core_ops.get(t, {}):
            return True
        return t in serialized_only and target.value >= serialized_only[t].value

    return sorted(t for t in set(op_types) if not ok(t))


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    """||got - ref|| / ||ref|| in fp32."""
    ref32 = ref.astype(np.float32)
    return float(np.linalg.norm(got.astype(np.float32) - ref32) / max(np.linalg.norm(ref32), 1e-12))
