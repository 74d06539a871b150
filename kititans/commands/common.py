"""Flags shared by several verbs."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from kititans.errors import KititansError
from kititans.generate import SamplingConfig, SamplingError

# the training flags `train` and `sft` share -> the config keys they set
TRAINING_FLAG_KEYS = {
    "optimizer": "optim.name",
    "lr": "optim.lr",
    "muon_lr": "optim.muon_lr",
    "steps": "train.steps",
    "batch_size": "train.batch_size",
    "seq_len": "train.seq_len",
    "device": "train.device",
    "dtype": "train.dtype",
    "compile": "train.compile",
    "reset_schedule": "train.reset_schedule",
}


def add_reset_schedule(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--reset-schedule",
        action="store_true",
        default=None,
        help="with --resume and other --steps: a new lr schedule over them (default: the run keeps the one "
        "it started with; a cosine run refuses other --steps)",
    )


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument(
        "--top-k", type=int, default=40, help="keep the k most likely tokens; 0 = off (default 40)"
    )
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling; 1 = off (default 0.95)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * p_max; 0 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats; 1 = off")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument(
        "--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})"
    )


def sampling_from_args(args: argparse.Namespace) -> SamplingConfig:
    """The sampling flags as a checked SamplingConfig (a value out of range is one line naming the flag)."""
    cfg = SamplingConfig(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
    )
    try:
        return cfg.check()
    except SamplingError as e:
        flag = "--" + e.param.replace("_", "-")
        raise KititansError(str(e).replace(e.param, flag, 1)) from None


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run directory, a .gguf file, an ONNX export folder or a .mlpackage")
    p.add_argument(
        "--runtime",
        choices=["torch", "llamacpp", "onnx", "genai", "coreml"],
        default=None,
        help="default: chosen from the model path",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="torch: cpu, cuda[:N], mps, auto; onnx: cpu, cuda[:N], auto; genai: cpu, cuda; "
        "llamacpp: cpu; coreml: cpu, gpu, ane, all, auto (default cpu)",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: all cores)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch runtime, Titans: decode through torch.compile'd fixed-shape steps (faster tokens after "
        "a compile of about a minute per kind of step)",
    )


# the --device values each runtime takes ("cuda:N" = cuda:0, cuda:1, ...)
DEVICES = {
    "torch": ("cpu", "cuda", "cuda:N", "mps", "auto"),
    "onnx": ("cpu", "cuda", "cuda:N", "auto"),
    "genai": ("cpu", "cuda"),
    "llamacpp": ("cpu", "auto"),
    "coreml": ("cpu", "gpu", "ane", "all", "auto"),
}
MAX_THREADS = 4096


def check_runtime_args(runtime: str, device: str, threads: int) -> None:
    """One line for a device the runtime cannot use or a thread count that is not a count."""
    valid = DEVICES.get(runtime, ())
    ok = device in valid or ("cuda:N" in valid and re.fullmatch(r"cuda:\d+", device) is not None)
    if valid and not ok:
        raise KititansError(
            f"--device {device!r}: the {runtime} runtime runs on {', '.join(valid)} "
            f"(pick another --device or another --runtime)"
        )
    if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= MAX_THREADS:
        raise KititansError(
            f"--threads must be 0 (all cores) or a count from 1 to {MAX_THREADS}, got {threads}"
        )


def open_runtime(args: argparse.Namespace, task: str = "lm", **options: Any) -> Any:
    """The runtime for args.model (a run dir, .gguf, ONNX folder or .mlpackage), after checking --device and
    --threads against it; `options` go to the runtime (runtimes ignore the ones they do not take). The
    model must do `task`: "lm" (generate, chat, serve) or "embed" (embed, search)."""
    from kititans.errors import KititansError
    from kititans.runtimes import detect_runtime, load_runtime

    runtime = args.runtime or detect_runtime(args.model)
    check_runtime_args(runtime, args.device, args.threads)
    if getattr(args, "compile", False):
        if runtime != "torch":
            raise KititansError(
                f"--compile is for the torch runtime (a run directory); the {runtime} runtime has its own "
                "compiled graphs: drop --compile"
            )
        options["compile"] = True
    rt = load_runtime(args.model, runtime, device=args.device, threads=args.threads, **options)
    have = getattr(rt, "task", "lm")
    if have == "embed" and task == "lm":
        raise KititansError(
            f"{args.model} is an embedding model (an encoder), not a language model: use `kititans embed` "
            "or `kititans search`"
        )
    if have == "lm" and task == "embed":
        raise KititansError(
            f"{args.model} is a language model: embed and search need an encoder run "
            "(kititans train --family encoder)"
        )
    return rt


def model_stage(model: str | Path, rt: Any = None) -> str | None:
    """The training stage ("pretrain", "sft") of a run directory or of an export inside one (from the nearest
    config.json with a kititans section), else what a GGUF file says (kititans.stage); None if unknown."""
    path = Path(model).resolve()
    for d in [path, *list(path.parents)[:4]]:
        cfg = d / "config.json"
        if not cfg.is_file():
            continue
        try:
            meta = json.loads(cfg.read_text(encoding="utf-8")).get("kititans")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(meta, dict) and isinstance(meta.get("stage"), str):
            return meta["stage"]
    metadata = getattr(rt, "metadata", None)
    return metadata("kititans.stage") if callable(metadata) else None


def warn_if_base_model(model: str | Path, rt: Any = None) -> None:
    """The one-line warning `chat`, `generate --chat` and `serve` print for a model that was only pretrained."""
    if model_stage(model, rt) == "pretrain":
        print(
            f"warning: {model} is a pretrain-stage model (never fine-tuned for chat), so its replies will not "
            f"follow the conversation; fine-tune it first: kititans sft RUN --data chats.jsonl",
            file=sys.stderr,
        )


def export_hint(run_dir: Any) -> str:
    """The export command to suggest for a run: GGUF q4 where llama.cpp can run the family, else the first
    format it supports (Titans: onnx int4)."""
    from kititans.checkpoint import read_meta
    from kititans.models.spec import Unsupported, get_family

    formats = get_family(read_meta(run_dir)["family"]).formats
    for fmt in ("gguf", "onnx", "coreml"):
        if fmt in formats and not isinstance(formats[fmt], Unsupported):
            return f"kititans export {run_dir} --format {fmt} --q4"
    return f"kititans export {run_dir} --format onnx"
