"""The time cost of logit distillation per training step: student forward + backward + optimizer step with the
plain next-token loss vs with `kd_loss` against a frozen teacher's forward (fp32 or bf16), interleaved round by
round in one process, so machine load hits both alike. Also the chunked loss alone against lm_loss.

    python benchmarks/distill_step.py --student debug --teacher-layers 4 --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from kititans.models.lite import lm_loss
from kititans.models.spec import find_preset
from kititans.train.distill import kd_loss


def model(preset: str, **over: int) -> torch.nn.Module:
    spec, p = find_preset(preset, "lite")
    return spec.build(spec.make_config(p.name, over))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", default="debug")
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--teacher-dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    s = model(a.student)
    v = s.config.vocab_size
    teachers = {
        "fp32": model(a.student, n_layers=a.teacher_layers, dim=a.teacher_dim).eval().requires_grad_(False),
    }
    teachers["bf16"] = (
        model(a.student, n_layers=a.teacher_layers, dim=a.teacher_dim).eval().requires_grad_(False)
    )
    teachers["bf16"].to(torch.bfloat16)
    opt = torch.optim.AdamW(s.parameters(), lr=1e-4)
    x = torch.randint(0, v, (a.batch, a.seq))
    y = torch.randint(0, v, (a.batch, a.seq))

    def step(kind: str) -> float:
        t0 = time.perf_counter()
        if kind == "plain":
            loss = lm_loss(s(x), y)
        else:
            with torch.no_grad():
                t = teachers[kind](x)
            loss = kd_loss(s(x), y, None, t, alpha=0.5, temperature=2.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def loss_only(kind: str) -> float:
        logits = torch.randn(a.batch, a.seq, v, requires_grad=True)
        t = torch.randn(a.batch, a.seq, v)
        t0 = time.perf_counter()
        loss = lm_loss(logits, y) if kind == "lm_loss" else kd_loss(logits, y, None, t, 0.5, 2.0)
        loss.backward()
        return time.perf_counter() - t0

    kinds = ("plain", "fp32", "bf16")
    for k in kinds:
        step(k)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in (*kinds, "lm_loss", "kd_loss")}
    for _ in range(a.rounds):
        for k in kinds:
            times[k].append(step(k))
        for k in ("lm_loss", "kd_loss"):
            times[k].append(loss_only(k))
    med = {k: statistics.median(t) for k, t in times.items()}
    print(f"student {a.student} ({sum(p.numel() for p in s.parameters()) / 1e6:.2f}M), teacher "
          f"{a.teacher_layers} x {a.teacher_dim} ({sum(p.numel() for p in teachers['fp32'].parameters()) / 1e6:.2f}M), "
          f"batch {a.batch} x {a.seq}, vocab {v}, {a.threads} thread(s), median of {a.rounds} interleaved rounds")  # fmt: skip
    for k in kinds:
        print(f"  step {k:6s} {med[k] * 1000:8.1f} ms  ({med[k] / med['plain']:.2f}x plain)")
    print(f"  loss alone: lm_loss {med['lm_loss'] * 1000:.1f} ms, kd_loss {med['kd_loss'] * 1000:.1f} ms "
          f"({med['kd_loss'] / med['lm_loss']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
