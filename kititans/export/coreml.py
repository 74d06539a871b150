"""CoreML export: an iOS18/macOS15 ML Program with the KV cache as state (research §3).

The family's wrapper (`FamilySpec.formats["coreml"]`, see kititans/models/lite_export.py) holds the cache as
buffers; `torch.export` + `run_decompositions` + `ct.convert` turn them into fp16 `MLState`s. Each of the
wrapper's functions (decode: one token; prefill: 1..prefill_len tokens; both any position) is converted on
its own, compressed, and merged into one multifunction .mlpackage whose weights are stored once.

A CoreML model cannot run on Linux, so the export validates the package it wrote (research §3.5): the
converted PyTorch wrapper equals the model, the spec has the expected inputs/outputs/states, every MIL op
exists in the target's opset, and the decompressed weights match the PyTorch weights within the scheme's
error (export/coreml_check.py). The report goes into the manifest (RUN/export/model.<quant>.mlpackage.json).

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
from kititans.export.coreml_check import validate_package
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
