"""metrics.jsonl: one JSON row per logged step (and per evaluation), opened for a run and trimmed to the resumed
step; the rows the training loop logs and the tokens/s window they report; reading a run's first validation
loss back."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from kititans.errors import KititansError
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


def step_row(tr: Any, loss: Any, supervised: int, grad_norm: Any, w: Window) -> dict[str, Any]:
    """The logged (and written) row of the current step of `tr`, train/loop.py's Trainer: the token-weighted
    loss of the step over all ranks, lr, tokens/s and MFU counted in non-padding tokens, the peak memory since
    the last row."""
    loss_val = tr.dist.sum(loss).item() / max(supervised, 1)
    step = tr.step
    if not math.isfinite(loss_val):
        raise KititansError(f"training diverged at step {step} (loss {loss_val}): lower the learning rate")
    tps = w.rate()
    lr = tr.opt.param_groups[0]["lr"]
    row: dict[str, Any] = {
        "step": step,
        "loss": round(loss_val, 6),
        "lr": lr,
        "tokens_per_s": round(tps, 1),
        "tokens": tr.tokens_seen,
        "time": round(tr.seconds_before + time.perf_counter() - w.t0, 3),
    }
    if grad_norm is not None:
        row["grad_norm"] = round(float(grad_norm), 4)
    if tr.peak:
        row["mfu"] = round(tps * tr.flops_per_token / (tr.peak * tr.dist.world), 4)
    row["peak_mem_mb"] = round(tr.memory.read() / 2**20, 1)
    row["mem_kind"] = tr.memory.kind
    row.update(tr.memory.extra())
    row.update(tr.row_extra)
    tr.row_extra.clear()
    tr.write(row)
    return row


def val_row(step: int, out: float | dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the logged row, the metrics) of an evaluation that returned the val loss, or a dict of metrics with a
    "loss" (the row shows the perplexity of a plain loss, and every other metric as val_NAME)."""
    metrics = out if isinstance(out, dict) else {"loss": out}
    loss = float(metrics["loss"])
    row: dict[str, Any] = {"step": step, "val_loss": round(loss, 6)}
    if not isinstance(out, dict):
        row["val_ppl"] = round(math.exp(min(loss, 50)), 4)
    row.update(
        {f"val_{k}": round(v, 6) if isinstance(v, float) else v for k, v in metrics.items() if k != "loss"}
    )
    return row, metrics


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
