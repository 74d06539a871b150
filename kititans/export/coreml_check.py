"""Validation of a CoreML package without a CoreML runtime (research §3.5), for export/coreml.py: the spec has
the wrapper's functions, inputs, outputs and fp16 states; every MIL op exists in the target's opset and the
scheme's compression ops are there; the decompressed weights match the PyTorch weights within the scheme's
error; the converted wrapper equals the model's parallel forward (fp32, fp64, and with fp16 state storage)."""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kititans.quantize import coreml as cq
from kititans.quantize.onnx import quiet

SPEC_DTYPES = {65552: "fp16", 65568: "fp32", 131104: "int32"}
SPEC_DTYPES_NP = {"float16": "fp16", "float32": "fp32", "int32": "int32"}


def validate_package(
    path: Path, ckpt: Any, quant: str, step_cls: Any, target: Any, max_len: int, prefill_len: int
) -> dict[str, Any]:
    """Check a package without a CoreML runtime (research §3.5); `problems` lists what failed."""
    ct = cq.coremltools(purpose="CoreML validation")
    from coremltools.converters.mil.frontend.milproto.load import load

    problems: list[str] = []
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
        prog = load(spec, spec.specificationVersion, str(Path(path) / "Data/com.apple.CoreML/weights"))
    step = step_cls(copy.deepcopy(ckpt.model).float().eval(), max_len=max_len, prefill_len=prefill_len)
    functions = {f.name: f for f in spec.description.functions}
    expected = sorted(step.functions())  # decode + prefill, or the wrapper's own set
    if sorted(functions) != expected:
        problems.append(f"functions {sorted(functions)} != {expected}")
    io = {name: _function_io(f) for name, f in functions.items()}
    dtypes = {n: SPEC_DTYPES_NP.get(d, d) for n, d in step.input_dtypes.items()}
    for name, f in io.items():
        if list(f["inputs"]) != list(step.input_names) or f["outputs"] != list(step.output_names):
            problems.append(f"{name}: inputs/outputs {list(f['inputs'])}/{f['outputs']}")
        if wrong := [n for n, i in f["inputs"].items() if i["dtype"] != dtypes.get(n)]:
            problems.append(f"{name}: input dtypes {[(n, f['inputs'][n]['dtype']) for n in wrong]}")
        if sorted(f["states"]) != sorted(step.state_names):
            problems.append(f"{name}: states {sorted(f['states'])} != {sorted(step.state_names)}")
        if wrong := [n for n, st in f["states"].items() if st["dtype"] != "fp16"]:
            problems.append(f"{name}: states not fp16: {', '.join(wrong)}")
    ops = cq.proto_op_histogram(spec)
    bad = cq.unsupported_ops({t for h in ops.values() for t in h}, target)
    if bad:
        problems.append(f"ops outside the {target.name} opset: {', '.join(bad)}")
    required = set(step.required_ops)
    required |= {
        "int8": {"constexpr_blockwise_shift_scale"},
        "int4": {"constexpr_blockwise_shift_scale"},
    }.get(quant, {"constexpr_lut_to_dense"} if quant == "palettize4" else set())
    for name, h in ops.items():
        if missing := sorted(required - set(h)):
            problems.append(f"{name}: missing ops {', '.join(missing)}")
    weights = weight_report(list(prog.functions.values()), step, quant)
    if weights["max_relative_error"] > cq.ERROR_BOUND[quant]:
        problems.append(
            f"weight error {weights['max_relative_error']:.4f} > {cq.ERROR_BOUND[quant]} ({quant})"
        )
    if weights["missing"]:
        problems.append(f"weights not found in the package: {', '.join(weights['missing'][:3])}")
    if weights["compressed_but_float"]:
        problems.append(f"compressed a tensor that must stay fp16: {weights['compressed_but_float'][0]}")
    if hasattr(step, "check_program"):  # the wrapper's own checks of the converted program
        problems += step.check_program(prog)
    wrapper = wrapper_report(step, ckpt.model)
    if wrapper["max_abs_diff_fp64"] > 1e-9 or wrapper["max_abs_diff_fp32"] > 1e-4:
        problems.append(f"the converted wrapper differs from the model: {wrapper}")
    return {
        "problems": problems,
        "spec": {"specification_version": spec.specificationVersion, "functions": io},
        "ops": ops,
        "weights": weights,
        "wrapper": wrapper,
    }


def _function_io(f: Any) -> dict[str, Any]:
    def arr(t: Any) -> dict[str, Any]:
        a = t.multiArrayType
        ranges = [[r.lowerBound, r.upperBound] for r in a.shapeRange.sizeRanges]
        return {
            "dtype": SPEC_DTYPES.get(a.dataType, str(a.dataType)),
            "shape": list(a.shape),
            "range": ranges,
        }

    return {
        "inputs": {i.name: arr(i.type) for i in f.input},
        "outputs": [o.name for o in f.output],
        "states": {
            s.name: {
                "dtype": SPEC_DTYPES.get(s.type.stateType.arrayType.dataType),
                "shape": list(s.type.stateType.arrayType.shape),
            }
            for s in f.state
        },
    }


def weight_report(functions: list[Any], step: nn.Module, quant: str) -> dict[str, Any]:
    """Decompressed package weights (of every function: one may use a weight that another uses only in
    part) vs the PyTorch weights: relative error per parameter; and which consts were compressed (none of
    the family's keep_float ones may be)."""
    # per function: a derived const's name (slice_7, ...) means different tensors in different functions
    per_function = [cq.weight_values(f) for f in functions]
    values = {k: v for vals in reversed(per_function) for k, v in vals.items() if k.startswith("p_")}
    derived = [v for vals in per_function for v in vals.values()]
    aliases: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in step.named_parameters(remove_duplicate=False):  # a tied weight has two names
        aliases.setdefault(id(p), []).append(name)
        params[id(p)] = p
    errors, missing, folded = {}, [], []
    folds = tuple(getattr(step, "folded_params", ()))
    for pid, names in aliases.items():
        # a weight of an fp16 op is stored as <name>_to_fp16, one of an fp32 op under its own name
        keys = ["p_" + n.replace(".", "_") + suffix for n in names for suffix in ("_to_fp16", "")]
        key = next((k for k in keys if k in values), None)
        ref = params[pid].detach().numpy()
        if key is not None:
            errors[names[0]] = cq.relative_error(values[key], ref)
        elif (err := _row_blocks_error(ref, derived, cq.ERROR_BOUND[quant])) is not None:
            errors[names[0]] = err
        else:
            (folded if any(f in names[0] for f in folds) else missing).append(names[0])
    compressed = sorted(
        {op.name for f in functions for op in f.operations if op.op_type.startswith("constexpr_")}
    )
    worst = max(errors, key=errors.get) if errors else None
    return {
        "scheme": quant,
        "bound": cq.ERROR_BOUND[quant],
        "max_relative_error": float(errors[worst]) if worst else 0.0,
        "mean_relative_error": float(np.mean(list(errors.values()))) if errors else 0.0,
        "worst": worst,
        "per_parameter": {k: round(v, 6) for k, v in errors.items()},
        "missing": missing,
        "folded": folded,  # folded into a derived const by coremltools (the wrapper says which may be)
        "compressed": len(compressed),
        "compressed_but_float": [n for n in compressed if any(k in n for k in step.keep_float)],
    }


def _row_blocks_error(ref: np.ndarray, values: list[np.ndarray], bound: float) -> float | None:
    """A matrix the program uses only in row blocks (coremltools folds a sliced parameter into consts named
    after the slice): the worst relative error of the consts that tile its rows, each placed by its first
    row; None when some row is not found within the bound."""
    if ref.ndim != 2:
        return None
    covered, worst = np.zeros(ref.shape[0], bool), 0.0
    ref32 = ref.astype(np.float32)
    for v in values:
        if v.ndim != 2 or v.shape[1] != ref.shape[1] or v.shape[0] >= ref.shape[0]:
            continue
        at = int(np.argmin(np.linalg.norm(ref32 - v[0].astype(np.float32), axis=1)))
        if at + v.shape[0] > ref.shape[0]:
            continue
        err = cq.relative_error(v, ref[at : at + v.shape[0]])
        if err <= bound:
            covered[at : at + v.shape[0]] = True
            worst = max(worst, err)
    return worst if covered.all() else None


def wrapper_report(step: nn.Module, model: nn.Module) -> dict[str, Any]:
    """The converted wrapper (static state, in-place updates, its own inputs) against the training model's
    parallel forward over the wrapper's `check_plan`, in fp32 and fp64 (fp64 shows the math is the same).
    A wrapper whose buffers are fp16 (the package's states) is also run as it is, to show what fp16 state
    storage alone costs."""
    plan = step.check_plan()
    n = plan[-1][0] + plan[-1][1]
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    numerics = getattr(step, "numerics", lambda dtype, *modules: contextlib.nullcontext())
    fp16_state = any(b.dtype == torch.float16 for b in step.buffers()) or hasattr(step, "fp16_state_copy")
    runs = [("float32", torch.float32), ("float64", torch.float64)]
    runs += [("fp16_state", None)] if fp16_state else []
    diffs: dict[str, float] = {}
    for key, dtype in runs:
        ref_model = copy.deepcopy(model).to(dtype or torch.float32)
        if dtype:
            s = copy.deepcopy(step).to(dtype)
        else:  # the package's fp16 state storage
            s = step.fp16_state_copy() if hasattr(step, "fp16_state_copy") else copy.deepcopy(step)
        s.reset()
        with numerics(dtype or torch.float32, ref_model, s), torch.no_grad():
            ref = ref_model(ids)[0]
            got = []
            for start, t in plan:
                chunk = ids[:, start : start + t]
                got.append(s(*s.feeds(chunk, start))[0])
        diffs[key] = float((torch.cat(got).to(ref.dtype) - ref).abs().max())
    out: dict[str, Any] = {
        "max_abs_diff_fp32": diffs["float32"],
        "max_abs_diff_fp64": diffs["float64"],
        "tokens": n,
    }
    if fp16_state:
        out["max_abs_diff_fp16_state"] = diffs["fp16_state"]  # informative: what fp16 storage costs
    return out
