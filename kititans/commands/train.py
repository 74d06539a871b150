"""kititans train: the whole first run (data, tokenizer, model) or any stage reused; resumable."""

from __future__ import annotations

import argparse
from typing import Any

from kititans.commands.common import TRAINING_FLAG_KEYS, add_reset_schedule

HELP = "train a model (Lite or Titans) with AdamW or Muon; no flags: built-in corpus, tiny preset"
EXAMPLES = """  kititans train                                           # built-in corpus, tiny preset, minutes on a CPU
  kititans train --data my_corpus/ --preset lite-42m --optimizer muon
  kititans train --data data/ja data/wiki --weights 0.7,0.3     # a mixture of prepared datasets
  kititans train --data data/prepared --tokenizer data/prepared --steps 5000 --out runs/mine
  kititans train --config configs/tiny-muon.yaml --set optim.muon_lr=0.03 --set train.batch_size=32
  kititans train --resume runs/mine                        # continue a run exactly (any number of devices)
  kititans train --resume runs/mine --steps 8000 --reset-schedule   # extend it: a new lr schedule
  kititans train --preset titans-500m --dry-run           # print the parameter table only
  kititans train --nproc 2 --data data/ja --preset lite-125m --log tensorboard   # 2 processes (DDP)
  torchrun --nproc-per-node 8 -m kititans train --data data/ja --preset titans-500m --optimizer muon
  kititans report runs/mine                               # loss / lr / throughput curves (PNG + HTML)"""

# flag -> dotted config key
FLAG_KEYS = {
    "preset": "preset",
    "family": "family",
    "data": "data.sources",
    "weights": "data.weights",
    "dataset": "data.dataset",
    "text_field": "data.text_field",
    "tokenizer": "tokenizer.path",
    "init": "init",
    "vocab_size": "tokenizer.vocab_size",
    **TRAINING_FLAG_KEYS,
    "grad_accum": "train.grad_accum",
    "global_batch": "train.global_batch",
    "parallel": "train.parallel",
    "save_every": "train.save_every",
    "eval_every": "train.eval_every",
    "keep": "train.keep",
    "keep_best": "train.keep_best",
    "log": "train.log",
    "out": "out",
}


def _weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers like 0.7,0.3, got {text!r}"
        ) from None


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML recipe (see configs/)")
    p.add_argument("--preset", help="model preset: debug, tiny, lite-42m, lite-125m, lite-350m, titans-*")
    p.add_argument(
        "--family", choices=["lite", "titans", "encoder"], help="model family (default: the preset's)"
    )
    p.add_argument(
        "--init",
        metavar="RUN",
        help="start from RUN's matching weights (an encoder from a Lite run, same tokenizer)",
    )
    p.add_argument("--data", nargs="+", help="text files/dirs/globs, or a folder prepared by `kititans data`")
    p.add_argument(
        "--weights",
        type=_weights,
        help="mixture weights for several prepared --data datasets, e.g. 0.7,0.3 (sampled at train time)",
    )
    p.add_argument("--dataset", help="a Hugging Face dataset NAME[:CONFIG] (needs network)")
    p.add_argument("--text-field", help="JSON/parquet/dataset text column (default: text)")
    p.add_argument("--tokenizer", help="reuse a tokenizer (tokenizer dir, run dir or shards dir)")
    p.add_argument("--vocab-size", type=int, help="vocabulary of a newly trained tokenizer")
    p.add_argument("--optimizer", choices=["adamw", "muon"], help="default adamw")
    p.add_argument("--lr", type=float, help="AdamW learning rate")
    p.add_argument("--muon-lr", type=float, help="Muon learning rate (with --optimizer muon)")
    p.add_argument("--steps", type=int, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--device", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument(
        "--dtype", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 where fast, else fp32"
    )
    p.add_argument("--compile", choices=["auto", "on", "off"], help="torch.compile (auto: on where it works)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step on each rank")
    p.add_argument("--out", help="run directory (default runs/<preset>-<time>)")
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue RUN from its newest committed checkpoint (any number of devices)",
    )
    add_reset_schedule(p)
    g = p.add_argument_group("several devices, checkpoints, tracking")
    g.add_argument(
        "--nproc",
        type=int,
        help="launch N processes on this machine (torchrun for you; one per GPU, or CPU ranks)",
    )
    g.add_argument(
        "--parallel",
        choices=["auto", "none", "ddp", "fsdp"],
        help="under torchrun: ddp, or fsdp (FSDP2 sharding); auto = fsdp from 300M parameters (default)",
    )
    g.add_argument(
        "--global-batch",
        type=int,
        help="sequences per optimizer step over all ranks (fixes grad-accum = global / (batch-size x ranks))",
    )
    g.add_argument("--save-every", type=int, help="commit a checkpoint every N steps (checkpoints/step-N/)")
    g.add_argument("--eval-every", type=int, help="validation every N steps")
    g.add_argument("--keep", type=int, help="checkpoints to keep (default 2, the newest)")
    g.add_argument(
        "--keep-best",
        action="store_true",
        default=None,
        help="also keep the checkpoint with the best val loss",
    )
    g.add_argument(
        "--log",
        choices=["none", "tensorboard", "wandb", "trackio"],
        help="also send the metrics to a tracker (pip install 'kititans[tensorboard|wandb|trackio]')",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    p.add_argument("--dry-run", action="store_true", help="print the model and parameter table, do not train")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def resolve(args: argparse.Namespace) -> Any:
    from kititans.checkpoint import read_meta
    from kititans.config import flatten, load_recipe, parse_set, resolve_run_config
    from kititans.errors import KititansError
    from kititans.models.spec import find_preset

    layers: list[tuple[str, Any]] = []
    if args.resume:
        run = read_meta(args.resume).get("run")
        if not run:
            raise KititansError(f"{args.resume} has no saved run config to resume")
        # how the saved run was launched is not part of the run: a resume may use other devices
        launch = {"train.parallel", "train.threads"}
        layers += [*(kv for kv in flatten(run) if kv[0] not in launch), ("out", args.resume)]
    if args.config:
        layers += load_recipe(args.config)
    layers += parse_set(args.set)
    layers += [
        (key, getattr(args, flag)) for flag, key in FLAG_KEYS.items() if getattr(args, flag) is not None
    ]

    def hints(family: str | None, preset: str) -> tuple[str, list[tuple[str, Any]]]:
        spec, p = find_preset(preset, family)
        return spec.name, list(p.train.items())

    return resolve_run_config(layers, hints)


def print_dry_run(cfg: Any) -> None:
    import torch

    from kititans.models.spec import count_params, find_preset, param_table

    spec, preset = find_preset(cfg.preset, cfg.family)
    mcfg = spec.make_config(preset.name, cfg.model)
    with torch.device("meta"):
        model = spec.build(mcfg)
    component = getattr(spec.model_cls, "component", None)
    rows = param_table(model, component) if component else [("all", count_params(model))]
    total = count_params(model)
    print(f"{spec.name} / {preset.name}: {preset.description}")
    print("  " + ", ".join(f"{k}={v}" for k, v in vars(mcfg).items()))
    width = max(len(r[0]) for r in rows)
    for name, n in rows:
        print(f"  {name:<{width}}  {n:>14,}  {n / total:6.1%}")
    print(f"  {'total':<{width}}  {total:>14,}  ({total / 1e6:.2f}M)")
    t = cfg.train
    print(
        f"training: {t.steps} steps x {t.batch_size * t.seq_len * t.grad_accum:,} tokens, optimizer {cfg.optim.name}"
    )


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def run(args: argparse.Namespace) -> int:
    import logging
    import os

    cfg = resolve(args)
    if args.dry_run:
        print_dry_run(cfg)
        return 0
    if args.nproc and "WORLD_SIZE" not in os.environ:
        from kititans.train.distributed import launch

        return launch(args.nproc, _without_nproc(list(args._argv)))
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        logging.getLogger("kititans").setLevel(logging.ERROR)
    result = trainer_for(cfg)(cfg, resume=bool(args.resume), progress=not args.quiet)
    if os.environ.get("RANK", "0") != "0":
        return 130 if result.interrupted else 0
    report(result, interrupted_hint=f"kititans train --resume {result.run_dir}")
    return 130 if result.interrupted else 0


def trainer_for(cfg: Any) -> Any:
    """The training driver of the family's task: next-token pretraining, or contrastive for "embed"."""
    from kititans.models.spec import find_preset

    spec, _ = find_preset(cfg.preset, cfg.family)
    if spec.task == "embed":
        from kititans.train.contrastive import train_encoder

        return train_encoder
    if cfg.init:
        from kititans.errors import KititansError

        raise KititansError(
            f"--init starts an encoder from a Lite run; a {spec.name} run continues with --resume, or is "
            "fine-tuned with `kititans sft`"
        )
    from kititans.train.pretrain import pretrain

    return pretrain


def report(result: Any, interrupted_hint: str) -> None:
    import math

    r = result
    mins, secs = divmod(int(r.seconds), 60)
    print(
        f"\nrun: {r.run_dir}  (step {r.step}/{r.total_steps}, {r.tokens:,} tokens in {mins}m{secs:02d}s, "
        f"{r.tokens_per_s:,.0f} tokens/s)"
    )
    report_ = r.extra.get("eval_report")
    if report_:  # an encoder: retrieval on the held-out pairs, with TanAILite's acceptance for context
        m, th = report_["metrics"], report_["thresholds"]
        print(
            f"held-out pairs ({m.get('pairs', 0)} queries, {m.get('candidates', 0)} candidates, pair level):"
        )
        for key, name in (("retrieval_at1", "retrieval@1"), ("mrr", "MRR"), ("mean_margin", "mean margin")):
            if key in m:
                ok = "ok" if m[key] > th[key] else "below"
                print(f"  {name:<12} {m[key]:.4f}   (TanAILite accepts > {th[key]}: {ok})")
        if "recall_at5" in m:
            print(f"  {'recall@5':<12} {m['recall_at5']:.4f}")
        for line in (report_.get("documents") or {}).get("lines", []):  # document-level, lexical beside
            print(line)
    elif r.val_loss is not None:
        print(f"val loss {r.val_loss:.4f} (perplexity {math.exp(min(r.val_loss, 50)):.2f})")
    if r.interrupted:
        print(f"interrupted; continue with: {interrupted_hint}")
        return
    if report_:
        print("next:")
        print(f'  kititans embed {r.run_dir} --text "how do I reset my password?"')
        print(f'  kititans search {r.run_dir} --docs notes/ --query "reset password" --top 5')
        print(f"  kititans export {r.run_dir} --format onnx --quant int8")
        return
    from kititans.commands.common import export_hint

    print("next:")
    print(f'  kititans generate {r.run_dir} --prompt "Once upon a time"')
    print(f"  kititans chat {r.run_dir}")
    print(f"  kititans sft {r.run_dir}              # chat fine-tuning")
    print(f"  {export_hint(r.run_dir)}")
