"""kititans sft: chat fine-tuning of a pretrained run into a new run directory; resumable."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kititans.commands.common import TRAINING_FLAG_KEYS, add_reset_schedule

HELP = "chat fine-tuning: teach a pretrained run the chat template (loss on assistant turns only)"
EXAMPLES = """  kititans sft runs/tiny-base                          # built-in chat examples -> runs/tiny-base-sft
  kititans sft runs/tiny-base --data chats.jsonl --out runs/tiny-chat
  kititans sft runs/tiny-base --data alpaca.json --format alpaca --steps 1000 --lr 5e-4
  kititans sft runs/tiny-base --optimizer muon --set sft.val_fraction=0.1
  kititans sft runs/tiny-base --resume                 # continue runs/tiny-base-sft where it stopped
  kititans sft runs/tiny-base --eval-only              # val loss of the base on the SFT val split

data formats (detected, or --format): JSONL/JSON/Parquet records with "messages" [{role, content}],
Alpaca {instruction, input, output}, ShareGPT {conversations: [{from, value}]}, Guanaco {text:
"### Human: ... ### Assistant: ..."}, or a .txt file whose turns start with <user> / <assistant> lines."""

# flag -> dotted config key
FLAG_KEYS = {
    "data": "sft.data",
    "format": "sft.format",
    **TRAINING_FLAG_KEYS,
}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run", metavar="RUN", help="the pretrained run directory to fine-tune (it is not modified)"
    )
    p.add_argument("--data", nargs="+", help="chat files/dirs/globs (default: the built-in chat examples)")
    p.add_argument(
        "--format",
        choices=["auto", "messages", "alpaca", "sharegpt", "guanaco", "text"],
        help="chat data format (default: detected per file)",
    )
    p.add_argument("--out", help="new run directory (default: RUN-sft)")
    p.add_argument("--config", help="a YAML recipe (see configs/sft-tiny.yaml)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], help="default adamw")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3, a third of pretraining's)")
    p.add_argument("--muon-lr", type=float, help="Muon learning rate (with --optimizer muon)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 600)")
    p.add_argument("--batch-size", type=int, help="conversations per micro-batch")
    p.add_argument("--seq-len", type=int, help="longest conversation in tokens (default: the model context)")
    p.add_argument("--device", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 where fast")
    p.add_argument("--compile", choices=["auto", "on", "off"], help="torch.compile")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    p.add_argument(
        "--resume", action="store_true", help="continue the SFT run (RUN-sft, --out, or RUN itself)"
    )
    add_reset_schedule(p)
    p.add_argument(
        "--eval-only",
        action="store_true",
        help="print RUN's val loss on assistant tokens of the SFT val split; train nothing",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def resolve(args: argparse.Namespace) -> tuple[Any, bool]:
    """(RunConfig, resume) from the flags; --resume continues RUN itself when RUN is an SFT run."""
    from kititans.checkpoint import read_meta
    from kititans.config import load_recipe, parse_set
    from kititans.train.sft import default_out, resume_config, sft_config

    layers: list[tuple[str, Any]] = load_recipe(args.config) if args.config else []
    layers += parse_set(args.set)
    layers += [(k, getattr(args, f)) for f, k in FLAG_KEYS.items() if getattr(args, f) is not None]
    if args.resume:
        run = Path(args.run)
        own = read_meta(run).get("stage") == "sft" and (run / "train_state").is_dir()
        target = Path(args.out) if args.out else run if own else default_out(run)
        return resume_config(target, layers), True
    if args.out:
        layers.append(("out", args.out))
    return sft_config(args.run, layers), False


def run(args: argparse.Namespace) -> int:
    cfg, resume = resolve(args)
    if args.eval_only:
        from kititans.train.sft import sft_eval

        r = sft_eval(cfg, args.run, progress=not args.quiet)
        print(
            f"{r.model}: val loss on assistant tokens {r.val_loss:.4f} (perplexity {r.ppl:.2f}; "
            f"{r.conversations} conversations, {r.assistant_tokens} assistant tokens)"
        )
        return 0
    from kititans.train.sft import sft

    result = sft(cfg, resume=resume, progress=not args.quiet)
    report(result, cfg)
    return 130 if result.interrupted else 0


def report(r: Any, cfg: Any) -> None:
    mins, secs = divmod(int(r.seconds), 60)
    d = r.extra.get("data", {})
    print(
        f"\nrun: {r.run_dir}  (fine-tuned from {cfg.sft.base}; step {r.step}/{r.total_steps}, "
        f"{r.tokens:,} tokens in {mins}m{secs:02d}s)"
    )
    print(
        f"data: {d.get('train_conversations')} train / {d.get('val_conversations')} val conversations"
        + (
            f", {d['truncated']} truncated, {d['skipped']} skipped"
            if d.get("truncated") or d.get("skipped")
            else ""
        )
    )
    before = r.extra.get("initial_val_loss")
    if r.val_loss is not None:
        was = f"{before:.4f} before SFT -> " if before is not None else ""
        print(f"val loss on assistant tokens: {was}{r.val_loss:.4f}")
    if r.interrupted:
        print(f"interrupted; continue with: kititans sft {r.run_dir} --resume")
        return
    from kititans.commands.common import export_hint

    print("next:")
    print(f"  kititans chat {r.run_dir}")
    print(f"  {export_hint(r.run_dir)}")
