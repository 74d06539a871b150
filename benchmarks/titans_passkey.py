"""Pass-key retrieval: can a Titans model recall a key it read further back than its attention window?

A synthetic task over a 64-token vocabulary (0-9 digits, KEY, QUERY, BOS, 51 filler words):
    BOS f f f ... KEY d1 d2 d3 d4 f f f ... f QUERY d1 d2 d3 d4
Filler words are random, the KEY block sits at a uniformly random depth, and the loss counts only the four
answer digits. Models with the same backbone and the same attention window are trained on lengths drawn from
[32, 4 x window]: Titans (titans-tiny's width, 2 layers, neural memory on layer 2) with a given block (mal,
mac, mag) and memory details (--conv, --norm-v, --forget-bias), and the same model with the memory turned off
(memory_layers = []: sliding-window attention only, "Lite with the same window"). Sliding windows stack
across layers, so attention alone reaches 2 x (window - 1) tokens back (mac's segments: less); the memory has
no such limit. Evaluation greedily decodes the 4-digit answer with the in-place decode state at 1x, 2x, 4x
(and 8x, beyond the training lengths) the window; chance is 10% per digit, 0.01% per key. Results are split
by the key's distance, and by whether the key block or the answer straddles a segment boundary (a multiple of
the window: where mac's segment attention cannot see across).

Any model config key: `--set mac_gate=tanh --set global_layers=[2]` (as `kititans train --set model.KEY=...`).
`--curriculum N`: the first N steps put every key block inside the segment just before the query's.

    nice -n 10 python benchmarks/titans_passkey.py train --memory on  --out runs/passkey-mem
    nice -n 10 python benchmarks/titans_passkey.py train --memory on --block mac --out runs/passkey-mac
    nice -n 10 python benchmarks/titans_passkey.py train --memory off --out runs/passkey-nomem
    nice -n 10 python benchmarks/titans_passkey.py eval runs/passkey-mem runs/passkey-mac runs/passkey-nomem

(the trainings are independent: run them side by side, one thread each).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from kititans.checkpoint import state_dict_for_save
from kititans.config import OptimConfig, parse_scalar
from kititans.files import atomic_path, write_json
from kititans.models.lite import lm_loss
from kititans.models.titans import SPEC, TitansConfig, TitansModel
from kititans.models.titans.config import upgrade_config
from kititans.train.optim import build_optimizer
from kititans.train.schedule import lr_multiplier

VOCAB, KEY, QUERY, BOS, FILLER0 = 64, 10, 11, 12, 13
N_DIGITS = 4
MULTIPLES = (1, 2, 4, 8)  # eval lengths in windows; training lengths reach 4 windows, 8 is extrapolation


def model_config(memory: bool, window: int, **over: object) -> TitansConfig:
    """titans-tiny's width (256, 4 heads of 64, memory MLP 64->128->64 per head) with 2 layers: attention alone
    then reaches 2 * (window - 1) tokens back (sliding windows stack across layers), the memory (layer 2)
    any distance."""
    base = dict(
        vocab_size=VOCAB,
        dim=256,
        n_layers=2,
        n_heads=4,
        ffn_dim=768,
        context_length=8 * window,
        window=window,
        n_persistent=4,
        mem_chunk=16,
        memory_layers=None if memory else [],
    )
    cfg = {**base, **over}
    # `--set revision=1`: that revision's defaults for the keys not given (as a run saved then would load)
    return TitansConfig(**(upgrade_config(cfg) if "revision" in over else cfg))


def make_batch(
    batch: int, length: int, gen: torch.Generator, segment: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences (batch, length), position of KEY per row). segment > 0: every key block lies inside the
    segment (of that many tokens) just before the query's, where one exists (the curriculum)."""
    seq = torch.randint(FILLER0, VOCAB, (batch, length), generator=gen)
    seq[:, 0] = BOS
    digits = torch.randint(0, 10, (batch, N_DIGITS), generator=gen)
    last = length - 1 - N_DIGITS  # QUERY position
    key_pos = torch.randint(1, last - N_DIGITS, (batch,), generator=gen)  # KEY block ends before QUERY
    start = (last // segment - 1) * segment if segment else -1  # the previous segment's first position
    if start >= 1 and segment > N_DIGITS:
        key_pos = start + torch.randint(0, segment - N_DIGITS, (batch,), generator=gen)
    for b in range(batch):
        p = int(key_pos[b])
        seq[b, p] = KEY
        seq[b, p + 1 : p + 1 + N_DIGITS] = digits[b]
    seq[:, last] = QUERY
    seq[:, last + 1 :] = digits
    return seq, key_pos


def answer_loss(model: TitansModel, seq: torch.Tensor) -> torch.Tensor:
    x, y = seq[:, :-1], seq[:, 1:]
    mask = torch.zeros_like(y)
    mask[:, -N_DIGITS:] = 1  # predict d1 at QUERY, d2 at d1, ...
    return lm_loss(model(x), y, mask)


def train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    over = dict(kv.split("=", 1) for kv in args.set or [])
    if args.norm_v is not None:
        over["mem_norm_v"] = args.norm_v == "on"
    if args.forget_bias is not None:
        over["mem_forget_bias"] = args.forget_bias
    cfg = model_config(
        args.memory == "on",
        args.window,
        mem_max_lr=args.mem_max_lr,
        mem_chunk=args.mem_chunk,
        n_layers=args.layers,
        block=args.block,
        mem_conv=args.conv,
        dim=args.dim,
        n_heads=args.dim // 64,
        ffn_dim=3 * args.dim,
        **{k: parse_scalar(v) for k, v in over.items()},
    )
    torch.manual_seed(args.seed)
    model = TitansModel(cfg).train()
    opt = build_optimizer(
        model, SPEC, OptimConfig(name=args.optimizer, lr=args.lr, muon_lr=args.muon_lr, weight_decay=0.0)
    )
    gen = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(32, args.max_windows * args.window + 1, (args.steps,), generator=gen)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    t0, rows, run = time.perf_counter(), [], 0.0
    bar = tqdm(range(args.steps), desc=f"passkey memory={args.memory}", dynamic_ncols=True)
    for step in bar:
        mult = lr_multiplier(step, args.steps, args.warmup, "cosine", 0.1, 0.2)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * mult
        seg = args.window if step < args.curriculum else 0
        seq, _ = make_batch(args.batch, int(lengths[step]), gen, seg)
        with ctx:
            loss = answer_loss(model, seq)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run = loss.item() if step == 0 else 0.98 * run + 0.02 * loss.item()
        if not math.isfinite(run):
            raise SystemExit(f"diverged at step {step}")
        bar.set_postfix(loss=f"{run:.3f}")
        if (step + 1) % 50 == 0:
            rows.append(
                {"step": step + 1, "loss_ema": round(run, 4), "seconds": round(time.perf_counter() - t0)}
            )
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state_dict_for_save(model), str(tmp))  # tied head stored once
    write_json(
        out / "passkey.json",
        {
            "config": {k: v for k, v in vars(cfg).items()},
            "args": {k: v for k, v in vars(args).items() if k != "func"},
            "train_seconds": round(time.perf_counter() - t0, 1),
            "curve": rows,
        },
    )
    print(f"saved {out} in {time.perf_counter() - t0:.0f} s, final loss ema {run:.3f}")


def load(run: Path) -> tuple[TitansModel, dict]:
    meta = json.loads((run / "passkey.json").read_text())
    model = TitansModel(TitansConfig(**upgrade_config(meta["config"])))  # runs saved before a default changed
    model.load_state_dict(load_file(str(run / "model.safetensors")), strict=False)
    model.init_buffers()
    return model.eval(), meta


@torch.inference_mode()
def evaluate(model: TitansModel, length: int, n: int, seed: int = 1234) -> dict:
    """Greedy decode of the answer with the in-place state after prefilling up to QUERY."""
    gen = torch.Generator().manual_seed(seed + length)
    seq, key_pos = make_batch(n, length, gen)
    prompt, answer = seq[:, :-N_DIGITS], seq[:, -N_DIGITS:]
    state = model.new_state(n)
    logits = model(prompt, state=state)[:, -1]
    got = []
    for _ in range(N_DIGITS):
        tok = logits.argmax(-1, keepdim=True)  # (n, 1)
        got.append(tok)
        logits = model(tok, state=state)[:, -1]
    got = torch.cat(got, 1)
    digit_ok = (got == answer).float()
    key_ok = digit_ok.all(1).float()
    # distance from the query to the last key digit: beyond the window one attention layer cannot see it,
    # beyond n_layers * (window - 1) no stack of sliding windows can relay it either
    dist = (length - 1 - N_DIGITS) - (key_pos + N_DIGITS)
    W, nl = model.config.window, model.config.n_layers
    res = {"n": n, "key_acc": key_ok.mean().item(), "digit_acc": digit_ok.mean().item()}
    # a block straddles a segment boundary when its first and last token lie in different segments
    key_cut = key_pos // W != (key_pos + N_DIGITS) // W  # KEY d1..d4
    q = length - 1 - N_DIGITS
    answer_cut = torch.full_like(key_cut, q // W != (length - 1) // W)  # QUERY d1..d4 (the same for all)
    splits = (
        ("beyond_window", dist >= W),
        ("beyond_reach", dist > nl * (W - 1)),
        ("key_straddles", key_cut),
        ("answer_straddles", answer_cut & ~key_cut),
        ("neither_straddles", ~answer_cut & ~key_cut),
    )
    for name, sel in splits:
        res[f"n_{name}"] = int(sel.sum())
        if sel.any():
            res[f"{name}_key_acc"] = key_ok[sel].mean().item()
            res[f"{name}_digit_acc"] = digit_ok[sel].mean().item()
    return res


def eval_cmd(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    results = {}
    for run in args.runs:
        model, meta = load(Path(run))
        W = model.config.window
        a = meta["args"]
        c = model.config
        details = f"{c.block}, conv {c.mem_conv}, norm_v {c.mem_norm_v}, forget {c.mem_forget_bias}, "
        details += f"C {c.mem_chunk}" + "".join(f", {kv}" for kv in a.get("set") or [])
        if a.get("curriculum"):
            details += f", curriculum {a['curriculum']}"
        name = f"{Path(run).name} ({details if a['memory'] == 'on' else 'memory off'})"
        results[name] = {f"{m}x": evaluate(model, m * W + args.offset, args.n) for m in MULTIPLES}
        results[name]["train_seconds"] = meta["train_seconds"]
        results[name]["steps"] = meta["args"]["steps"]
    print(f"pass-key greedy decode, {args.n} sequences per length (chance: digit 10%, key 0.01%)")
    print("key accuracy (digit accuracy); 'beyond reach' = key further back than layers x (window - 1)")
    cols = ("beyond_window", "beyond_reach", "key_straddles", "answer_straddles", "neither_straddles")
    print(
        f"{'model':<64} {'len':>4} {'all keys':>16} {'beyond window':>22} {'beyond reach':>22} "
        f"{'key straddles':>22} {'answer straddles':>22} {'neither':>22}"
    )
    for name, r in results.items():
        for m in MULTIPLES:
            e = r[f"{m}x"]
            cells = [f"{e['key_acc']:.1%} ({e['digit_acc']:.1%})"]
            for b in cols:
                cells.append(
                    f"{e[f'{b}_key_acc']:.1%} ({e[f'{b}_digit_acc']:.1%}) n={e[f'n_{b}']}"
                    if e[f"n_{b}"]
                    else "-"
                )
            print(f"{name:<64} {m:>3}x {cells[0]:>16} " + " ".join(f"{c:>22}" for c in cells[1:]))
    if args.json:
        write_json(Path(args.json), results)
    if args.by_seed:
        seed_table(results)


def seed_table(results: dict) -> None:
    """Runs named NAME-s<seed> -> one row per NAME: the mean over seeds, and each seed's value."""
    import re
    from statistics import mean

    groups: dict[str, list[dict]] = {}
    for name, r in results.items():
        groups.setdefault(re.sub(r"-s\d+$", "", name.split(" (")[0]), []).append(r)
    cols = [("1x", "key_acc"), ("2x", "key_acc"), ("4x", "key_acc"), ("4x", "beyond_reach_key_acc"),
            ("8x", "key_acc"), ("8x", "beyond_reach_key_acc")]  # fmt: skip
    print("\nmean key accuracy over seeds (each seed's in brackets)")
    print(
        f"{'variant':<16} {'seeds':>5} "
        + " ".join(f"{m + (' reach' if 'reach' in k else ''):>22}" for m, k in cols)
    )
    for g, rs in groups.items():
        cells = []
        for m, k in cols:
            v = [r[m][k] for r in rs if k in r[m]]
            cells.append(f"{mean(v):.1%} ({'/'.join(f'{x:.0%}' for x in v)})" if v else "-")
        print(f"{g:<16} {len(rs):>5} " + " ".join(f"{c:>22}" for c in cells))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(required=True)
    t = sub.add_parser("train", help="train one model on the pass-key task")
    t.add_argument("--memory", choices=["on", "off"], required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--window", type=int, default=64)
    t.add_argument("--steps", type=int, default=1200)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--optimizer", choices=["adamw", "muon"], default="muon")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--muon-lr", type=float, default=0.02)
    t.add_argument("--mem-max-lr", type=float, default=0.1)
    t.add_argument("--mem-chunk", type=int, default=16)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--dim", type=int, default=256, help="model width (heads of 64, ffn 3x)")
    t.add_argument("--max-windows", type=int, default=4, help="training lengths reach this many windows")
    t.add_argument("--block", choices=["mal", "mac", "mag"], default="mal")
    t.add_argument("--conv", type=int, default=0, help="memory q/k/v causal conv kernel (0: off)")
    t.add_argument(
        "--norm-v", choices=["on", "off"], help="l2-normalise the memory's values (default: config)"
    )
    t.add_argument("--forget-bias", choices=["chunk", "token"], help="default: the config's")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="any model config key (repeatable)")
    t.add_argument(
        "--curriculum", type=int, default=0, help="first N steps: keys one segment before the query"
    )
    t.add_argument("--warmup", type=int, default=100)
    # fp32: on CPU, bf16 autocast made these small steps 3-6x slower (runs before this default used bf16)
    t.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=train)
    e = sub.add_parser("eval", help="greedy pass-key accuracy at 1x, 2x, 4x the window")
    e.add_argument("runs", nargs="+")
    e.add_argument("--n", type=int, default=500)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--json")
    e.add_argument(
        "--by-seed", action="store_true", help="also a table of runs NAME-s<seed> averaged by NAME"
    )
    e.add_argument(
        "--offset", type=int, default=0, help="evaluate at m x window + OFFSET tokens (2: answers straddle)"
    )
    e.set_defaults(func=eval_cmd)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
