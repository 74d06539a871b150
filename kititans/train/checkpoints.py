"""Checkpoints that survive any crash: each one is written whole into a new folder and committed by one
atomic rename, then the `latest` pointer; only after that are the run directory's top-level files (what
export, generate and bench read) refreshed.

RUN/checkpoints/
  step-00001000/       model.safetensors, config.json, tokenizer files, generation_config.json (a complete model
                       directory: the consolidated weights), the optimizer state (FQN-keyed, any world size or
                       parallelism resumes it) either sharded, every rank writing its own piece in parallel
                       (optimizer.index.json + optimizer-RRRRR-of-WWWWW.safetensors, train/sharded.py; the
                       default) or gathered to rank 0 (optimizer.{safetensors,json}; train.checkpoint_shards=
                       false, and every run before the sharded format), state.json (step, tokens, wall time,
                       data position, val loss), rng.{safetensors,json}
  latest               "step-00001000", written after the rename
  best                 the best validation loss so far (with --keep-best)
A crash while writing leaves a hidden `.step-N.tmp-PID` folder (ignored, removed next time) and the previous
checkpoint intact. Resume takes `latest`, or the newest complete folder if the pointer is missing or stale.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import kititans
from kititans.checkpoint import WEIGHTS, read_meta, read_tree, save_checkpoint, write_tree
from kititans.errors import KititansError
from kititans.files import (
    fsync_dir,
    fsync_file,
    fsync_tree,
    read_json,
    replace_durably,
    write_json,
    write_text,
)
from kititans.train import sharded

log = logging.getLogger("kititans")
DIRNAME = "checkpoints"
STEP_RE = re.compile(r"^step-(\d{8,})$")
REQUIRED = (WEIGHTS, "config.json", "state.json")
FULL_OPTIMIZER = ("optimizer.safetensors", "optimizer.json")
NOT_MIRRORED = {*FULL_OPTIMIZER, "state.json", "rng.safetensors", "rng.json"}


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def complete(folder: Path) -> bool:
    if not (folder.is_dir() and all((folder / f).is_file() for f in REQUIRED)):
        return False
    return all((folder / f).is_file() for f in FULL_OPTIMIZER) or sharded.shards_complete(folder)


def mirrored(folder: Path, path: Path) -> bool:
    """Whether a step folder's file is part of the model directory the run's top level shows."""
    rel = path.relative_to(folder).as_posix()
    return rel not in NOT_MIRRORED and rel != sharded.INDEX and not rel.startswith("optimizer-")


def committed(root: Path) -> list[Path]:
    """Complete step folders, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and complete(p)]
    return [p for _, p in sorted(found)]


def find_latest(run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: `latest` if it names a complete folder, else the newest complete one."""
    root = Path(run_dir) / DIRNAME
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if complete(named):
            return named
        log.warning(
            "%s names %s, which is not a complete checkpoint: using the newest complete one",
            pointer,
            named.name,
        )
    found = committed(root)
    return found[-1] if found else None


def _remove(folder: Path) -> None:
    """Take a folder out of view atomically (rename), then delete it."""
    hidden = folder.with_name(f".{folder.name}.deleting-{os.getpid()}")
    os.replace(folder, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


@dataclass
class Snapshot:
    """What a checkpoint holds besides the model definition, gathered on every rank, written by rank 0."""

    step: int
    weights: dict[str, torch.Tensor]
    optimizers: list[dict[str, Any]]  # gathered full state (empty when sharded)
    state: dict[str, Any]  # JSON-able: step, tokens, seconds, val_loss, data position, world, parallel, ...
    shards: dict[str, Any] | None = None  # the sharded optimizer's index: its shards are in the tmp folder


def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def prepare(run_dir: Path, step: int, suffix: str) -> Path:
    """The hidden folder a checkpoint is written into (stale ones from a crash removed first)."""
    root = run_dir / DIRNAME
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*"):  # a crash while writing or deleting
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".{step_name(step)}.tmp-{suffix}"
    tmp.mkdir()
    return tmp


def commit(
    run_dir: Path,
    snap: Snapshot,
    setup: Any,
    extra: dict[str, Any],
    keep: int,
    keep_best: bool,
    tmp: Path | None = None,
) -> Path:
    """Write the snapshot whole, rename it into place, point `latest` at it, prune, refresh the top level.
    `tmp`: the folder from prepare() that every rank has already written its optimizer shard into."""
    root = run_dir / DIRNAME
    final = root / step_name(snap.step)
    tmp = tmp or prepare(run_dir, snap.step, str(os.getpid()))
    try:
        save_checkpoint(
            tmp,
            setup.model,
            setup.spec,
            setup.model_config,
            setup.tokenizer,
            extra=extra,
            weights=snap.weights,
        )
        if snap.shards is not None:
            sharded.write_index(tmp, snap.shards)
        else:
            write_tree(tmp, "optimizer", {"optimizers": snap.optimizers})
        write_tree(tmp, "rng", rng_state())
        write_json(
            tmp / "state.json",
            {**snap.state, "kititans": kititans.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        )
        fsync_tree(tmp)  # every file and subfolder on disk before the rename that commits them
        if final.exists():  # the same step saved again (e.g. SIGTERM right after a scheduled save)
            _remove(final)
        replace_durably(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KititansError(
            f"could not write checkpoint {final} ({e.strerror or e}): free disk space and resume; the previous "
            "checkpoint is intact"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text(root / "latest", final.name + "\n")
    best = _update_best(root, final, snap.state.get("val_loss")) if keep_best else None
    prune(root, keep, protect={final, *([best] if best else [])})
    refresh_top_level(run_dir, final)
    return final


def _update_best(root: Path, final: Path, val: float | None) -> Path | None:
    pointer = root / "best"
    current = root / pointer.read_text().strip() if pointer.is_file() else None
    if current is not None and not complete(current):
        current = None
    old = read_json(current / "state.json").get("val_loss") if current else None
    if val is not None and (old is None or val < old):
        write_text(pointer, final.name + "\n")
        return final
    return current


def prune(root: Path, keep: int, protect: set[Path]) -> None:
    """Keep the newest `keep` checkpoints (and the protected ones); delete the rest."""
    found = committed(root)
    doomed = [p for p in found[: max(0, len(found) - max(keep, 1))] if p not in protect]
    for p in doomed:
        _remove(p)


def refresh_top_level(run_dir: Path, folder: Path) -> None:
    """Make the run directory's model files those of `folder` (hard links where the filesystem allows, else
    copies; subfolders too, e.g. sentence-transformers' 1_Pooling/), each replaced atomically, config.json
    last."""
    files = [p for p in folder.rglob("*") if p.is_file() and mirrored(folder, p)]
    for src in sorted(files, key=lambda p: p.relative_to(folder).as_posix() == "config.json"):
        dst = run_dir / src.relative_to(folder)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)  # the committed (already fsynced) file itself
        except OSError:
            shutil.copy2(src, tmp)
            fsync_file(tmp)
        replace_durably(tmp, dst)
    fsync_dir(run_dir)
    legacy = run_dir / "train_state"
    if legacy.is_dir():  # the format-1 resume state is superseded by the committed checkpoint
        shutil.rmtree(legacy, ignore_errors=True)


# ------------------------------------------------------------------------------------------- resume
@dataclass
class Restored:
    step: int
    weights: dict[str, torch.Tensor]
    optimizers: list[dict[str, Any]] | None  # None: a format-1 run (index-keyed state in `legacy`)
    state: dict[str, Any]
    shards: Path | None = None  # a sharded checkpoint: every rank reads its pieces of the optimizer from here
    legacy: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] | None = None


def load_for_resume(run_dir: str | Path, tensors: bool = True) -> Restored:
    """The newest committed checkpoint of a run (or a format-1 run's train_state/). tensors=False: only its
    state and RNG (a rank other than 0, which receives weights and optimizer state by broadcast)."""
    from safetensors.torch import load_file

    from kititans.checkpoint import load_train_state

    run_dir = Path(run_dir)
    folder = find_latest(run_dir)
    if folder is None:
        if (run_dir / "train_state").is_dir():  # format 1: one checkpoint, written in place
            state = load_train_state(run_dir)
            meta = read_meta(run_dir)
            if meta.get("step") != state["step"]:
                raise KititansError(
                    f"{run_dir}: weights (step {meta.get('step')}) and train_state (step {state['step']}) differ: "
                    "the last save was interrupted; the run cannot be resumed exactly"
                )
            weights = load_file(str(run_dir / WEIGHTS))
            return Restored(int(state["step"]), weights, None, {"step": state["step"]}, legacy=state)
        raise KititansError(
            f"{run_dir}: no committed checkpoint to resume from (one is written every train.save_every steps)"
        )
    state = read_json(folder / "state.json")
    weights = load_file(str(folder / WEIGHTS)) if tensors else {}
    shards = folder if sharded.is_sharded(folder) else None
    optim = read_tree(folder, "optimizer")["optimizers"] if tensors and shards is None else []
    rng = read_tree(folder, "rng") if (folder / "rng.json").is_file() else None
    return Restored(int(state["step"]), weights, optim, state, rng=rng, shards=shards)


def check_same_model(run_dir: Path, model_config: dict[str, Any]) -> None:
    """A resume must build the model it saved."""
    folder = find_latest(run_dir)
    saved = read_meta(folder if folder else run_dir)["model"]
    diff = sorted(k for k in set(saved) | set(model_config) if saved.get(k) != model_config.get(k))
    if diff:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {model_config.get(k)!r}" for k in diff[:4])
        raise KititansError(
            f"{run_dir}: the resumed model differs from the saved one ({shown}); resume without changing the "
            "model (or start a new run with --out)"
        )
