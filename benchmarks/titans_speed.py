"""Training and decode speed of Titans `titans-tiny` against Lite `tiny` (same dims: 256 x 4 layers, vocab 4096),
measured interleaved in one process so both see the same machine load.

    nice -n 10 python benchmarks/titans_speed.py                      # both measurements, 1 thread
    nice -n 10 python benchmarks/titans_speed.py --threads 2 --reps 5 --json out.json
    nice -n 10 python benchmarks/titans_speed.py --width 1024 --skip-train   # the 500M layer shape, 4 layers

train:  one optimizer step (AdamW, forward + backward) on batch x seq_len random tokens, fp32 and bf16 autocast;
        tokens/s = tokens per step / median step time over `reps` interleaved rounds.
decode: batch 1, a 16-token prefill, then `decode_tokens` single-token calls with the in-place state (what the
        torch runtime does); Titans also through the functional `step` (what ONNX/CoreML will run).
Ratios are Titans cost / Lite cost (> 1 = Titans slower).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from kititans.models.lite import lm_loss
from kititans.models.spec import count_params, find_preset


def build(preset: str, width: int = 0, **extra) -> torch.nn.Module:
    """The preset, or with --width its 4-layer shape widened (head_dim 64, ffn ~2.8x: the 500M layer shape);
    `extra` overrides config fields (memory_layers=[] removes the memory)."""
    spec, p = find_preset(preset)
    over = dict(extra)
    if width:
        heads, ffn = width // 64, 64 * round(2.8 * width / 64)
        over.update(dim=width, n_heads=heads, ffn_dim=ffn)
        if spec.name == "lite":
            over["n_kv_heads"] = heads
    torch.manual_seed(0)
    return spec.build(spec.make_config(p.name, over))


def train_step_seconds(model, opt, x, dtype) -> float:
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


@torch.inference_mode()
def decode_seconds(model, ids, functional: bool = False) -> float:
    """Seconds for single-token decode of ids[16:] after a 16-token prefill."""
    if functional:
        state = model.state_to_tensors(model.new_state(1))
        _, *state = model.step(ids[:, :16], *state)  # one chunk-sized prefill (mem_chunk = 16)
        t0 = time.perf_counter()
        for i in range(16, ids.shape[1]):
            _, *state = model.step(ids[:, i : i + 1], *state)
        return time.perf_counter() - t0
    state = model.new_state(1)
    model(ids[:, :16], state=state)
    t0 = time.perf_counter()
    for i in range(16, ids.shape[1]):
        model(ids[:, i : i + 1], state=state)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7, help="interleaved rounds (median taken)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--width", type=int, default=0, help="widen both models to this dim (e.g. 1024)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = {"lite tiny": build("tiny", args.width), "titans-tiny": build("titans-tiny", args.width)}
    res: dict = {"threads": args.threads, "reps": args.reps, "torch": torch.__version__, "params": {}}
    res["width"] = args.width or 256
    for name, m in models.items():
        res["params"][name] = count_params(m)
    g = torch.Generator().manual_seed(0)
    if not args.skip_train:
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
            tps = {n: args.batch * args.seq_len / statistics.median(t) for n, t in times.items()}
            res[f"train_{dtype}_tokens_per_s"] = tps
            res[f"train_{dtype}_cost_ratio"] = tps["lite tiny"] / tps["titans-tiny"]
    ids = torch.randint(0, 4096, (1, 16 + args.decode_tokens), generator=g)
    kinds = {"lite tiny": (models["lite tiny"], False), "titans-tiny": (models["titans-tiny"], False)}
    kinds["titans-tiny functional step"] = (models["titans-tiny"], True)
    # where the cost is: the same Titans without its memory layers (window attention + persistent slots only)
    kinds["titans-tiny memory off"] = (build("titans-tiny", args.width, memory_layers=[]), False)
    for m, _ in kinds.values():
        m.eval()
    for m, fn in kinds.values():
        decode_seconds(m, ids[:, :48], fn)  # warm-up
    times = {n: [] for n in kinds}
    for _ in range(args.reps):
        for n, (m, fn) in kinds.items():
            times[n].append(decode_seconds(m, ids, fn))
    tps = {n: args.decode_tokens / statistics.median(t) for n, t in times.items()}
    res["decode_tokens_per_s"] = tps
    res["decode_cost_ratio"] = tps["lite tiny"] / tps["titans-tiny"]
    res["decode_cost_ratio_functional"] = tps["lite tiny"] / tps["titans-tiny functional step"]
    res["load_average"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


def report(res: dict) -> str:
    load = tuple(round(x, 2) for x in res["load_average"])
    lines = [
        f"width {res['width']}, threads {res['threads']}, {res['reps']} interleaved rounds, load average {load}"
    ]
    for n, p in res["params"].items():
        lines.append(f"  {n:<12} {p / 1e6:.2f}M params")
    for dtype in ("fp32", "bf16"):
        if f"train_{dtype}_tokens_per_s" in res:
            t = res[f"train_{dtype}_tokens_per_s"]
            lines.append(
                f"train {dtype}: lite {t['lite tiny']:,.0f} tok/s, titans {t['titans-tiny']:,.0f} tok/s "
                f"-> titans costs {res[f'train_{dtype}_cost_ratio']:.2f}x"
            )
    d = res["decode_tokens_per_s"]
    lines.append(
        f"decode: lite {d['lite tiny']:,.0f} tok/s, titans {d['titans-tiny']:,.0f} tok/s "
        f"-> {res['decode_cost_ratio']:.2f}x; functional step {d['titans-tiny functional step']:,.0f} tok/s "
        f"-> {res['decode_cost_ratio_functional']:.2f}x"
    )
    per_token = ", ".join(f"{n} {1e6 / t:,.0f}" for n, t in d.items())
    lines.append(f"decode us/token: {per_token}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(main(sys.argv[1:])))
