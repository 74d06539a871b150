"""Flags shared by several verbs."""

from __future__ import annotations

import argparse
from typing import Any

from kititans.generate import SamplingConfig

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
}


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
    return SamplingConfig(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
    )


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run directory, a .gguf file, an ONNX export folder or a .mlpackage")
    p.add_argument(
        "--runtime",
        choices=["torch", "llamacpp", "onnx", "genai", "coreml"],
        default=None,
        help="default: chosen from the model path",
    )
    p.add_argument("--device", default="cpu", help="torch/onnx device: cpu, cuda, mps (default cpu)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")


def open_runtime(args: argparse.Namespace) -> Any:
    """The runtime for args.model (a run dir, .gguf, ONNX folder or .mlpackage)."""
    from kititans.runtimes import load_runtime

    return load_runtime(args.model, args.runtime, device=args.device, threads=args.threads)


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
