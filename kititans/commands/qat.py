"""kititans qat: quantization-aware fine-tuning of a trained run for one export level, into a new run dir."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "quantization-aware fine-tuning: train a run to lose less at one export level (q4_0, int4, ...)"
EXAMPLES = """  kititans qat runs/my-run --target gguf:q4_0          # ~10% of the run's steps -> runs/my-run-qat-q4_0
  kititans export runs/my-run-qat-q4_0 --format gguf --quant q4_0
  kititans bench runs/my-run --with runs/my-run-qat-q4_0 # PTQ and QAT rows against the fp32 model
  kititans qat runs/my-run --target onnx:int4 --fraction 0.2
  kititans qat runs/my-run --target gguf:q4_k_m --steps 300 --lr 2e-4
  kititans qat runs/my-run --target coreml:int4 --data my-shards/   # when the run's own data is gone
  kititans qat runs/my-run --target gguf:q4_0 --resume  # continue runs/my-run-qat-q4_0

targets: gguf:q4_0 gguf:q4_k_m gguf:q8_0 (Lite), onnx:int4 onnx:int8, coreml:int4 coreml:int8 (Lite, Titans).
The fake quantization is the exporter's own rounding, so exporting the QAT run at its target gives exactly
the weights it trained with (docs/qat.md)."""

FLAG_KEYS = {
    "lr": "optim.lr",
    "muon_lr": "optim.muon_lr",
    "batch_size": "train.batch_size",
    "seq_len": "train.seq_len",
    "device": "train.device",
    "dtype": "train.dtype",
}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="the trained run directory to fine-tune (it is not modified)")
    p.add_argument("--target", required=True, metavar="FORMAT:LEVEL", help="the export level, e.g. gguf:q4_0")
    p.add_argument("--steps", type=int, help="optimizer steps (default: --fraction of the run's steps)")
    p.add_argument(
        "--fraction", type=float, default=0.1, help="QAT steps as a share of the run's steps (default 0.1)"
    )
    p.add_argument(
        "--refresh",
        type=int,
        default=8,
        metavar="N",
        help="q4_k_m: search the K-quant scales every N steps, round with the last ones between (default 8; "
        "evaluation and export always search)",
    )
    p.add_argument(
        "--loss",
        choices=["distill", "ce"],
        default="distill",
        help="distill: match the float run's next-token distribution (default); ce: the data's next tokens",
    )
    p.add_argument("--data", type=Path, help="token data to train on (default: the run's own training data)")
    p.add_argument("--out", type=Path, help="new run directory (default: RUN-qat-LEVEL)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: the run's peak x 0.01)")
    p.add_argument("--muon-lr", type=float, help="Muon learning rate (with a Muon run)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch (default: the run's)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the run's)")
    p.add_argument("--device", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 where fast")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    p.add_argument(
        "--resume", action="store_true", help="continue the QAT run (RUN-qat-LEVEL, --out, or RUN)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def resolve(args: argparse.Namespace) -> tuple[Any, Any, bool]:
    """(QatSpec, RunConfig, resume) from the flags."""
    from kititans.checkpoint import read_meta
    from kititans.config import parse_set
    from kititans.quantize.qat import parse_target, run_target
    from kititans.train.qat import QatSpec, default_out, qat_config, resume_spec

    target = parse_target(args.target)
    layers: list[tuple[str, Any]] = parse_set(args.set)
    layers += [(k, getattr(args, f)) for f, k in FLAG_KEYS.items() if getattr(args, f) is not None]
    run = Path(args.run)
    if args.resume:
        own = run_target(read_meta(run)) is not None
        out = args.out or (run if own else default_out(run, target))
        spec, cfg = resume_spec(Path(out), layers + [("train.steps", args.steps)] * (args.steps is not None))
        return spec, cfg, True
    spec = QatSpec(
        run,
        target,
        args.out or default_out(run, target),
        args.data,
        args.steps,
        args.fraction,
        args.refresh,
        args.loss,
    )
    return spec, qat_config(spec, layers), False


def run(args: argparse.Namespace) -> int:
    spec, cfg, resume = resolve(args)
    from kititans.train.qat import qat

    result = qat(spec, cfg, resume=resume, progress=not args.quiet)
    report(result, spec)
    return 130 if result.interrupted else 0


def report(r: Any, spec: Any) -> None:
    mins, secs = divmod(int(r.seconds), 60)
    e = r.extra
    print(
        f"\nrun: {r.run_dir}  ({spec.target.name} QAT of {spec.base}; step {r.step}/{r.total_steps}, "
        f"{r.tokens:,} tokens in {mins}m{secs:02d}s)"
    )
    if e.get("base_seconds"):
        print(f"extra training time: {100 * r.seconds / e['base_seconds']:.1f}% of the base run's")
    fl, ptq = e.get("float_val_loss"), e.get("ptq_val_loss")
    if r.val_loss is not None and fl is not None and ptq is not None:
        print(
            f"val loss: float {fl:.4f}, {spec.target.level} before QAT {ptq:.4f} (+{ptq - fl:.4f}), "
            f"after QAT {r.val_loss:.4f} ({r.val_loss - fl:+.4f})"
        )
    if r.interrupted:
        print(f"interrupted; continue with: kititans qat {r.run_dir} --target {spec.target.name} --resume")
        return
    fmt, level = spec.target.format, spec.target.level
    print("next:")
    print(f"  kititans export {r.run_dir} --format {fmt} --quant {level}")
    print(f"  kititans bench {spec.base} --with {r.run_dir}")
