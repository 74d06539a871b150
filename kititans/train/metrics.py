"""metrics.jsonl: one JSON row per logged step (and per evaluation), opened for a run and trimmed to the resumed
step; the tokens/s window of the logged rows; reading a run's first validation loss back."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from kititans.files import write_text


class Window:
    """tokens/s over the last log interval."""

    def __init__(self) -> None:
        self.t0 = self.at = time.perf_counter()
        self.tokens = self.at_tokens = 0

    def rate(self) -> float:
        now = time.perf_counter()
        tps = (self.tokens - self.at_tokens) / max(now - self.at, 1e-9)
        self.at, self.at_tokens = now, self.tokens
        return tps


def _row_step(line: str) -> float:
    """A metrics row's step; a line cut short by a crash counts as past any step (it is dropped)."""
    try:
        return float(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def open_metrics(run_dir: Path, start: int) -> Any:
    """metrics.jsonl, with lines past the resumed step dropped (they belong to the lost part of the run)."""
    path = run_dir / "metrics.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    if start and path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if _row_step(ln) <= start]
        write_text(path, "".join(ln + "\n" for ln in keep))
    elif path.is_file():
        path.unlink()
    return open(path, "a", encoding="utf-8")


def initial_val_loss(run_dir: Path) -> float | None:
    """The step-0 val loss of a run (its starting model on its val split), from metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("step") == 0 and "val_loss" in row:
            return float(row["val_loss"])
    return None
