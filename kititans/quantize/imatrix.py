"""Importance matrix for llama.cpp's quantizer: the mean over calibration tokens of x_j^2 for every input
column j of every linear layer (what llama.cpp's `llama-imatrix` accumulates), collected in PyTorch with
forward pre-hooks and keyed by the GGUF name of the weight the input multiplies (research §5.4).

Calibration text: a text file, or `val` / `train` = that split of the run's token shards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kititans.checkpoint import Checkpoint, alias_pairs
from kititans.errors import KititansError
from kititans.files import read_json

SPLITS = ("val", "train")


@dataclass
class Imatrix:
    data: dict[str, np.ndarray]  # GGUF tensor name -> (in_features,) float32 mean of x^2
    tokens: int
    chunks: int
    source: str


def run_shards(run: str | Path) -> Path | None:
    """The token shards a run was trained on (config.json "kititans.data"; a relative path may have been
    relative to another working directory, so RUN/data is tried too), or None."""
    data_dir = read_json(Path(run) / "config.json").get("kititans", {}).get("data")
    for d in [Path(data_dir)] * bool(data_dir) + [Path(run) / "data"]:
        if (d / "manifest.json").is_file():
            return d
    return None


def calibration_ids(ckpt: Checkpoint, source: str) -> Any:
    """Token ids of the calibration text: a split of the run's shards (`val`, `train`) or a text file."""
    if source in SPLITS:
        from kititans.data.tokendata import TokenData

        data_dir = run_shards(ckpt.path)
        if data_dir is None:
            raise KititansError(
                f"--imatrix {source}: the run's token shards are gone; pass a calibration text file instead"
            )
        data = TokenData(data_dir)
        data.check_tokenizer(ckpt.tokenizer)
        return data.splits[source]  # memmapped shards: only the windows used are read
    path = Path(source)
    if not path.is_file():
        raise KititansError(
            f"--imatrix {source}: no such file (give a UTF-8 text file, or 'val'/'train' for a split of the run)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KititansError(f"--imatrix {source}: not UTF-8 text (byte {e.start})") from None
    return np.asarray(ckpt.tokenizer.encode(text), dtype=np.int64)


def _chunks(ids: np.ndarray, n_ctx: int, bos: int, max_tokens: int) -> Iterator[torch.Tensor]:
    """Consecutive windows of n_ctx tokens whose first token is BOS (as llama-imatrix feeds them)."""
    n = min(len(ids) // n_ctx, max(1, max_tokens // n_ctx))
    for i in range(n):
        w = np.asarray(ids[i * n_ctx : (i + 1) * n_ctx], dtype=np.int64).copy()
        w[0] = bos
        yield torch.from_numpy(w)[None]  # (1, n_ctx)


@torch.inference_mode()
def collect_imatrix(
    ckpt: Checkpoint,
    source: str,
    gguf_name: Callable[[str], str | None],
    max_tokens: int = 32768,
    n_ctx: int = 512,
    progress: bool = False,
) -> Imatrix:
    """Run the calibration text through the model and average x^2 over tokens for every nn.Linear input.

    `gguf_name` maps a canonical parameter name (e.g. model.layers.0.mlp.down_proj.weight) to its GGUF
    tensor name, or None to skip it. A tied lm_head maps to the embedding it shares."""
    model = ckpt.model
    n_ctx = min(n_ctx, ckpt.config.context_length)
    ids = calibration_ids(ckpt, source)
    if len(ids) < n_ctx:
        raise KititansError(
            f"--imatrix {source}: {len(ids)} tokens, fewer than one window of {n_ctx}: give more text"
        )
    canonical = dict(alias_pairs(model))  # alias -> original (tied weights)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook_for(name: str) -> Callable[[nn.Module, tuple], None]:
        def pre_hook(_mod: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (tokens, in_features)
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return pre_hook

    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            param = f"{mod_name}.weight"
            target = gguf_name(canonical.get(param, param))
            if target is not None:
                hooks.append(mod.register_forward_pre_hook(hook_for(target)))
    chunks = list(_chunks(ids, n_ctx, ckpt.tokenizer.bos_id, max_tokens))
    try:
        for x in tqdm(chunks, desc="imatrix", unit="chunk", disable=not progress, leave=False):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    data = {k: (sums[k] / counts[k]).float().numpy() for k in sums}
    return Imatrix(data, tokens=len(chunks) * n_ctx, chunks=len(chunks), source=source)
