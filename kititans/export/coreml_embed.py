"""CoreML export of an encoder (a family whose CoreML wrapper has kind "embed"): one stateless ML Program
function, `input_ids` + `attention_mask` (int32, 1 x 1..max_len) -> `embedding` (fp16, 1 x dim, unit
length), mean pooling and L2 normalisation inside the program. The encoder's CoreML entry names this module
as its `exporter`, so `kititans export --format coreml` writes encoders here; levels and the conversion,
compression and weight checks are kititans/export/coreml.py's.

Without a CoreML runtime on Linux the package is validated as the decoder packages are (spec inputs/outputs and
dtypes, every op in the target's opset, the compression ops present, decompressed weights against PyTorch), and
the embeddings are checked by cosine: the PyTorch encoder loaded with the package's own (decompressed) weights,
in fp16, against the fp32 model on fixed sentences. On macOS, `kititans embed model.<q>.mlpackage` runs it.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kititans.errors import KititansError, UnsupportedExport
from kititans.export import ExportOptions, ExportResult, base_manifest, write_manifest
from kititans.export import coreml as base
from kititans.export.coreml_check import SPEC_DTYPES, weight_report
from kititans.export.coreml_meta import stamp_package, write_coreml_tokenizer
from kititans.files import atomic_path, dir_size
from kititans.quantize import coreml as cq
from kititans.quantize.onnx import quiet

CHECK_TEXTS = [
    "Once upon a time, a little robot found a red ball in the garden.",
    "How do I reset my password?",
    "x",
]


def export(ckpt: Any, quant: str, out: Path, options: ExportOptions) -> ExportResult:
    """Convert, compress, validate and write the package and its manifest (options.extra: target, max_len)."""
    ct = cq.coremltools()
    graph_cls = ckpt.spec.support(base.FORMAT)
    if options.imatrix:
        raise UnsupportedExport("--imatrix applies to gguf only; CoreML compression is data-free here")
    target_name = str(options.extra.get("target", base.MIN_TARGET))
    target = base.deployment_target(target_name)
    graph = graph_cls(copy.deepcopy(ckpt.model).float().eval(), max_len=options.extra.get("max_len"))
    out = Path(out)
    tokenizer_dir = write_coreml_tokenizer(ckpt, out.parent / "tokenizer")
    keep = lambda name: any(part in name for part in graph.keep_float)  # noqa: E731
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as work, base.state_pass_fix():
        mlmodel = base.convert(ct, graph, graph.example(), graph.dynamic_shapes(), target)
        with quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mlmodel, kept = cq.compress(mlmodel, quant, keep)
        package = Path(work) / "model.mlpackage"
        mlmodel.save(str(package))
        report = validate(package, ckpt, quant, graph, target)
        if report["problems"]:
            raise KititansError(f"the CoreML package failed validation: {report['problems'][0]}")
        interface = {
            "kind": "embed",
            "inputs": dict(graph.input_dtypes),
            "states": [],
            "max_len": graph.max_len,
            "context_length": graph.max_len,
            "outputs": list(graph.output_names),
        }
        metadata = stamp_package(package, ckpt, interface, options.extra.get("license"))
        with atomic_path(out) as tmp:
            package.rename(tmp)
    manifest = base_manifest(ckpt, base.FORMAT, quant, out)
    manifest.update(
        size_bytes=dir_size(out),
        coreml={"deployment_target": target_name, **interface, "functions": report["spec"]},
        quantization={**cq.details(quant), "kept_float": kept},
        metadata=metadata,
        validation=report,
        tokenizer=str(tokenizer_dir.relative_to(out.parent)),
        next=[
            f"open {out.name} in Xcode, or see docs/ios.md (Swift: embeddings for on-device search)",
            f"kititans embed {out} --text 'how do I reset my password?'   # macOS 15+",
        ],
    )
    return ExportResult(out, write_manifest(out, manifest), manifest)


def validate(package: Path, ckpt: Any, quant: str, graph: Any, target: Any) -> dict[str, Any]:
    """The package's spec, ops and weights against the wrapper and the PyTorch model (no runtime needed)."""
    from coremltools.converters.mil.frontend.milproto.load import load

    ct = cq.coremltools(purpose="CoreML validation")
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
        prog = load(spec, spec.specificationVersion, str(package / "Data/com.apple.CoreML/weights"))
    problems: list[str] = []
    inputs = {i.name: SPEC_DTYPES.get(i.type.multiArrayType.dataType) for i in spec.description.input}
    outputs = [o.name for o in spec.description.output]
    if list(inputs) != list(graph.input_names) or any(d != "int32" for d in inputs.values()):
        problems.append(f"inputs {inputs} != int32 {list(graph.input_names)}")
    if outputs != list(graph.output_names):
        problems.append(f"outputs {outputs} != {list(graph.output_names)}")
    ops = cq.proto_op_histogram(spec)
    bad = cq.unsupported_ops({t for h in ops.values() for t in h}, target)
    if bad:
        problems.append(f"ops outside the {target.name} opset: {', '.join(bad)}")
    needed = {"int8": "constexpr_blockwise_shift_scale", "int4": "constexpr_blockwise_shift_scale"}.get(
        quant, "constexpr_lut_to_dense" if quant == "palettize4" else None
    )
    if needed and not any(needed in h for h in ops.values()):
        problems.append(f"missing op {needed}")
    function = next(iter(prog.functions.values()))
    weights = weight_report([function], graph, quant)
    if weights["max_relative_error"] > cq.ERROR_BOUND[quant]:
        problems.append(f"weight error {weights['max_relative_error']:.4f} > {cq.ERROR_BOUND[quant]}")
    if weights["missing"]:
        problems.append(f"weights not found in the package: {', '.join(weights['missing'][:3])}")
    cosine = package_cosine(ckpt, graph, cq.weight_values(function))
    if cosine["min_cosine"] < COSINE_FLOOR[quant]:
        problems.append(f"embedding cosine {cosine['min_cosine']:.5f} < {COSINE_FLOOR[quant]} ({quant})")
    return {
        "problems": problems,
        "spec": {"specification_version": spec.specificationVersion, "inputs": inputs, "outputs": outputs},
        "ops": ops,
        "weights": weights,
        "check": cosine,
    }


COSINE_FLOOR = {"fp16": 0.999, "int8": 0.995, "int4": 0.95, "palettize4": 0.95}


def package_cosine(ckpt: Any, graph: Any, values: dict[str, np.ndarray]) -> dict[str, Any]:
    """Embeddings of the encoder holding the package's decompressed weights, run in fp16 as the device does,
    against the fp32 model's: what the package's weights and precision cost, by cosine similarity."""
    tok = ckpt.tokenizer
    rows = [[tok.bos_id, *tok.encode(t)][: graph.max_len] for t in CHECK_TEXTS]
    model = copy.deepcopy(ckpt.model).float().eval()
    for name, p in model.named_parameters():
        key = next((k for k in (f"p_model_{name.replace('.', '_')}_to_fp16", f"p_model_{name.replace('.', '_')}")
                    if k in values), None)  # fmt: skip
        if key is not None:
            p.data.copy_(torch.from_numpy(np.asarray(values[key], dtype=np.float32)).reshape(p.shape))
    half = model.half()
    cos = []
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r])
            ref = ckpt.model(ids).float()
            got = half(ids).float()
            cos.append(float(torch.nn.functional.cosine_similarity(ref, got).item()))
    return {"texts": len(rows), "min_cosine": min(cos), "mean_cosine": float(np.mean(cos)), "compute": "fp16"}
