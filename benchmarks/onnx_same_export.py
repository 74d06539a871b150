"""KiTitans' ONNX runtime against onnxruntime-genai on the *same* export folder (our graph, which genai loads
through the genai_config.json the exporter writes), at opset 18 (plain ops) and opset 23 (fused Attention /
RotaryEmbedding / RMSNormalization), per quantization level; interleaved in one process, so compare ratios.

    python benchmarks/onnx_same_export.py --run runs/tiny
    python benchmarks/onnx_same_export.py --run runs/tiny --quants fp32,int4 --opsets 18,23 --tokens 128

Three loops over each folder: ours (OnnxRuntime, IO-bound past/present, the Runtime protocol), genai through
the same protocol (GenaiRuntime: append_tokens + get_logits per token) and genai's own C++ loop
(generate_next_token, greedy inside the generator). Decode tokens/s after a 32-token prompt.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved, machine, md_table, write_json

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def protocol_decode(rt, prompt: list[int], n: int) -> None:
    rt.reset()
    logits = rt.forward(prompt)
    for _ in range(n):
        logits = rt.forward([int(np.argmax(logits))])


def genai_native(rt, prompt: list[int], n: int) -> None:
    og = rt._og
    params = og.GeneratorParams(rt.model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(rt.model, params)
    gen.append_tokens(prompt)
    for _ in range(n):
        gen.generate_next_token()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a Lite run directory")
    ap.add_argument("--quants", default="fp32,int4")
    ap.add_argument("--opsets", default="18,23")
    ap.add_argument("--tokens", type=int, default=96, help="decode steps per timing")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="bench-out/onnx-same-export")
    ap.add_argument("--out", default="bench-out/onnx_same_export")
    args = ap.parse_args()
    from kititans.export import ExportOptions, export_model
    from kititans.runtimes import load_runtime

    run, work = Path(args.run), Path(args.work)
    rows = []
    for quant in args.quants.split(","):
        folders = {}
        for opset in (int(o) for o in args.opsets.split(",")):
            out = work / f"{quant}-opset{opset}"
            t0 = time.perf_counter()
            export_model(run, "onnx", quant, out, ExportOptions(progress=False, extra={"opset": opset}))
            print(f"exported {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            folders[opset] = out
        fns, loaded = {}, {}
        for opset, folder in folders.items():
            ours = load_runtime(folder, "onnx", threads=args.threads, spin=False)
            genai = load_runtime(folder, "genai", threads=args.threads, spin=False)
            prompt = [
                ours.codec.bos_id,
                *ours.codec.encode("Once upon a time, a little robot found a red ball in"),
            ]
            prompt = prompt[:32]
            loaded[opset] = (ours, genai)
            fns[f"ours opset {opset}"] = lambda rt=ours, p=prompt: protocol_decode(rt, p, args.tokens)
            fns[f"genai opset {opset}"] = lambda rt=genai, p=prompt: protocol_decode(rt, p, args.tokens)
            fns[f"genai-native opset {opset}"] = lambda rt=genai, p=prompt: genai_native(rt, p, args.tokens)
        times = interleaved(fns, args.repeats, warmup=1)
        tps = {k: args.tokens / statistics.median(v) for k, v in times.items()}
        for opset in folders:
            ours_tps = tps[f"ours opset {opset}"]
            rows.append(
                {
                    "quant": quant,
                    "opset": opset,
                    "ours tok/s": round(ours_tps, 1),
                    "genai tok/s (same loop)": round(tps[f"genai opset {opset}"], 1),
                    "genai tok/s (its own loop)": round(tps[f"genai-native opset {opset}"], 1),
                    "ours / genai (same loop)": f"{ours_tps / tps[f'genai opset {opset}']:.2f}x",
                    "ours / genai (own loop)": f"{ours_tps / tps[f'genai-native opset {opset}']:.2f}x",
                }
            )
        if len(folders) == 2:  # opset 23 against 18 for our runtime
            a, b = sorted(folders)
            rows[-1]["ours opset 23 / 18"] = f"{tps[f'ours opset {b}'] / tps[f'ours opset {a}']:.2f}x"
    cols = [*rows[0], "ours opset 23 / 18"] if "ours opset 23 / 18" not in rows[0] else list(rows[0])
    table = md_table(rows, cols)
    write_json(Path(args.out).with_suffix(".json"), {"machine": machine(), "args": vars(args), "rows": rows})
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
