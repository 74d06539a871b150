"""Training tokens/s of KiTitans Lite vs transformers.LlamaForCausalLM, same config, same weights, same
batches, same optimizer (AdamW), measured interleaved in one run, plus the loss after the same steps.

  (a) our default recipe (bf16 autocast where the CPU has fast bf16, torch.compile per the `auto` rule)
      vs HF's default (fp32 eager)                                  target >= 2x at equal or better loss
  (b) both with the same dtype and compile setting                  target >= 1.0x

usage: python benchmarks/train_speed.py [--models tiny,lite-42m] [--steps 12] [--out bench_out/train_speed.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved, machine, md_table, median, write_json
from kititans.device import resolve_compile, resolve_dtype
from kititans.models.lite import SPEC, LiteModel, hf_llama_config, lm_loss
from kititans.models.spec import count_params


def make_pair(preset: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = SPEC.make_config(preset)
    torch.manual_seed(seed)
    ours = LiteModel(cfg)
    hf_cfg = {k: v for k, v in hf_llama_config(cfg).items() if k != "architectures"}
    hf = LlamaForCausalLM(LlamaConfig(**hf_cfg))
    hf.load_state_dict(ours.state_dict(), strict=False)  # same names: identical weights
    hf.tie_weights()
    return cfg, ours, hf


class Trainer:
    """One model + AdamW + a fixed stream of batches; step() runs forward, backward, optimizer."""

    def __init__(self, model, kind: str, dtype: torch.dtype, compile_: bool, batches):
        self.model, self.kind, self.dtype, self.batches = model.train(), kind, dtype, batches
        self.fwd = torch.compile(model) if compile_ else model
        self.opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
        self.i, self.losses = 0, []

    def step(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        ctx = (
            torch.autocast("cpu", dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        with ctx:
            if self.kind == "ours":
                loss = lm_loss(self.fwd(x), y)
            else:
                logits = self.fwd(input_ids=x).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(loss.item())


def bench_model(preset: str, steps: int, batch: int, seq: int) -> list[dict]:
    cfg, ours0, _ = make_pair(preset)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, cfg.vocab_size, (steps + 4, batch, seq + 1), generator=g)
    # a learnable signal: each sequence repeats a short random pattern, so losses fall and can be compared
    pattern = torch.randint(0, cfg.vocab_size, (steps + 4, batch, 17), generator=g)
    data = pattern.repeat(1, 1, (seq + 1) // 17 + 1)[..., : seq + 1]
    batches = [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]
    default_dtype = resolve_dtype("auto", torch.device("cpu"))
    default_compile = resolve_compile("auto", torch.device("cpu"), count_params(ours0))
    variants = {
        "ours default": ("ours", default_dtype, default_compile),
        "hf default (fp32 eager)": ("hf", torch.float32, False),
        "ours fp32 eager": ("ours", torch.float32, False),
        "ours bf16 eager": ("ours", torch.bfloat16, False),
        "hf bf16 eager": ("hf", torch.bfloat16, False),
    }
    if default_compile:
        variants["hf default dtype+compile"] = ("hf", default_dtype, True)
    trainers = {}
    for name, (kind, dtype, comp) in variants.items():
        _, o, h = make_pair(preset)
        trainers[name] = Trainer(o if kind == "ours" else h, kind, dtype, comp, batches)
    times = interleaved({k: t.step for k, t in trainers.items()}, repeats=steps, warmup=2)
    tokens = batch * seq
    rows = []
    for name, t in trainers.items():
        rows.append(
            {
                "model": preset,
                "params": f"{count_params(ours0) / 1e6:.1f}M",
                "variant": name,
                "dtype": str(variants[name][1]).removeprefix("torch."),
                "compile": variants[name][2],
                "tokens/s": round(tokens / median(times[name])),
                "loss after": round(t.losses[-1], 4),
            }
        )
    by = {r["variant"]: r for r in rows}
    by["ours default"]["ratio"] = round(
        by["ours default"]["tokens/s"] / by["hf default (fp32 eager)"]["tokens/s"], 2
    )
    by["ours fp32 eager"]["ratio"] = round(
        by["ours fp32 eager"]["tokens/s"] / by["hf default (fp32 eager)"]["tokens/s"], 2
    )
    by["ours bf16 eager"]["ratio"] = round(
        by["ours bf16 eager"]["tokens/s"] / by["hf bf16 eager"]["tokens/s"], 2
    )
    if "hf default dtype+compile" in by:
        by["ours default"]["ratio vs same setting"] = round(
            by["ours default"]["tokens/s"] / by["hf default dtype+compile"]["tokens/s"], 2
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,lite-42m")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out", default="bench_out/train_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for m in args.models.split(","):
        rows += bench_model(m, args.steps, args.batch, args.seq)
        print(
            md_table(
                [r for r in rows if r["model"] == m],
                [
                    "model",
                    "params",
                    "variant",
                    "dtype",
                    "compile",
                    "tokens/s",
                    "ratio",
                    "ratio vs same setting",
                    "loss after",
                ],
            ),
            flush=True,
        )
    write_json(args.out, {"machine": machine(), "batch": args.batch, "seq": args.seq, "rows": rows})


if __name__ == "__main__":
    main()
