"""An out-of-memory error during training (injected on CPU: CUDA's torch.OutOfMemoryError, MPS's plain
RuntimeError) ends in one line saying what to lower, after saving the last completed step."""

from __future__ import annotations

import pytest
import torch

from kititans.device import OOM_ADVICE
from kititans.errors import KititansError
from kititans.train import loop
from kititans.train.checkpoints import find_latest
from kititans.train.pretrain import pretrain
from tests.conftest import make_config

OVER = {"train.steps": 8, "train.save_every": 100, "train.eval_every": 100, "train.log_every": 1,
        "train.seq_len": 64, "train.batch_size": 4, "optim.warmup_steps": 1}  # fmt: skip
ERRORS = {
    "cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "mps": RuntimeError("MPS backend out of memory (MPS allocated: 7.1 GB, other allocations: 1 GB)"),
}


def _inject(monkeypatch, at: int, error: BaseException, in_update: bool = False) -> None:
    real = loop.Trainer.optimizer_step

    def step(self):
        if self.step == at:
            self.updating = in_update
            raise error
        return real(self)

    monkeypatch.setattr(loop.Trainer, "optimizer_step", step)


def config(out, debug_run):
    """A short run on the session's prepared debug data (no corpus or tokenizer to build)."""
    return make_config(out, **OVER, **{"data.sources": [str(debug_run / "data")]})


def test_oom_saves_the_last_step_and_says_what_to_lower(tmp_path, monkeypatch, debug_run):
    _inject(monkeypatch, 5, ERRORS["cuda"])
    with pytest.raises(KititansError) as e:
        pretrain(config(tmp_path / "run", debug_run), progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "out of memory" in msg and OOM_ADVICE in msg and "step 5 is saved" in msg
    assert find_latest(tmp_path / "run").name == "step-00000005"
    monkeypatch.undo()
    resumed = pretrain(config(tmp_path / "run", debug_run), resume=True, progress=False)
    assert resumed.step == 8


def test_mps_oom_inside_the_update_saves_nothing_and_other_errors_pass(tmp_path, monkeypatch, debug_run):
    _inject(monkeypatch, 3, ERRORS["mps"], in_update=True)  # parameters half-updated: not saved
    with pytest.raises(KititansError, match="lower --batch-size") as e:
        pretrain(config(tmp_path / "a", debug_run), progress=False)
    assert "saved" not in str(e.value) and find_latest(tmp_path / "a") is None
    monkeypatch.undo()
    _inject(monkeypatch, 3, RuntimeError("some other failure"))
    with pytest.raises(RuntimeError, match="some other failure"):
        pretrain(config(tmp_path / "b", debug_run), progress=False)
