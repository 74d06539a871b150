"""CoreML export: an iOS18/macOS15 ML Program with the KV cache as state (research §3).

The family's wrapper (`FamilySpec.formats["coreml"]`, see kititans/models/lite_export.py) holds the cache as
buffers; `torch.export` + `run_decompositions` + `ct.convert` turn them into fp16 `MLState`s. Each of the
wrapper's functions (decode: one token; prefill: 1..prefill_len tokens; both any position) is converted on
its own, compressed, and merged into one multifunction .mlpackage whose weights are stored once.

A CoreML model cannot run on Linux, so the export validates the package it wrote (research §3.5): the
converted PyTorch wrapper equals the model, the spec has the expected inputs/outputs/states, every MIL op
exists in the target's opset, and the decompressed weights match the PyTorch weights within the scheme's
error. The report goes into the manifest (RUN/export/model.<quant>.mlpackage.json).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kititans.errors import KititansError, UnsupportedExport
from kititans.export import ExportOptions, ExportResult, QuantType, base_manifest, write_manifest
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
    bar = tqdm(
        total=2 * len(FUNCTIONS) + 2, desc=f"coreml {quant}", disable=not options.progress, leave=False
    )
    kept: list[str] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as work_dir:
        work = Path(work_dir)
        parts = {}
        for fn, (example, shapes) in step.functions().items():
            bar.set_postfix_str(f"convert {fn}")
            mlmodel = convert(ct, step, example, shapes, target)
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
        with atomic_path(out) as tmp:
            shutil.move(str(merged), str(tmp))
    tokenizer_dir = write_tokenizer(Path(ckpt.path), out.parent / "tokenizer")
    manifest = base_manifest(ckpt, FORMAT, quant, out)
    manifest.update(
        coreml={
            "deployment_target": target_name,
            "specification_version": report["spec"]["specification_version"],
            "functions": report["spec"]["functions"],
            "default_function": "decode",
            "max_len": step.max_len,
            "prefill_len": step.prefill_len,
            "compute_precision": "fp16",
            "single_function_bytes": single,
            "mask": "additive fp16 (1, 1, T, end): 0 where a query may attend, -1e4 elsewhere",
        },
        quantization={**cq.details(quant), "kept_float": kept},
        validation=report,
        tokenizer=str(tokenizer_dir.relative_to(out.parent)),
        next=[
            f"open {out.name} in Xcode, or see docs/ios.md (Swift: load, feed tokens, read logits)",
            f"kititans generate {out} --prompt 'Once upon a time' --device auto   # macOS 15+",
        ],
    )
    mpath = write_manifest(out, manifest)
    return ExportResult(out, mpath, manifest)


def convert(ct: Any, step: nn.Module, example: tuple, shapes: tuple, target: Any) -> Any:
    """torch.export (non-strict) -> ATen dialect -> ct.convert with fp16 inputs/outputs and states."""
    step.reset()
    with warnings.catch_warnings(), quiet(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(step, example, dynamic_shapes=shapes, strict=False)
            program = program.run_decompositions({})  # coremltools reads only the ATen dialect
            names = step.input_names
            return ct.convert(
                program,
                inputs=[
                    ct.TensorType(name=names[0], dtype=np.int32),
                    ct.TensorType(name=names[1], dtype=np.float16),
                ],
                outputs=[ct.TensorType(name=n, dtype=np.float16) for n in step.output_names],
                minimum_deployment_target=target,
                compute_precision=ct.precision.FLOAT16,
                skip_model_load=True,  # no CoreML framework on Linux; the package is validated instead
            )
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise KititansError(f"CoreML conversion failed: {first}") from e


def write_tokenizer(run_dir: Path, dest: Path) -> Path:
    """tokenizer.model + tokenizer_config.json next to the packages, plus tokenizer.json (the HF fast
    tokenizer swift-transformers reads) when transformers is installed."""
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, tmp / name)
        try:
            from transformers import AutoTokenizer

            with quiet(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fast = AutoTokenizer.from_pretrained(str(run_dir))
                fast.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        except Exception:  # optional: our own tokenizer files are complete without it
            pass
    return dest


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
    if sorted(functions) != sorted(FUNCTIONS):
        problems.append(f"functions {sorted(functions)} != {sorted(FUNCTIONS)}")
    io = {name: _function_io(f) for name, f in functions.items()}
    for name, f in io.items():
        if list(f["inputs"]) != list(step.input_names) or f["outputs"] != list(step.output_names):
            problems.append(f"{name}: inputs/outputs {list(f['inputs'])}/{f['outputs']}")
        if sorted(f["states"]) != sorted(step.state_names):
            problems.append(f"{name}: states {sorted(f['states'])} != {sorted(step.state_names)}")
    ops = cq.proto_op_histogram(spec)
    bad = cq.unsupported_ops({t for h in ops.values() for t in h}, target)
    if bad:
        problems.append(f"ops outside the {target.name} opset: {', '.join(bad)}")
    required = {"read_state", "write_state", "scaled_dot_product_attention"}
    required |= {
        "int8": {"constexpr_blockwise_shift_scale"},
        "int4": {"constexpr_blockwise_shift_scale"},
    }.get(quant, {"constexpr_lut_to_dense"} if quant == "palettize4" else set())
    for name, h in ops.items():
        if missing := sorted(required - set(h)):
            problems.append(f"{name}: missing ops {', '.join(missing)}")
    weights = weight_report(prog.functions["decode"], step, quant)
    if weights["max_relative_error"] > cq.ERROR_BOUND[quant]:
        problems.append(
            f"weight error {weights['max_relative_error']:.4f} > {cq.ERROR_BOUND[quant]} ({quant})"
        )
    if weights["missing"]:
        problems.append(f"weights not found in the package: {', '.join(weights['missing'][:3])}")
    if weights["compressed_but_float"]:
        problems.append(f"compressed a tensor that must stay fp16: {weights['compressed_but_float'][0]}")
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


def weight_report(function: Any, step: nn.Module, quant: str) -> dict[str, Any]:
    """Decompressed package weights vs the PyTorch weights: relative error per parameter; and which
    consts were compressed (none of the family's keep_float ones may be)."""
    values = cq.weight_values(function)
    aliases: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in step.named_parameters(remove_duplicate=False):  # a tied weight has two names
        aliases.setdefault(id(p), []).append(name)
        params[id(p)] = p
    errors, missing = {}, []
    for pid, names in aliases.items():
        keys = ["p_" + n.replace(".", "_") + "_to_fp16" for n in names]
        key = next((k for k in keys if k in values), None)
        if key is None:
            missing.append(names[0])
            continue
        errors[names[0]] = cq.relative_error(values[key], params[pid].detach().numpy())
    compressed = [op.name for op in function.operations if op.op_type.startswith("constexpr_")]
    worst = max(errors, key=errors.get) if errors else None
    return {
        "scheme": quant,
        "bound": cq.ERROR_BOUND[quant],
        "max_relative_error": float(errors[worst]) if worst else 0.0,
        "mean_relative_error": float(np.mean(list(errors.values()))) if errors else 0.0,
        "worst": worst,
        "per_parameter": {k: round(v, 6) for k, v in errors.items()},
        "missing": missing,
        "compressed": len(compressed),
        "compressed_but_float": [n for n in compressed if any(k in n for k in step.keep_float)],
    }


def wrapper_report(step: nn.Module, model: nn.Module, prompt: int = 9, decode: int = 6) -> dict[str, float]:
    """The converted wrapper (static cache, slice updates, additive mask) against the training model over
    a prefill and `decode` single-token steps, in fp32 and fp64 (fp64 shows the math is the same)."""
    from kititans.models.lite_export import causal_mask

    n = min(prompt + decode, step.max_len)
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    diffs = {}
    for dtype in (torch.float32, torch.float64):
        ref_model = copy.deepcopy(model).to(dtype)
        s = copy.deepcopy(step).to(dtype)
        s.reset()
        with torch.no_grad():
            ref = ref_model(ids)[0]
            got = [s(ids[:, :prompt].int(), causal_mask(prompt, prompt, dtype))[0]]
            for t in range(prompt, n):
                got.append(s(ids[:, t : t + 1].int(), causal_mask(1, t + 1, dtype))[0])
        diffs[str(dtype).removeprefix("torch.")] = float((torch.cat(got) - ref).abs().max())
    return {"max_abs_diff_fp32": diffs["float32"], "max_abs_diff_fp64": diffs["float64"], "tokens": n}
