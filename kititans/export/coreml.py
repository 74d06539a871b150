"""CoreML export: an iOS18/macOS15 ML Program with the KV cache as state (research §3).

The family's wrapper (`FamilySpec.formats["coreml"]`, see kititans/models/lite_export.py) holds the cache as
buffers; `torch.export` + `run_decompositions` + `ct.convert` turn them into fp16 `MLState`s. Each of the
wrapper's functions (decode: one token; prefill: 1..prefill_len tokens; both any position) is converted on
its own, compressed, and merged into one multifunction .mlpackage whose weights are stored once.

A CoreML model cannot run on Linux, so the export validates the package it wrote (research §3.5): the
converted PyTorch wrapper equals the model, the spec has the expected inputs/outputs/states, every MIL op
exists in the target's opset, and the decompressed weights match the PyTorch weights within the scheme's
error. The report goes into the manifest (RUN/export/model.<quant>.mlpackage.json).

Besides the attributes of kititans/models/lite_export.py, a wrapper describes itself with
    input_dtypes         {input name: numpy dtype name}
    required_ops         MIL ops every function must contain
    feeds(ids, start)    forward's inputs for ids (1, T) at positions start..start+T-1
    check_plan()         [(start, tokens)] calls the export check runs against the parallel forward
and optionally (the defaults are Lite's: a KV cache addressed by an additive causal mask)
    kind                 "kv_cache" | "recurrent" (a fixed-size state: no length limit)
    prefill_exact        True: prefill takes exactly prefill_len tokens at a multiple of prefill_len
    numerics(dtype, *m)  a context the float64 check runs in; default none
    fp32_compute         {"code": files, "except_ops": op types, "angles": bool}: what keeps fp32 compute
                         (see compute_precision); default none: all fp16
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kititans.errors import KititansError, UnsupportedExport
from kititans.export import ExportOptions, ExportResult, QuantType, base_manifest, write_manifest
from kititans.export.coreml_meta import stamp_package, write_coreml_tokenizer
from kititans.files import atomic_path, dir_size
from kititans.quantize import coreml as cq
from kititans.quantize.onnx import quiet

FORMAT = "coreml"
QUANTS = {
    "fp16": QuantType("fp16", 16.0, "float16 weights and compute"),
    "int8": QuantType("int8", 8.0, "int8 per-channel linear quantization (constexpr_blockwise_shift_scale)"),
    "int4": QuantType("int4", 4.5, "int4 per-block (32) linear quantization, fp16 scales (iOS18+)"),
    "palettize4": QuantType("palettize4", 4.0, "4-bit k-means palettization, a 16-entry LUT per 16 channels"),
}
SHORTHANDS = {"q8": "int8", "q4": "int4"}
DEFAULT_QUANT = "fp16"
MIN_TARGET = (
    "iOS18"  # MLState (the KV cache), per-block int4 and grouped palettization all need iOS18/macOS15
)
FUNCTIONS = ("decode", "prefill")
SPEC_DTYPES = {65552: "fp16", 65568: "fp32", 131104: "int32"}
SPEC_DTYPES_NP = {"float16": "fp16", "float32": "fp32", "int32": "int32"}


def _var_mean(x: torch.Tensor, dim: Any = None, *, correction: Any = None, keepdim: bool = False) -> tuple:
    """aten.var_mean in ops coremltools converts (its own decomposition lands on prims.var, which it lacks)."""
    mean = x.mean(dim, keepdim=True)
    d = x - mean
    n = x.numel() // mean.numel()
    var = (d * d).sum(dim, keepdim=keepdim) / (n - (1 if correction is None else correction))
    return var, mean if keepdim else mean.squeeze(dim)


def _zeros_like(x: torch.Tensor, **_: Any) -> torch.Tensor:
    """x * 0: coremltools folds a zeros_like of a static shape into a stored all-zero const (Titans: one per
    memory weight and function, 2 x 64 KB in titans-debug); of a finite x the product is the same zeros."""
    return x * 0


def decompositions() -> dict:
    """ATen ops coremltools 9 has no converter for, or converts badly, rewritten in ones it converts well
    (none occur in Lite's graph)."""
    aten = torch.ops.aten
    return {
        aten.__and__.Tensor: aten.logical_and.default,  # boolean masks combined with `&`
        aten.var_mean.correction: _var_mean,
        aten.alias.default: aten.clone.default,
        aten.zeros_like.default: _zeros_like,
    }


def deployment_target(name: str) -> Any:
    """ct.target for `name`; anything below iOS18/macOS15 is refused with the reason."""
    ct = cq.coremltools()
    target = getattr(ct.target, name, None)
    if target is None:
        valid = ", ".join(t.name for t in ct.target if t.value >= ct.target.iOS18.value)
        raise UnsupportedExport(f"unknown CoreML deployment target {name!r}; valid: {valid}")
    if target.value < ct.target.iOS18.value:
        raise UnsupportedExport(
            f"CoreML target {name} is too old: the KV cache is an MLState and int4 per-block / grouped "
            "palettization are iOS18 features; use iOS18 or macOS15 (or newer)"
        )
    return target


def export(ckpt: Any, quant: str, out: Path, options: ExportOptions) -> ExportResult:
    """Convert decode + prefill, compress, merge, validate, write the package and its manifest.

    options.extra: target (default iOS18), max_len (positions, default the context), prefill_len (128).
    """
    ct = cq.coremltools()
    step_cls = ckpt.spec.support(FORMAT)
    if options.imatrix:
        raise UnsupportedExport("--imatrix applies to gguf only; CoreML compression is data-free here")
    target_name = str(options.extra.get("target", MIN_TARGET))
    target = deployment_target(target_name)
    model = copy.deepcopy(ckpt.model).float().eval()
    step = step_cls(
        model, max_len=options.extra.get("max_len"), prefill_len=options.extra.get("prefill_len", 128)
    )
    keep = lambda name: any(part in name for part in step.keep_float)  # noqa: E731
    out = Path(out)
    # tokenizer.json and the rest for the app first: one error line before any conversion work
    tokenizer_dir = write_coreml_tokenizer(ckpt, out.parent / "tokenizer")
    bar = tqdm(
        total=2 * len(step.functions()) + 2, desc=f"coreml {quant}", disable=not options.progress, leave=False
    )
    kept: list[str] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as work_dir, state_pass_fix():
        work = Path(work_dir)
        parts = {}
        for fn, (example, shapes) in step.functions().items():
            bar.set_postfix_str(f"convert {fn}")
            module = step.function(fn) if hasattr(step, "function") else step  # one module per function
            mlmodel = convert(ct, module, example, shapes, target)
            bar.update()
            bar.set_postfix_str(f"compress {fn}")
            with quiet(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mlmodel, kept = cq.compress(mlmodel, quant, keep)
            parts[fn] = work / f"{fn}.mlpackage"
            mlmodel.save(str(parts[fn]))
            bar.update()
        bar.set_postfix_str("merge")
        desc = ct.utils.MultiFunctionDescriptor()
        for fn, path in parts.items():
            desc.add_function(str(path), src_function_name="main", target_function_name=fn)
        desc.default_function_name = "decode"
        merged = work / "model.mlpackage"
        with quiet():
            ct.utils.save_multifunction(desc, str(merged))
        bar.update()
        bar.set_postfix_str("validate")
        report = validate_package(merged, ckpt, quant, step_cls, target, step.max_len, step.prefill_len)
        bar.update()
        bar.close()
        if report["problems"]:
            raise KititansError(f"the CoreML package failed validation: {report['problems'][0]}")
        single = dir_size(parts["decode"])
        # author / description / version / license and kititans.* userDefined entries in the spec
        layout = {"max_len": step.max_len, "prefill_len": step.prefill_len, **interface(step)}
        metadata = stamp_package(merged, ckpt, layout, options.extra.get("license"))
        with atomic_path(out) as tmp:  # every file 0644
            shutil.move(str(merged), str(tmp))
    session = session_files(step, out)
    manifest = base_manifest(ckpt, FORMAT, quant, out)
    manifest.update(
        coreml={
            "deployment_target": target_name,
            "specification_version": report["spec"]["specification_version"],
            "functions": report["spec"]["functions"],
            "default_function": "decode",
            "max_len": step.max_len,
            "prefill_len": step.prefill_len,
            "single_function_bytes": single,
            **interface(step),
            **session,
        },
        quantization={**cq.details(quant), "kept_float": kept},
        metadata=metadata,
        validation=report,
        tokenizer=str(tokenizer_dir.relative_to(out.parent)),
        next=[
            f"open {out.name} in Xcode, or see docs/ios.md (Swift: load, feed tokens, read logits)",
            f"kititans generate {out} --prompt 'Once upon a time' --device auto   # macOS 15+",
        ],
    )
    mpath = write_manifest(out, manifest)
    return ExportResult(out, mpath, manifest)


def session_files(step: nn.Module, out: Path) -> dict[str, Any]:
    """A recurrent package's session layout (kititans/runtimes/session.py), for the manifest, and the W_0 of
    its memory states beside the package (`<package>.session.safetensors`): what the runtime needs to load a
    session saved by another runtime, or to save one they can load."""
    if not hasattr(step, "session_layout"):
        return {}
    from safetensors.torch import save_file

    base = out.with_name(out.name + ".session.safetensors")
    with atomic_path(base) as tmp:
        save_file(step.memory_base(), str(tmp))
    return {"session": {**step.session_layout(), "memory_base": base.name}}


@contextlib.contextmanager
def state_pass_fix() -> Iterator[None]:
    """coremltools 9's canonicalize_inplace_pattern (run by ct.convert and again by every compression) moves
    each state write right after the op producing its value, inserting it before the op that followed that
    producer in a list taken before the loop; when that op is a state write it already moved (and removed),
    it fails with a KeyError. That happens whenever the last state's producer directly precedes the first
    write (Titans: 15 states), or when one producer feeds several writes. Looking the next op up among the
    ops in the block at that moment gives the intended order and changes nothing for graphs that converted
    before."""
    from coremltools.converters.mil.mil.passes.defs import optimize_state

    cls = optimize_state.canonicalize_inplace_pattern
    original = cls._try_match_and_transform_pattern

    class LiveOps:  # the block's op list as it is now, for the pass's `ops[ops.index(op) + 1]`
        def __init__(self, block: Any):
            self.block = block

        def index(self, op: Any) -> int:
            return list(self.block.operations).index(op)

        def __getitem__(self, i: int) -> Any:
            return list(self.block.operations)[i]

    def fixed(self: Any, op: Any, block: Any, ops: list) -> None:
        return original(self, op, block, LiveOps(block))

    cls._try_match_and_transform_pattern = fixed
    try:
        yield
    finally:
        cls._try_match_and_transform_pattern = original


def convert(ct: Any, step: nn.Module, example: tuple, shapes: tuple, target: Any) -> Any:
    """torch.export (non-strict) -> ATen dialect -> ct.convert with the wrapper's input dtypes, fp16
    outputs and states. Call it inside `state_pass_fix()` (export does, around conversion and compression)."""
    step.reset()
    dtypes = step.input_dtypes
    with warnings.catch_warnings(), quiet(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(step, example, dynamic_shapes=shapes, strict=False)
            program = program.run_decompositions(decompositions())  # coremltools reads only ATen
            return ct.convert(
                program,
                inputs=[ct.TensorType(name=n, dtype=np.dtype(dtypes[n]).type) for n in step.input_names],
                outputs=[ct.TensorType(name=n, dtype=np.float16) for n in step.output_names],
                minimum_deployment_target=target,
                compute_precision=compute_precision(ct, getattr(step, "fp32_compute", None)),
                skip_model_load=True,  # no CoreML framework on Linux; the package is validated instead
            )
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise KititansError(f"CoreML conversion failed: {first}") from e


def compute_precision(ct: Any, fp32: dict[str, Any] | None) -> Any:
    """fp16 compute (coremltools casts every op), except what the wrapper's `fp32_compute` keeps in fp32.

    code: ops traced inside the forward of a module defined in one of these files (torch.export keeps each
    node's stack trace down to the innermost module forward, coremltools each op's), but not the op types in
    `except_ops`. angles: sin/cos and every op that only feeds them (RoPE angles computed from positions:
    fp16 cannot hold position * frequency at large positions).
    """
    if not fp32:
        return ct.precision.FLOAT16
    from coremltools.converters.mil.mil.scope import ScopeSource

    code, skip = tuple(fp32.get("code", ())), set(fp32.get("except_ops", ()))
    angles: dict[Any, bool] = {}

    def feeds_angles(op: Any) -> bool:
        if op not in angles:
            children = [c for v in op.outputs for c in v.child_ops]
            angles[op] = bool(children) and all(
                c.op_type in ("sin", "cos") or feeds_angles(c) for c in children
            )
        return angles[op]

    def fp16(op: Any) -> bool:
        if fp32.get("angles") and (op.op_type in ("sin", "cos") or feeds_angles(op)):
            return False
        traces = op.scopes.get(ScopeSource.EXIR_STACK_TRACE) or []
        in_code = any(t and any(c in t for c in code) for t in traces)
        return not in_code or op.op_type in skip

    return ct.transform.FP16ComputePrecision(op_selector=fp16)


def interface(step: nn.Module) -> dict[str, Any]:
    """What a runtime needs to drive the package, for the manifest."""
    dtypes = step.input_dtypes
    fp32 = getattr(step, "fp32_compute", None)
    out: dict[str, Any] = {
        "compute_precision": "fp16" if not fp32 else {"default": "fp16", "fp32": fp32},
        "kind": getattr(step, "kind", "kv_cache"),
        "inputs": {n: dtypes[n] for n in step.input_names},
        "states": list(step.state_names),
        "prefill_exact": bool(getattr(step, "prefill_exact", False)),
        "context_length": int(getattr(step, "context_length", step.max_len)),
    }
    if "causal_mask" in step.input_names:
        out["mask"] = "additive fp16 (1, 1, T, end): 0 where a query may attend, -1e4 elsewhere"
    if "position" in step.input_names:
        out["position"] = "int32 (1,): position of the first new token; 0 starts a new sequence"
    if hasattr(step, "step_table"):  # several functions; the runtime picks one per call
        out["steps"] = step.step_table()
    return out


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
