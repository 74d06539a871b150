"""`kititans train`: data -> tokenizer -> model -> the loop, into one run directory.

Each optimizer step draws all of its windows at once from (seed, step): `count` micro-batches of batch_size
windows; the micro-batch at global index i takes rows [i*B, (i+1)*B). A 2-rank run with grad_accum 1 and a
1-rank run with grad_accum 2 (the same global batch) train on exactly the same windows.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kititans.config import RunConfig
from kititans.data.prepare import prepare_data
from kititans.data.shards import is_shards_dir
from kititans.data.tokenizer import Tokenizer
from kititans.errors import KititansError
from kititans.models.spec import find_preset
from kititans.train.loop import (
    TrainResult,
    TrainSetup,
    batch_generator,
    default_run_dir,
    model_for_run,
    run_training,
)
from kititans.train.schedule import schedule_for


class StepWindows:
    """train_batch(step, index, count) for token data: one draw of count x B windows per step, cached."""

    def __init__(self, data: Any, batch_size: int, seq_len: int, seed: int):
        self.data, self.b, self.t, self.seed = data, batch_size, seq_len, seed
        self._step: tuple[int, int] = (-1, 0)
        self._rows = torch.zeros(0, 2, dtype=torch.int64)

    def rows(self, step: int, count: int) -> torch.Tensor:
        if self._step != (step, count):
            gen = batch_generator(self.seed, step, 0)
            self._rows = self.data.sample("train", count * self.b, self.t, gen)
            self._step = (step, count)
        return self._rows

    def __call__(self, step: int, index: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows(step, count)[index * self.b : (index + 1) * self.b]
        return self.data.gather("train", rows, self.t)


def _wait_for_data(data_dir: Path, timeout_s: float) -> None:
    """Ranks other than 0 wait for rank 0 to commit the run's dataset (a shared filesystem)."""
    deadline = time.monotonic() + timeout_s
    while not is_shards_dir(data_dir):
        if time.monotonic() > deadline:
            raise KititansError(
                f"rank {os.environ.get('RANK')}: {data_dir} did not appear within {timeout_s:.0f} s; "
                "prepare the data first with `kititans data ... --out DIR` and pass --data DIR"
            )
        time.sleep(0.5)


def pretrain(
    cfg: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    cfg.out = str(run_dir)
    rank = int(os.environ.get("RANK", "0"))
    if not resume and (run_dir / "config.json").exists():
        raise KititansError(
            f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out"
        )
    schedule_for(cfg.optim, cfg.train.steps)  # a bad schedule is refused before any data is prepared
    _, preset = find_preset(cfg.preset, cfg.family)
    vocab = cfg.tokenizer.vocab_size or int(cfg.model.get("vocab_size", preset.model["vocab_size"]))
    t = cfg.train
    own_data = run_dir / "data"
    if rank != 0 and not all(is_shards_dir(s) for s in cfg.data.sources or [own_data]):
        _wait_for_data(own_data, t.dist_timeout)
        data = prepare_data(cfg.data, own_data, vocab, cfg.tokenizer.path, progress=False)
    else:
        data = prepare_data(cfg.data, own_data, vocab, cfg.tokenizer.path, progress and rank == 0)
    tok = Tokenizer.load(cfg.tokenizer.path) if cfg.tokenizer.path else data.tokenizer()
    spec, mcfg, model = model_for_run(cfg, tok.vocab_size)
    meta: dict[str, Any] = {"data": str(data.dir), "stage": "pretrain"}
    if len(data.sources) > 1:
        meta["data_mixture"] = data.describe()["mixture"]
    setup = TrainSetup(
        spec=spec,
        model_config=mcfg,
        model=model,
        tokenizer=tok,
        train_batch=StepWindows(data, t.batch_size, t.seq_len, t.seed),
        eval_batches=data.eval_batches(t.eval_batches, t.batch_size, t.seq_len),
        extra_meta=meta,
    )
    return run_training(cfg, setup, run_dir, resume=resume, progress=progress, on_step=on_step)
