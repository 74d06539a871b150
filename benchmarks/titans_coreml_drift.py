"""How much the CoreML package's fp16 state (and fp16 compute) moves a trained Titans model's predictions, and
whether the error grows with the length of the sequence. No Mac needed: the exact module the exporter converts
(TitansCoreMLStep) runs in torch with its state rounded to fp16 after every call, as the package stores it.

    nice -n 10 python benchmarks/titans_coreml_drift.py
    nice -n 10 python benchmarks/titans_coreml_drift.py --run runs/x --tokens 4096 --prefill 256 --window 512

All variants follow the same schedule (prefill in mem_chunk calls, then one token per call) over the same
held-out tokens (the run's data val.bin, else built-in text), against the fp32 functional step (fp32 state):
  fp16_state   fp32 compute, state stored in fp16 between calls (the storage the package cannot avoid)
  package      + fp16 compute except what the package keeps in fp32 (memory state math, RoPE angles):
               TitansCoreMLStep.fp16_copy(); its memory projections run fp32 here, fp16 in the package
  all_fp16     + the memory math in fp16 too (what a Neural-Engine-only graph would compute)
Per window of positions: max |logit diff|, relative logit error ||d|| / ||ref||, top-1 agreement with the
reference, next-token KL(p_fp32 || p_variant), and the relative error of the first memory layer's weights W1
(the state) at the window's end. JSON (with per-position arrays) to bench_out/titans_coreml_drift.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, md_table, write_json

from kititans.checkpoint import load_checkpoint
from kititans.models.titans.coreml_step import TitansCoreMLStep
from kititans.models.titans.memory import NeuralMemory

DEFAULT_RUN = "runs/titans-valloss/builtin/titans-tiny"


def held_out_tokens(ckpt, n: int) -> tuple[list[int], str]:
    """n tokens of the run's validation split (val.bin next to its tokenizer), else built-in text."""
    data = Path(ckpt.meta.get("run", {}).get("tokenizer", {}).get("path") or "")
    val = data / "val.bin"
    if val.is_file():
        ids = np.fromfile(val, dtype=np.uint16).astype(np.int64)
        if len(ids) >= n:
            return ids[:n].tolist(), str(val)
    from kititans.data.builtin import generate_corpus

    ids: list[int] = []
    for doc in generate_corpus(seed=12345, target_bytes=4 * n + 100_000):
        ids += [ckpt.tokenizer.bos_id, *ckpt.tokenizer.encode(doc)]
        if len(ids) >= n:
            break
    return ids[:n], "kititans.data.builtin.generate_corpus(seed=12345)"


@contextlib.contextmanager
def memory_in_fp16() -> Iterator[None]:
    """The neural memory computes in fp16: its fp32 casts become fp16 while NeuralMemory.forward runs."""
    forward, to_float = NeuralMemory.forward, torch.Tensor.float

    def half_forward(self, x, ctx=None, io=None, read_frozen=False):
        torch.Tensor.float = lambda t, *a, **k: t.half() if t.is_floating_point() else t.to(torch.float16)
        try:  # the state it reads comes through stored_read's .float(): fp16 now
            return self._forward(x.half(), ctx, io, read_frozen)
        finally:
            torch.Tensor.float = to_float

    NeuralMemory.forward = half_forward
    try:
        yield
    finally:
        NeuralMemory.forward = forward


def schedule(n: int, prefill: int, chunk: int) -> list[tuple[int, int]]:
    """(start, tokens): `prefill` tokens in chunk-sized calls, then one token per call."""
    pre = prefill - prefill % chunk
    return [(s, chunk) for s in range(0, pre, chunk)] + [(s, 1) for s in range(pre, n)]


def w1_state(step: TitansCoreMLStep) -> torch.Tensor:
    """The first memory layer's current W1 (the package stores its change from W_0)."""
    name = next(n for n in step.state_names if n.endswith("_w1") and "seg_" not in n)
    layer = int(name.split("_")[1])
    return getattr(step, name).double() + step.model.layers[layer].memory.w1.double()


@torch.inference_mode()
def run(ckpt, ids: list[int], prefill: int, window: int) -> dict:
    model = copy.deepcopy(ckpt.model).float().eval()
    ref = TitansCoreMLStep(model)  # fp32 state: the reference
    fp16_state = ref.fp16_state_copy()  # fp16 buffers, fp32 model
    package = fp16_state.fp16_copy()
    variants = {"fp16_state": (fp16_state, None), "package": (package, None)}
    variants["all_fp16"] = (package.fp16_copy(), memory_in_fp16)
    x = torch.tensor([ids])
    per = {k: {"max_abs_diff": [], "rel_err": [], "kl": [], "top1": []} for k in variants}
    state_err = {k: [] for k in variants}
    for start, t in tqdm(schedule(len(ids), prefill, model.config.mem_chunk), desc="drift", leave=False):
        chunk_ids = x[:, start : start + t]
        r = ref(*ref.feeds(chunk_ids, start))[0].double()  # (t, V)
        logp_ref = F.log_softmax(r, -1)
        for name, (step, ctx) in variants.items():
            with ctx() if ctx else contextlib.nullcontext():
                g = step(*step.feeds(chunk_ids, start))[0].double()
            d = g - r
            p = per[name]
            p["max_abs_diff"] += d.abs().amax(-1).tolist()
            p["rel_err"] += (d.norm(dim=-1) / r.norm(dim=-1)).tolist()
            p["kl"] += (logp_ref.exp() * (logp_ref - F.log_softmax(g, -1))).sum(-1).clamp_min(0).tolist()
            p["top1"] += (g.argmax(-1) == r.argmax(-1)).tolist()
            if (start + t) % window == 0:
                ws = w1_state(ref)
                state_err[name].append(float((w1_state(step) - ws).norm() / ws.norm()))
    return summarize(per, state_err, window)


def summarize(per: dict, state_err: dict, window: int) -> dict:
    out = {}
    for name, p in per.items():
        a = {k: np.asarray(v, dtype=np.float64) for k, v in p.items()}
        n = len(a["kl"])
        windows = []
        for i, s in enumerate(range(0, n, window)):
            sl = slice(s, min(s + window, n))
            windows.append(
                {
                    "positions": f"{s}-{sl.stop - 1}",
                    "max_abs_logit_diff": round(float(a["max_abs_diff"][sl].max()), 5),
                    "mean_max_abs_logit_diff": round(float(a["max_abs_diff"][sl].mean()), 5),
                    "rel_err_mean": float(f"{a['rel_err'][sl].mean():.3g}"),
                    "top1_agree": round(float(a["top1"][sl].mean()), 4),
                    "kl_mean": float(f"{a['kl'][sl].mean():.3g}"),
                    "kl_max": float(f"{a['kl'][sl].max():.3g}"),
                    "w1_state_rel_err": float(f"{state_err[name][i]:.3g}")
                    if i < len(state_err[name])
                    else None,
                }
            )
        out[name] = {
            "windows": windows,
            "overall": {
                "max_abs_logit_diff": float(a["max_abs_diff"].max()),
                "rel_err_mean": float(a["rel_err"].mean()),
                "top1_agree": float(a["top1"].mean()),
                "kl_mean": float(a["kl"].mean()),
            },
            "per_position": {k: [float(f"{v:.4g}") for v in a[k]] for k in ("max_abs_diff", "kl")},
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=DEFAULT_RUN, help="a trained Titans run directory")
    ap.add_argument("--tokens", type=int, default=2560, help="sequence length (prefill + decode)")
    ap.add_argument("--prefill", type=int, default=512, help="tokens fed as chunk prefills first")
    ap.add_argument("--window", type=int, default=256, help="positions per reported window")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="bench_out/titans_coreml_drift.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.run)
    ids, source = held_out_tokens(ckpt, args.tokens)
    t0 = time.perf_counter()
    results = run(ckpt, ids, args.prefill, args.window)
    cfg = ckpt.config
    report = {
        "run": str(args.run),
        "tokens": len(ids),
        "token_source": source,
        "prefill": args.prefill,
        "window": args.window,
        "model": {
            "context_length": cfg.context_length,
            "attn_window": cfg.window,
            "mem_chunk": cfg.mem_chunk,
        },
        "reference": "fp32 functional step (TitansCoreMLStep with fp32 state), same schedule",
        "seconds": round(time.perf_counter() - t0, 1),
        "machine": machine(),
        "variants": results,
    }
    write_json(args.json, report)
    cols = ["positions", "max_abs_logit_diff", "rel_err_mean", "top1_agree", "kl_mean", "kl_max"]
    cols.append("w1_state_rel_err")
    for name, r in results.items():
        print(f"\n### {name}  (overall: {r['overall']})\n")
        print(md_table(r["windows"], cols))
    print(f"\nwrote {args.json} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
