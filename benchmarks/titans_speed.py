"""Decode (and training) speed of Titans `titans-tiny` (every block) against Lite `tiny` (same dims: 256 x 4 layers,
vocab 4096), measured interleaved in one process so all see the same machine load.

    nice -n 10 python benchmarks/titans_speed.py --skip-train --onnx            # torch + ONNX decode, tiny width
    nice -n 10 python benchmarks/titans_speed.py --skip-train --onnx --width 1024 --blocks mal
    nice -n 10 python benchmarks/titans_speed.py --threads 2 --reps 5 --json out.json   # + training

train:  one optimizer step (AdamW, forward + backward) on batch x seq_len random tokens, fp32 and bf16 autocast;
        tokens/s = tokens per step / median step time over `reps` interleaved rounds.
torch decode: batch 1, a 16-token prefill, then `decode_tokens` single-token calls with the in-place state,
        every model fused for inference as the torch runtime fuses it (also the median time of a call inside a
        memory chunk and of the call that closes one); also Titans without its memory layers
        (where the cost is); with --compiled also each block through TitansModel.compile_decode() (compiled
        during the warm-up; decode_tokens must reach past the window so every kind of call is met).
onnx decode: random weights of the same shapes exported to fp32 ONNX (cached under --work), run by kititans'
        OnnxRuntime (1 intra-op thread, no spinning): a 64-token prompt, then greedy single-token steps;
        also the median time of a call inside a memory chunk and of the call that closes one (its update).
Ratios: torch = Titans per-token time / Lite's (> 1: Titans slower); onnx = Titans tok/s / Lite's (< 1: slower).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

from kititans.models.lite import lm_loss
from kititans.models.spec import count_params, find_preset
from kititans.models.titans.config import BLOCKS


def shape(preset: str, width: int = 0, **extra: object) -> tuple:
    """(spec, config): the preset, or with `width` its 4-layer shape widened (head_dim 64, ffn ~2.8x: the 500M
    layer shape); `extra` overrides config fields (memory_layers=[] removes the memory)."""
    spec, p = find_preset(preset)
    over = dict(extra)
    if width:
        heads, ffn = width // 64, 64 * round(2.8 * width / 64)
        over.update(dim=width, n_heads=heads, ffn_dim=ffn)
        if spec.name == "lite":
            over["n_kv_heads"] = heads
    return spec, spec.make_config(p.name, over)


def blocks(text: str) -> list[str]:
    """--blocks: comma-separated Titans blocks."""
    names = text.split(",")
    bad = [n for n in names if n not in BLOCKS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown block {bad[0]!r}; valid blocks: {', '.join(BLOCKS)}")
    return names


def build(preset: str, width: int = 0, **extra: object) -> torch.nn.Module:
    spec, cfg = shape(preset, width, **extra)
    torch.manual_seed(0)
    return spec.build(cfg)


def train_step_seconds(model, opt, x, dtype) -> float:
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


@torch.inference_mode()
def decode_seconds(model, ids, calls: dict[str, list[float]] | None = None, chunk: int = 16) -> float:
    """Seconds for single-token decode of ids[16:] after a 16-token prefill, in place; with `calls`, each
    call's seconds also go to calls["inside"] or, for the call that closes a memory chunk, calls["closing"]."""
    state = model.new_state(1)
    model(ids[:, :16], state=state)
    total = 0.0
    for i in range(16, ids.shape[1]):
        t0 = time.perf_counter()
        model(ids[:, i : i + 1], state=state)
        dt = time.perf_counter() - t0
        total += dt
        if calls is not None:
            calls["closing" if (i + 1) % chunk == 0 else "inside"].append(dt)
    return total


def median_us(calls: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Per model, the median microseconds of each kind of call ("inside" a memory chunk, "closing" one)."""
    return {n: {kind: 1e6 * statistics.median(v) for kind, v in c.items() if v} for n, c in calls.items()}


@torch.inference_mode()
def decoded_logits(model, ids) -> torch.Tensor:
    """Logits of ids[16:] decoded one token at a time after a 16-token prefill."""
    state = model.new_state(1)
    model(ids[:, :16], state=state)
    return torch.cat([model(ids[:, i : i + 1], state=state) for i in range(16, ids.shape[1])], 1)


def train_speed(models: dict, args: argparse.Namespace) -> dict:
    g, res = torch.Generator().manual_seed(0), {}
    x = torch.randint(0, 4096, (args.batch, args.seq_len + 1), generator=g)
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}
    for dtype in ("fp32", "bf16"):
        times: dict[str, list[float]] = {n: [] for n in models}
        for n, m in models.items():  # warm-up (oneDNN kernels, allocator)
            m.train()
            train_step_seconds(m, opts[n], x, dtype)
        for _ in range(args.reps):
            for n, m in models.items():
                times[n].append(train_step_seconds(m, opts[n], x, dtype))
        res[dtype] = {n: args.batch * args.seq_len / statistics.median(t) for n, t in times.items()}
    return res


def torch_decode(args: argparse.Namespace) -> dict:
    kinds = {"lite": build("tiny", args.width)}
    kinds.update({b: build("titans-tiny", args.width, block=b) for b in args.blocks})
    kinds["titans memory off"] = build("titans-tiny", args.width, memory_layers=[])
    if args.compiled:  # TitansModel.compile_decode: torch.compile'd fixed-shape steps, one per kind of call
        kinds.update({f"{b} compiled": build("titans-tiny", args.width, block=b) for b in args.blocks})
    for n, m in kinds.items():
        m.eval().fuse_for_inference()
        if n.endswith(" compiled"):
            m.compile_decode()
    ids = torch.randint(0, 4096, (1, 16 + args.decode_tokens), generator=torch.Generator().manual_seed(1))
    for n, m in kinds.items():  # warm-up; a compiled model compiles each kind of call it meets (all of them)
        if not n.endswith(" compiled"):
            decode_seconds(m, ids[:, :48])
    # a compiled step is timed only if it decodes the same logits as the eager one (its warm-up)
    for b in args.blocks if args.compiled else []:
        err = (decoded_logits(kinds[f"{b} compiled"], ids) - decoded_logits(kinds[b], ids)).abs().max().item()
        if err > 1e-3:
            sys.exit(f"error: {b} compiled decode differs from eager by {err:.3g} (a torch.compile bug?)")
    times: dict[str, list[float]] = {n: [] for n in kinds}
    calls: dict[str, dict[str, list[float]]] = {n: {"inside": [], "closing": []} for n in kinds}
    chunk = shape("titans-tiny", args.width)[1].mem_chunk
    for _ in range(args.reps):
        for n, m in kinds.items():
            times[n].append(decode_seconds(m, ids, calls[n], chunk) / args.decode_tokens)
    us = {n: 1e6 * statistics.median(t) for n, t in times.items()}
    ratio = {n: statistics.median(a / b for a, b in zip(times[n], times["lite"])) for n in kinds}
    return {
        "us_per_token": us,
        "time_ratio_vs_lite": ratio,
        "us_per_call": median_us(calls),  # median over every call of that kind (Lite: the same positions)
        "params": {n: count_params(m) for n, m in kinds.items()},
    }


def onnx_runs(args: argparse.Namespace) -> dict[str, Path]:
    """fp32 ONNX exports of random-weight Lite tiny and titans-tiny (each block) at the width, cached."""
    from kititans.checkpoint import save_checkpoint
    from kititans.data.builtin import generate_corpus
    from kititans.data.tokenizer import Tokenizer, train_tokenizer
    from kititans.export import ExportOptions, export_model

    work = Path(args.work) / f"width{args.width or 256}"
    tok_dir = Path(args.work) / "tokenizer4096"
    if not (tok_dir / "tokenizer.model").is_file():
        train_tokenizer(generate_corpus(0, 3_000_000), tok_dir, 4096)
    tok = Tokenizer.load(tok_dir)
    out = {}
    for name, preset, extra in [
        ("lite", "tiny", {}),
        *((b, "titans-tiny", {"block": b}) for b in args.blocks),
    ]:
        run = work / name
        folder = run / "export" / "onnx" / "fp32"
        if not (folder / "manifest.json").is_file():
            spec, cfg = shape(preset, args.width, **extra)
            torch.manual_seed(0)
            save_checkpoint(run, spec.build(cfg).eval(), spec, cfg, tok)
            export_model(run, "onnx", "fp32", folder, ExportOptions(progress=True))
        out[name] = folder
    return out


def onnx_decode(args: argparse.Namespace) -> dict:
    from kititans.runtimes.onnx import OnnxRuntime

    rts = {n: OnnxRuntime(p, threads=1, spin=False) for n, p in onnx_runs(args).items()}
    prompt = [int(i) for i in np.random.default_rng(0).integers(3, 4096, 64)]

    chunk = shape("titans-tiny", args.width)[1].mem_chunk
    calls: dict[str, dict[str, list[float]]] = {n: {"inside": [], "closing": []} for n in rts}

    def tps(rt, n: int, name: str | None = None) -> float:
        rt.reset()
        logits = rt.forward(prompt)
        pos, total = len(prompt), 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            logits = rt.forward([int(np.argmax(logits))])
            dt = time.perf_counter() - t0
            total += dt
            pos += 1
            if name:  # the token that closes a memory chunk runs the chunk's update
                calls[name]["closing" if pos % chunk == 0 else "inside"].append(dt)
        return n / total

    for rt in rts.values():
        tps(rt, 16)  # warm-up
    runs: dict[str, list[float]] = {n: [] for n in rts}
    for _ in range(args.reps):
        for n, rt in rts.items():
            runs[n].append(tps(rt, args.onnx_tokens, n))
    ratio = {n: statistics.median(a / b for a, b in zip(runs[n], runs["lite"])) for n in rts}
    return {
        "tokens_per_s": {n: statistics.median(v) for n, v in runs.items()},
        "tps_ratio_vs_lite": ratio,
        "us_per_call": median_us(calls),  # median over every call of that kind (Lite: the same positions)
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7, help="interleaved rounds (median taken)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--onnx-tokens", type=int, default=128)
    ap.add_argument("--blocks", type=blocks, default=list(BLOCKS), help="comma-separated: mal,mac,mag")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--onnx", action="store_true", help="also ONNX decode (exports random-weight models)")
    ap.add_argument(
        "--compiled",
        action="store_true",
        help="also each block through compile_decode() (minutes to compile)",
    )
    ap.add_argument("--width", type=int, default=0, help="widen every model to this dim (e.g. 1024)")
    ap.add_argument("--work", default="benchmarks/.work/titans_speed", help="where ONNX exports are cached")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res: dict = {
        "threads": args.threads,
        "reps": args.reps,
        "torch": torch.__version__,
        "width": args.width or 256,
    }
    if not args.skip_train:
        res["train_tokens_per_s"] = train_speed(
            {"lite": build("tiny", args.width), "mal": build("titans-tiny", args.width)}, args
        )
    res["torch_decode"] = torch_decode(args)
    if args.onnx:
        res["onnx_decode"] = onnx_decode(args)
    res["load_average"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


def report(res: dict) -> str:
    load = tuple(round(x, 2) for x in res["load_average"])
    lines = [f"width {res['width']}, threads {res['threads']}, {res['reps']} interleaved rounds, load {load}"]
    for dtype, t in res.get("train_tokens_per_s", {}).items():
        lines.append(
            f"train {dtype}: lite {t['lite']:,.0f} tok/s, titans mal {t['mal']:,.0f} tok/s "
            f"-> titans costs {t['lite'] / t['mal']:.2f}x"
        )
    d = res["torch_decode"]
    lines.append("torch decode, us/token (x Lite's time): " + ", ".join(
        f"{n} {d['us_per_token'][n]:,.0f} ({d['time_ratio_vs_lite'][n]:.2f}x)" for n in d["us_per_token"]
    ))  # fmt: skip
    c, lite_in = d["us_per_call"], d["us_per_call"]["lite"]["inside"]
    lines.append("torch per call, median us (inside a memory chunk / closing one; x Lite's inside time): " + ", ".join(
        f"{n} {c[n]['inside']:,.0f} ({c[n]['inside'] / lite_in:.2f}x) / {c[n].get('closing', 0):,.0f}"
        f" ({c[n].get('closing', 0) / lite_in:.2f}x)" for n in c
    ))  # fmt: skip
    if "onnx_decode" in res:
        o = res["onnx_decode"]
        lines.append("onnx fp32 decode, tok/s (x Lite's tok/s): " + ", ".join(
            f"{n} {o['tokens_per_s'][n]:,.0f} ({o['tps_ratio_vs_lite'][n]:.2f}x)" for n in o["tokens_per_s"]
        ))  # fmt: skip
        c, lite_in = o["us_per_call"], o["us_per_call"]["lite"]["inside"]
        lines.append("onnx fp32 per call, median us (inside a memory chunk / closing one; x Lite's inside): " + ", ".join(
            f"{n} {c[n]['inside']:,.0f} ({lite_in / c[n]['inside']:.2f}x) / {c[n].get('closing', 0):,.0f}"
            for n in c
        ))  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(main(sys.argv[1:])))
