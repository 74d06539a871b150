"""Token-weighted losses at any batch split and rank count (fp32): one micro-batch of 8 == 4 x 2 accumulation
== 2 gloo ranks x 2 x 2, loss and gradients equal at every step, on SFT batches whose assistant replies
differ ~20x in length; the same for the contrastive loss over the global batch (GradCache + gather)."""

from __future__ import annotations

import pytest
import torch

from tests.train.ranks import run_ranks
from tests.train.workers import LENGTHS, lm_steps, uneven_chats

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_gloo_available(), reason="torch was built without gloo"
)
STEPS = 3


def same(a: dict, b: dict, rel: float = 1e-5) -> None:
    for step, (x, y) in enumerate(zip(a["loss"], b["loss"], strict=True)):
        assert abs(x - y) <= rel * abs(y), (step, x, y)
    assert a["counts"] == b["counts"]
    for step, (ga, gb) in enumerate(zip(a["grads"], b["grads"], strict=True)):
        assert ga.keys() == gb.keys()
        for name in ga:
            err = (ga[name] - gb[name]).abs().max() / gb[name].abs().max().clamp(min=1e-12)
            assert err <= rel, (step, name, float(err))


def test_sft_loss_and_gradients_are_the_same_at_any_split(tmp_path, one_thread):
    whole = lm_steps(str(tmp_path / "a"), 8, 1, STEPS)  # 1 micro-batch of 8
    accum = lm_steps(str(tmp_path / "b"), 2, 4, STEPS)  # 4 x 2
    ranks = run_ranks(lm_steps, 2, tmp_path / "c", str(tmp_path / "c"), 2, 2, STEPS)  # 2 ranks x 2 x 2 (DDP)
    same(accum, whole)
    same(ranks[0], whole)
    assert ranks[1]["loss"] == ranks[0]["loss"]  # every rank logs the same global number
    # counters: the supervised (assistant) tokens and the non-padding tokens of the step's 8 chats
    m = uneven_chats(0, 0, 1)[2]
    assert whole["counts"][0] == (int(m.sum()), sum(n - 1 for n in LENGTHS))
    # the old reduction (the mean of per-micro-batch means) is another number on this data
    from kititans.models.lite import SPEC, lm_loss

    torch.manual_seed(0)
    model = SPEC.build(SPEC.make_config("debug"))
    with torch.no_grad():
        means = [float(lm_loss(model(x), y, m)) for x, y, m in (uneven_chats(0, i, 4) for i in range(4))]
    assert abs(sum(means) / 4 - whole["loss"][0]) > 1e-3 * whole["loss"][0]


def test_contrastive_two_ranks_by_two_steps_equal_one_global_batch(tmp_path, one_thread):
    kw = dict(family="encoder", preset="encoder-debug", batches="pairs")
    whole = lm_steps(str(tmp_path / "a"), 8, 1, STEPS, **kw)  # one batch of the global size
    ranks = run_ranks(lm_steps, 2, tmp_path / "b", str(tmp_path / "b"), 2, 2, STEPS, "encoder", "encoder-debug",
                      "pairs")  # fmt: skip
    same(ranks[0], whole)
    accum = lm_steps(str(tmp_path / "c"), 2, 4, STEPS, **kw)  # gradient cache across 4 accumulation steps
    same(accum, whole)
