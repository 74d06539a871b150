"""Exact schedules: the last step reaches min_lr_ratio, a warmup the run never finishes is refused, and a resume
keeps the schedule the run started with (cosine refuses other --steps without --reset-schedule; WSD grows its
stable phase); fp16's GradScaler state round-trips through a checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from kititans.errors import KititansError
from kititans.train import loop
from kititans.train.checkpoints import find_latest
from kititans.train.pretrain import pretrain
from kititans.train.schedule import KINDS, make_schedule, resumed_schedule
from tests.conftest import make_config


@pytest.mark.parametrize("kind", KINDS)
def test_every_schedule_ends_where_it_says(kind):
    s = make_schedule(kind, 100, 10, 0.1, 0.2)
    m = [s.multiplier(i) for i in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == 1.0 == max(m)
    if kind == "constant":
        assert m[-1] == 1.0
    else:
        assert m[-1] == pytest.approx(0.1, abs=1e-12)  # the last step runs at min_lr_ratio
        assert all(a >= b for a, b in zip(m[10:], m[11:]))
    if kind == "wsd":
        assert m[79] == 1.0 > m[80] and s.decay == 20
    for short in (1, 2, 3):  # tiny runs end exactly too
        t = make_schedule(kind, short + 1, short, 0.25)
        assert t.multiplier(short - 1) == 1.0 and t.multiplier(short) == (1.0 if kind == "constant" else 0.25)


def test_a_warmup_the_run_never_finishes_is_refused():
    with pytest.raises(KititansError, match=r"warmup_steps 10 >= train.steps 10: the run would never reach"):
        make_schedule("cosine", 10, 10)
    with pytest.raises(KititansError, match="overlaps the decay"):
        make_schedule("wsd", 10, 9, decay_fraction=0.5)


def test_resume_keeps_the_schedule_it_started_with():
    cos = make_schedule("cosine", 100, 10)
    assert resumed_schedule(cos, cos, 50, False) == (cos, "")
    longer = make_schedule("cosine", 200, 10)
    with pytest.raises(
        KititansError, match=r"--steps 200 changes the cosine schedule .* from 0\.62 to 0\.90"
    ):
        resumed_schedule(cos, longer, 50, False)
    assert resumed_schedule(cos, longer, 50, True)[0] == longer  # --reset-schedule
    wsd = make_schedule("wsd", 100, 10)  # decays over steps 80..99
    grown, note = resumed_schedule(wsd, make_schedule("wsd", 200, 10), 60, False)
    assert (grown.total, grown.decay, grown.decay_start) == (200, 20, 180) and "stable phase" in note
    assert [grown.multiplier(i) for i in range(60)] == [wsd.multiplier(i) for i in range(60)]
    assert grown.multiplier(179) == 1.0 and grown.multiplier(199) == pytest.approx(0.1)
    with pytest.raises(KititansError, match="has decayed since step 80"):
        resumed_schedule(wsd, make_schedule("wsd", 200, 10), 90, False)
    const = make_schedule("constant", 100, 10)
    assert resumed_schedule(const, make_schedule("constant", 300, 10), 50, False)[0].total == 300
    with pytest.raises(KititansError, match="differs from the one the run started with"):
        resumed_schedule(cos, make_schedule("cosine", 100, 20), 50, False)


OVER = {"train.steps": 6, "train.save_every": 3, "train.eval_every": 6, "train.log_every": 1,
        "optim.warmup_steps": 1, "data.builtin_bytes": 300_000, "data.workers": 1}  # fmt: skip


def test_resumes_keep_the_schedule_and_the_grad_scaler(tmp_path, monkeypatch, one_thread):
    """A GradScaler (the CPU one stands in for fp16's CUDA one: the same state) whose scale doubles every 2
    steps; a crash after step 4 and a resume from step 3 end at the uninterrupted run's scale."""
    monkeypatch.setattr(loop, "make_scaler", lambda *_: torch.amp.GradScaler("cpu", init_scale=2.0**10,
                                                                             growth_interval=2))  # fmt: skip

    def crash(step, _loss):
        if step == 4:
            raise RuntimeError("simulated crash")

    whole = pretrain(make_config(tmp_path / "whole", **OVER), progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(make_config(tmp_path / "cut", **OVER), progress=False, on_step=crash)
    resumed = pretrain(make_config(tmp_path / "cut", **OVER), resume=True, progress=False)
    state = [
        json.loads((find_latest(r) / "state.json").read_text())
        for r in (tmp_path / "whole", tmp_path / "cut")
    ]
    assert state[0]["grad_scaler"]["scale"] == 2.0**13 and state[1]["grad_scaler"] == state[0]["grad_scaler"]
    assert resumed.train_loss == whole.train_loss and resumed.val_loss == whole.val_loss
    assert state[1]["schedule"] == {"kind": "cosine", "total": 6, "warmup": 1, "min_ratio": 0.1, "decay": 0}
    # more steps on a cosine run: refused in one line, nothing written; --reset-schedule takes them
    before = (tmp_path / "cut" / "metrics.jsonl").read_text()
    with pytest.raises(KititansError, match="--steps 8 changes the cosine schedule"):
        pretrain(make_config(tmp_path / "cut", **{**OVER, "train.steps": 8}), resume=True, progress=False)
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == before
    more = pretrain(make_config(tmp_path / "cut", **{**OVER, "train.steps": 8, "train.reset_schedule": True}),
                    resume=True, progress=False)  # fmt: skip
    assert more.step == 8
    saved = json.loads((find_latest(tmp_path / "cut") / "state.json").read_text())
    assert saved["schedule"]["total"] == 8
    assert (
        json.loads((tmp_path / "cut" / "config.json").read_text())["kititans"]["run"]["train"][
            "reset_schedule"
        ]
        is False
    )
