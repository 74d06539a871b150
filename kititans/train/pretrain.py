"""`kititans train`: data -> tokenizer -> model -> the loop, into one run directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kititans.config import RunConfig
from kititans.data.prepare import prepare_data
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


def pretrain(
    cfg: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    cfg.out = str(run_dir)
    if not resume and (run_dir / "config.json").exists():
        raise KititansError(
            f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out"
        )
    _, preset = find_preset(cfg.preset, cfg.family)
    vocab = cfg.tokenizer.vocab_size or int(cfg.model.get("vocab_size", preset.model["vocab_size"]))
    data = prepare_data(cfg.data, run_dir / "data", vocab, cfg.tokenizer.path, progress)
    tok = Tokenizer.load(cfg.tokenizer.path) if cfg.tokenizer.path else data.tokenizer()
    spec, mcfg, model = model_for_run(cfg, tok.vocab_size)
    t = cfg.train

    def train_batch(step: int, micro: int) -> tuple:
        return data.batch("train", t.batch_size, t.seq_len, batch_generator(t.seed, step, micro))

    setup = TrainSetup(
        spec=spec,
        model_config=mcfg,
        model=model,
        tokenizer=tok,
        train_batch=train_batch,
        eval_batches=data.eval_batches(t.eval_batches, t.batch_size, t.seq_len),
        extra_meta={"data": str(data.dir), "stage": "pretrain"},
    )
    return run_training(cfg, setup, run_dir, resume=resume, progress=progress, on_step=on_step)
