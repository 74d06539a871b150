"""Decode speed of our ONNX export per quantization level against PyTorch and onnxruntime-genai, on the same
weights, measured interleaved in one process (timings on shared machines are noisy: compare the ratios).

    python benchmarks/onnx_speed.py --run runs/tiny                       # an existing Lite run
    python benchmarks/onnx_speed.py --run runs/tiny --shape dim=512,n_layers=8,n_heads=8,n_kv_heads=4,ffn_dim=1536
        # random weights of that shape with the run's tokenizer (written to --work), for speed only
    python benchmarks/onnx_speed.py --run runs/lite-tiny --run runs/titans-tiny --no-genai
        # two runs at equal dims (Titans vs Lite): every candidate of both, plus second/first ratios

Every candidate goes through the same Runtime protocol loop (prefill the prompt, then one token at a
time, greedy argmax), so the Python overhead is the same for all; onnxruntime-genai is also timed with
its own C++ loop (`generate_next_token`), and its graph is also run by our runtime ("genai-graph"), which
separates the graph's speed from the loop's. Also prints each artifact's size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def random_run(run: Path, shape: str, work: Path) -> Path:
    """A Lite run with random weights of `shape` and `run`'s tokenizer (speed needs no training)."""
    import torch

    from kititans.checkpoint import load_checkpoint, save_checkpoint
    from kititans.models.lite import SPEC, LiteConfig, LiteModel

    tok = load_checkpoint(run).tokenizer
    fields = {k: int(v) for k, v in (kv.split("=") for kv in shape.split(","))}
    cfg = LiteConfig(vocab_size=tok.vocab_size, **{"context_length": 512, "tie_embeddings": False, **fields})
    torch.manual_seed(0)
    model = LiteModel(cfg).eval()
    out = work / ("random-" + shape.replace("=", "").replace(",", "-"))
    save_checkpoint(out, model, SPEC, cfg, tok)
    return out


def decode_tps(rt, prompt: list[int], n: int) -> float:
    """Tokens/s of n single-token steps after a prefill, through the Runtime protocol."""
    rt.reset()
    logits = rt.forward(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        logits = rt.forward([int(np.argmax(logits))])
    return n / (time.perf_counter() - t0)


def genai_native_tps(rt, prompt: list[int], n: int) -> float:
    """onnxruntime-genai's own loop: greedy search inside its generator, no logits to Python."""
    og = rt._og
    params = og.GeneratorParams(rt.model)
    params.set_search_options(max_length=len(prompt) + n + 1, do_sample=False)
    gen = og.Generator(rt.model, params)
    gen.append_tokens(prompt)
    t0 = time.perf_counter()
    for _ in range(n):
        gen.generate_next_token()
    return n / (time.perf_counter() - t0)


def build(
    run: Path, quants: list[str], with_genai: bool, progress: bool, label: str = ""
) -> dict[str, tuple]:
    """name -> (runtime factory args) for every candidate; exports what is missing. `label` prefixes the
    names when several runs are compared; onnxruntime-genai only for runs it can build (Lite)."""
    from kititans.checkpoint import read_meta
    from kititans.export import ExportOptions, default_output, export_model
    from kititans.export.onnx import export_genai, genai_output

    with_genai = with_genai and read_meta(run)["family"] == "lite"
    cands: dict[str, tuple] = {"torch fp32": (run, "torch", {})}
    for q in quants:
        out = default_output(run, "onnx", q)
        if not (out / "manifest.json").is_file():
            export_model(run, "onnx", q, out, ExportOptions(progress=progress))
        cands[f"ours {q}"] = (out, "onnx", {})
        if with_genai and q != "fp16":
            gout = genai_output(run, q)
            if not (gout / "manifest.json").is_file():
                export_genai(run, q, gout, progress=progress)
            cands[f"genai {q}"] = (gout, "genai", {})
            cands[f"genai-graph {q}"] = (gout, "onnx", {})  # genai's graph in our runtime: graph vs loop
    return {f"{label}{k}": v for k, v in cands.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, action="append", help="a run directory (twice: compare two runs)")
    p.add_argument("--shape", help="random weights of this LiteConfig shape instead (k=v,...)")
    p.add_argument("--work", default="benchmarks/.work", help="where --shape runs are written")
    p.add_argument("--quants", default="fp32,int8,int4")
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=64, help="decode steps timed")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions; medians are reported")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads for every runtime (0 = default)")
    p.add_argument("--no-spin", action="store_true", help="onnxruntime threads sleep instead of spinning")
    p.add_argument("--no-genai", action="store_true")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from kititans.runtimes import load_runtime

    runs_in = [Path(r) for r in args.run]
    if args.shape:
        runs_in = [random_run(r, args.shape, Path(args.work)) for r in runs_in]
    try:
        import onnxruntime_genai  # noqa: F401

        with_genai = not args.no_genai
    except ImportError:
        print(
            "onnxruntime-genai is not installed (pip install 'kititans[genai]'): skipping it", file=sys.stderr
        )
        with_genai = False
    quants = args.quants.split(",")
    labels = [f"{r.name}: " if len(runs_in) > 1 else "" for r in runs_in]
    cands = {}
    for r, label in zip(runs_in, labels):
        cands.update(build(r, quants, with_genai, progress=True, label=label))
    opts = {"threads": args.threads, "spin": not args.no_spin}
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rts = {name: load_runtime(path, kind, **opts) for name, (path, kind, _) in cands.items()}
    vocab = min(rt.vocab_size for rt in rts.values())
    prompt = [int(i) for i in np.random.default_rng(0).integers(3, vocab, args.prompt)]
    timers = {name: (lambda rt=rt: decode_tps(rt, prompt, args.tokens)) for name, rt in rts.items()}
    for name, rt in rts.items():
        if rt.name == "genai":
            timers[name.replace("genai", "genai-native")] = lambda rt=rt: genai_native_tps(
                rt, prompt, args.tokens
            )
    for f in timers.values():  # warm up every session once
        f()
    # each rep measures every candidate once, in a shuffled order; ratios are taken within a rep, so a
    # load change on a shared machine hits both sides of a ratio
    rng = np.random.default_rng(1)
    runs: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(args.reps):
        for name in rng.permutation(list(timers)):
            runs[name].append(timers[name]())
    med = {k: statistics.median(v) for k, v in runs.items()}
    sizes = {name: _size(path) for name, (path, _, _) in cands.items()}
    print(
        f"\nruns {', '.join(map(str, runs_in))} | prompt {args.prompt}, decode {args.tokens} tokens, {args.reps} interleaved reps"
    )
    print(
        "| candidate | decode tok/s (median) | min-max | size MB | vs torch fp32 (median of per-rep ratios) |"
    )
    print("|---|---|---|---|---|")
    for k, v in med.items():
        size = sizes.get(k.replace("genai-native", "genai").replace("genai-graph", "genai"))
        label = next(lb for lb in labels if k.startswith(lb))
        vs_torch = statistics.median(a / b for a, b in zip(runs[k], runs[f"{label}torch fp32"]))
        print(
            f"| {k} | {v:.1f} | {min(runs[k]):.0f}-{max(runs[k]):.0f} | {size / 1e6:.2f} | {vs_torch:.2f}x |"
        )
    ratios = {}
    for q in quants:
        for g in ("genai", "genai-native", "genai-graph"):
            if f"{g} {q}" in runs:
                per_rep = sorted(a / b for a, b in zip(runs[f"ours {q}"], runs[f"{g} {q}"]))
                ratios[f"ours/{g} {q}"] = {
                    "median": statistics.median(per_rep),
                    "q1": per_rep[len(per_rep) // 4],
                    "q3": per_rep[(3 * len(per_rep)) // 4],
                }
    if len(runs_in) == 2:  # second run's speed over the first's, per candidate (< 1: the second is slower)
        for q in ["torch fp32", *(f"ours {q}" for q in quants)]:
            per_rep = sorted(a / b for a, b in zip(runs[labels[1] + q], runs[labels[0] + q]))
            ratios[f"{labels[1]}/{labels[0]} {q}".replace(": ", "")] = {
                "median": statistics.median(per_rep),
                "q1": per_rep[len(per_rep) // 4],
                "q3": per_rep[(3 * len(per_rep)) // 4],
            }
    print("\n| ratio (per-rep, tok/s over tok/s) | median | quartiles |\n|---|---|---|")
    for k, v in ratios.items():
        print(f"| {k} | {v['median']:.2f}x | {v['q1']:.2f}-{v['q3']:.2f} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"runs": runs, "median": med, "ratios": ratios, "sizes": sizes}, indent=2)
        )
    return 0


def _size(path: Path) -> int:
    from kititans.files import dir_size

    if (Path(path) / "model.safetensors").is_file():
        return (Path(path) / "model.safetensors").stat().st_size
    return dir_size(path)


if __name__ == "__main__":
    sys.exit(main())
