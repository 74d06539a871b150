"""An interrupted-then-resumed CPU run has the same loss at every step as an uninterrupted one."""

from __future__ import annotations

import json

import pytest

from kititans.errors import KititansError
from kititans.train.pretrain import pretrain
from tests.conftest import make_config

OVER = {
    "train.steps": 24,
    "train.save_every": 8,
    "train.eval_every": 8,
    "train.log_every": 1,
    "data.builtin_bytes": 300_000,
}


def losses(run):
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


# Muon's exact resume stays in the default run through SFT's and Titans' resume tests; this one is ~3 min on 2 cores
@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("muon", marks=pytest.mark.slow)])
def test_resume_is_exact(tmp_path, optimizer):
    whole = pretrain(make_config(tmp_path / "whole", **OVER, **{"optim.name": optimizer}), progress=False)

    def crash(step, loss):
        if step == 13:
            raise RuntimeError("simulated crash")

    cfg = make_config(tmp_path / "cut", **OVER, **{"optim.name": optimizer})
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(cfg, progress=False, on_step=crash)
    resumed = pretrain(
        make_config(tmp_path / "cut", **OVER, **{"optim.name": optimizer}), resume=True, progress=False
    )
    assert resumed.step == whole.step == 24
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    assert resumed.val_loss == whole.val_loss


def test_existing_run_needs_resume(debug_run):
    with pytest.raises(KititansError, match="already holds a run"):
        pretrain(make_config(debug_run), progress=False)
