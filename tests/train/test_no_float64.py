"""MPS has no float64: pretraining, SFT and their evals never make a float64 tensor (checked on the CPU by a
dispatch-mode spy over every op of a few real steps, eval and checkpoint included)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from kititans.train.pretrain import pretrain
from kititans.train.sft import sft, sft_config
from tests.conftest import make_config


class Float64Spy(TorchDispatchMode):
    """Records every op that returns a float64 (or complex128) tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float64, torch.complex128):
                self.seen.append(str(func))
        return out


def test_spy_sees_float64():
    with Float64Spy() as spy:
        torch.ones(2).double().sum()
    assert spy.seen


@pytest.mark.parametrize("preset", ["debug", "titans-debug"])
def test_train_sft_and_eval_make_no_float64_tensor(tmp_path, preset, debug_run):
    """A few steps of pretraining (the session's prepared debug data), then SFT of that run, each with an
    eval and a checkpoint; every op watched."""
    base = tmp_path / "base"
    over = {"train.steps": 3, "train.eval_every": 2, "train.save_every": 2, "train.log_every": 1,
            "train.seq_len": 64, "train.batch_size": 4, "train.eval_batches": 2, "optim.warmup_steps": 1,
            "data.sources": [str(debug_run / "data")]}  # fmt: skip
    cfg = make_config(base, **over)
    cfg.preset, cfg.family = preset, "titans" if preset.startswith("titans") else cfg.family
    with Float64Spy() as spy:
        pretrain(cfg, progress=False)
    assert not spy.seen, sorted(set(spy.seen))
    layers = [("train.compile", "off"), ("train.dtype", "fp32"), ("train.batch_size", 4), ("train.steps", 3),
              ("train.eval_every", 2), ("train.eval_batches", 2), ("optim.warmup_steps", 1),
              ("sft.builtin_examples", 60), ("out", str(tmp_path / "sft"))]  # fmt: skip
    with Float64Spy() as spy:
        result = sft(sft_config(base, layers), progress=False)
    assert result.step == 3 and result.val_loss is not None
    assert not spy.seen, sorted(set(spy.seen))
