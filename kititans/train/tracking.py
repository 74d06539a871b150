"""Experiment tracking: the scalars of metrics.jsonl (loss, lr, grad norm, tokens/s, tokens, MFU, val loss)
also go to TensorBoard, Weights & Biases or Trackio (`--log`; optional extras). Only rank 0 tracks.

  tensorboard  event files in RUN/tensorboard/         (tensorboard --logdir runs/)
  wandb        a wandb run named after the run dir; WANDB_PROJECT (default kititans), WANDB_MODE=offline work
  trackio      a local Trackio project (TRACKIO_PROJECT, default kititans): `trackio show`
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kititans.errors import KititansError, require

TRACKERS = ("none", "tensorboard", "wandb", "trackio")
SKIP = {"step", "time", "wall"}  # the x axes, not series


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k not in SKIP and isinstance(v, (int, float))}


class Tracker:
    """The no-op tracker; subclasses send each metrics row."""

    name = "none"

    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        require("tensorboard", "tensorboard", "--log tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.w.add_text("config", f"```\n{config}\n```")

    def log(self, row: dict[str, Any]) -> None:
        for k, v in _scalars(row).items():
            self.w.add_scalar(f"train/{k}" if not k.startswith("val") else f"val/{k}", v, int(row["step"]))
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class WandB(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], resume: bool):
        wandb = require("wandb", "wandb", "--log wandb")
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "kititans"),
            name=run_dir.name,
            dir=str(run_dir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
        )
        id_file.write_text(self.run.id + "\n")

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(_scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


class Trackio(Tracker):
    name = "trackio"

    def __init__(self, run_dir: Path, config: dict[str, Any], resume: bool):
        self.trackio = require("trackio", "trackio", "--log trackio")
        self.trackio.init(
            project=os.environ.get("TRACKIO_PROJECT", "kititans"),
            name=run_dir.name,
            config=config,
            resume="allow" if resume else "never",
        )

    def log(self, row: dict[str, Any]) -> None:
        self.trackio.log(_scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.trackio.finish()


def open_tracker(kind: str, run_dir: Path, config: dict[str, Any], resume: bool = False) -> Tracker:
    if kind not in TRACKERS:
        raise KititansError(f"--log must be one of {', '.join(TRACKERS)}; got {kind!r}")
    if kind == "tensorboard":
        return TensorBoard(run_dir, config)
    if kind == "wandb":
        return WandB(run_dir, config, resume)
    if kind == "trackio":
        return Trackio(run_dir, config, resume)
    return Tracker()


def check_available(kind: str) -> None:
    """Fail before training starts if the tracker's package is missing (names the extra)."""
    module = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}.get(kind)
    if kind not in TRACKERS:
        raise KititansError(f"--log must be one of {', '.join(TRACKERS)}; got {kind!r}")
    if module:
        require(module, module, f"--log {kind}")
