"""Held-out tokens for the quality measurements: --eval-text, else the run's validation split (the
validation split its training prepared; an SFT run uses its base run's), cut into llama-perplexity chunks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kititans.bench.quality import make_chunks
from kititans.checkpoint import read_meta
from kititans.data.tokenizer import Tokenizer
from kititans.errors import KititansError
from kititans.files import sha256_file

DEFAULT_CTX = 512  # llama-perplexity's default -c


def _candidates(run: Path) -> list[Path]:
    """Shard folders that may hold the run's validation split, most likely first: RUN/data, the folder its
    metadata names (relative paths as written at training time, from the current or the project folder),
    and an SFT run's base run's data."""
    meta = read_meta(run)
    named = [Path(meta["data"])] if meta.get("data") else []
    base = (meta.get("base_run") or {}).get("path")
    if base:
        named.append(Path(base) / "data")
    dirs = [run / "data"]
    for p in named:
        dirs += [p] if p.is_absolute() else [p, run.resolve().parent.parent / p]
    return list(dict.fromkeys(dirs))


def validation_tokens(run: Path) -> tuple[np.ndarray, str] | None:
    """The validation split of the run's prepared data, if it was made with the run's tokenizer."""
    from kititans.data.shards import load_manifest, open_split

    tok_sha = sha256_file(run / "tokenizer.model")
    for d in _candidates(run):
        if not (d / "manifest.json").is_file():
            continue
        m = load_manifest(d)
        if m.get("tokenizer_sha256") != tok_sha or not m["splits"]["val"]["tokens"]:
            continue
        ids = np.asarray(open_split(d, m, "val")).astype(np.int64)
        return ids, f"{d} (val split)"
    return None


def eval_chunks(
    run: Path, eval_text: Path | None, n_ctx: int = 0, max_chunks: int | None = 16
) -> tuple[list[list[int]], dict[str, Any]]:
    """(chunks, description of the source) for perplexity/KLD; n_ctx 0 = min(512, the model's context)."""
    tok = Tokenizer.load(run)
    context = int(json.loads((run / "config.json").read_text())["kititans"]["model"]["context_length"])
    n_ctx = n_ctx or min(DEFAULT_CTX, context)
    if n_ctx > context:
        raise KititansError(f"--ppl-ctx {n_ctx} exceeds the model's context of {context}")
    if eval_text:
        path = Path(eval_text)
        if not path.is_file():
            raise KititansError(f"--eval-text: no such file: {path}")
        ids = tok.encode(path.read_text(encoding="utf-8", errors="replace"))
        source = {"kind": "text", "path": str(path), "sha256": sha256_file(path)}
    else:
        found = validation_tokens(run)
        if found is None:
            raise KititansError(
                f"{run} has no validation split (data/ with a val split) to measure quality on: "
                "pass --eval-text FILE, or --no-quality for speed only"
            )
        ids, where = found
        source = {"kind": "validation split", "path": where}
    source["tokens"] = len(ids)
    if len(ids) < n_ctx:
        raise KititansError(
            f"the held-out text has {len(ids)} tokens, fewer than one chunk of {n_ctx}: "
            "use a longer --eval-text or a smaller --ppl-ctx"
        )
    chunks = make_chunks(list(map(int, ids)), n_ctx, tok.bos_id, max_chunks=max_chunks)
    return chunks, source
