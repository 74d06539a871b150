"""kititans export: a run directory -> GGUF (llama.cpp), ONNX (ONNX Runtime) or CoreML (Apple) artifact."""

from __future__ import annotations

import argparse

HELP = "export a run to GGUF (llama.cpp), ONNX or CoreML at a quantization level, with a manifest"
EXAMPLES = """  kititans export runs/tiny --format gguf --q4          # -> runs/tiny/export/model.q4_k_m.gguf
  kititans export runs/tiny --format gguf --quant q6_k --imatrix calib.txt
  kititans export runs/tiny --format gguf --quant list  # the types and their bits per weight
  kititans export runs/tiny --format onnx --quant int4   # loads in onnxruntime, optimum and onnxruntime-genai
  kititans export runs/tiny --format onnx --q4 --runtime genai   # onnxruntime-genai's own model builder
  kititans export runs/tiny --format gguf --q4 --license apache-2.0   # + model.q4_k_m.Modelfile for Ollama
  kititans export runs/tiny --format coreml --q4        # -> .mlpackage for an iOS/macOS app"""

FORMAT_OPTIONS = {
    "opset": "onnx",
    "target": "coreml",
    "max_len": "coreml",
    "prefill_len": "coreml",
    "imatrix_tokens": "gguf",
}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run directory (from kititans train / sft)")
    p.add_argument("--format", required=True, choices=["gguf", "onnx", "coreml"], help="target format")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--quant", help="quantization type (`--quant list` shows them)")
    q.add_argument(
        "--q8", dest="quant", action="store_const", const="q8", help="8-bit (gguf q8_0, onnx/coreml int8)"
    )
    q.add_argument(
        "--q4", dest="quant", action="store_const", const="q4", help="4-bit (gguf q4_k_m, onnx/coreml int4)"
    )
    p.add_argument(
        "--imatrix",
        metavar="TEXT",
        help="gguf: calibration text for an importance matrix ('val' = the run's validation split)",
    )
    p.add_argument("--out", help="output path (default: RUN/export/...)")
    p.add_argument(
        "--license",
        metavar="SPDX",
        help="license id written into the artifact (GGUF general.license, CoreML license, Modelfile LICENSE)",
    )
    g = p.add_argument_group("format options")
    g.add_argument(
        "--imatrix-tokens", type=int, help="gguf: calibration tokens for --imatrix (default 32768)"
    )
    g.add_argument(
        "--opset", type=int, help="onnx: 23 (default; fused Attention/RMSNorm ops) or 18 (older runtimes)"
    )
    g.add_argument(
        "--runtime",
        choices=["kititans", "genai"],
        default="kititans",
        help="onnx: kititans (default: our step graph, any family) or genai (onnxruntime-genai's builder, Lite; "
        "-> RUN/export/onnx-genai/<quant>/)",
    )
    g.add_argument("--target", help="coreml: minimum deployment target (default iOS18; states need >= iOS18)")
    g.add_argument("--max-len", type=int, help="coreml: KV-cache positions (default: the model context)")
    g.add_argument("--prefill-len", type=int, help="coreml: longest prefill chunk (default 128)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from kititans.errors import KititansError
    from kititans.export import ExportOptions, export_model, format_module

    if args.quant == "list":
        mod = format_module(args.format)
        short = {v: k for k, v in mod.SHORTHANDS.items()}
        print(f"{args.format} quantization types (default {mod.DEFAULT_QUANT}):")
        for name, qt in mod.QUANTS.items():
            alias = f" (--{short[name]})" if name in short else ""
            print(f"  {name:<12} {qt.bits_per_weight:5.2f} bits/weight  {qt.description}{alias}")
        return 0
    extra = {k: getattr(args, k) for k in FORMAT_OPTIONS if getattr(args, k) is not None}
    for k in extra:
        if FORMAT_OPTIONS[k] != args.format:
            raise KititansError(f"--{k.replace('_', '-')} applies to --format {FORMAT_OPTIONS[k]} only")
    if args.license:
        extra["license"] = args.license
    if args.runtime == "genai":
        result = export_genai_run(args, extra)
    else:
        options = ExportOptions(imatrix=args.imatrix, progress=not args.quiet, extra=extra)
        result = export_model(args.run, args.format, args.quant, args.out, options)
    m = result.manifest
    size = m.get("size_bytes") or 0
    print(f"wrote {result.path} ({size / 2**20:.2f} MiB, {m['quant']}, {result.seconds:.1f} s)")
    print(f"manifest: {result.manifest_path}")
    for hint in m.get("next", []):
        print(f"  {hint}")
    return 0


def export_genai_run(args: argparse.Namespace, extra: dict) -> object:
    """`--format onnx --runtime genai`: onnxruntime-genai's model builder on the run (same quant names)."""
    import time

    from kititans.errors import KititansError
    from kititans.export import resolve_quant
    from kititans.export.onnx import export_genai

    if args.format != "onnx":
        raise KititansError("--runtime genai applies to --format onnx only")
    unused = [k for k in extra if k != "license"] + (["imatrix"] if args.imatrix else [])
    if unused:
        raise KititansError(f"--{unused[0].replace('_', '-')} does not apply to --runtime genai")
    t0 = time.perf_counter()
    result = export_genai(args.run, resolve_quant("onnx", args.quant), args.out, progress=not args.quiet)
    result.seconds = time.perf_counter() - t0
    return result
