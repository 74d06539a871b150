"""Training math that stays right at any batch split and rank count (fp32, gloo ranks):
- token-weighted losses: one micro-batch of 8 == 4 x 2 accumulation == 2 ranks x 2 x 2, loss and gradients
  equal at every step, on SFT batches whose assistant replies differ ~20x in length;
- contrastive InfoNCE over the global batch (gather across ranks + gradient cache across accumulation): 2 ranks
  x 2 accumulation steps == 4 x 2 accumulation == one batch of the global size;
- FSDP2 in bf16 reads Titans' neural memory (its own unit, fp32 policy) in fp32, attention in bf16."""

from __future__ import annotations

import math

import pytest
import torch

from tests.train.ranks import run_ranks
from tests.train.workers import LENGTHS, STEPS, lm_steps, on_two_ranks, uneven_chats

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_gloo_available(), reason="torch was built without gloo"
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One spawn of 2 gloo ranks runs every multi-rank case of this module."""
    tmp = tmp_path_factory.mktemp("ranks")
    return run_ranks(on_two_ranks, 2, tmp, str(tmp))


def same(a: dict, b: dict, rel: float = 1e-5) -> None:
    for step, (x, y) in enumerate(zip(a["loss"], b["loss"], strict=True)):
        assert abs(x - y) <= rel * abs(y), (step, x, y)
    assert a["counts"] == b["counts"]
    for step, (ga, gb) in enumerate(zip(a["grads"], b["grads"], strict=True)):
        assert ga.keys() == gb.keys()
        for name in ga:
            err = (ga[name] - gb[name]).abs().max() / gb[name].abs().max().clamp(min=1e-12)
            assert err <= rel, (step, name, float(err))


def test_sft_loss_and_gradients_are_the_same_at_any_split(ranks, tmp_path, one_thread):
    whole = lm_steps(str(tmp_path / "a"), 8, 1, STEPS)  # 1 micro-batch of 8
    accum = lm_steps(str(tmp_path / "b"), 2, 4, STEPS)  # 4 x 2
    same(accum, whole)
    same(ranks[0]["sft"], whole)  # 2 ranks x 2 x 2
    assert ranks[1]["sft"]["loss"] == ranks[0]["sft"]["loss"]  # every rank logs the same global number
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


def test_contrastive_loss_spans_the_global_batch(ranks, tmp_path, one_thread):
    kw = dict(family="encoder", preset="encoder-debug", batches="pairs")
    whole = lm_steps(str(tmp_path / "a"), 8, 1, STEPS, **kw)  # one batch of the global size
    same(
        lm_steps(str(tmp_path / "b"), 2, 4, STEPS, **kw), whole
    )  # a gradient cache over 4 accumulation steps
    same(ranks[0]["pairs"], whole)  # 2 ranks x 2 accumulation steps


def test_titans_memory_is_read_in_fp32_under_bf16_fsdp2(ranks):
    for r in ranks:
        seen = r["fsdp"]["seen"]
        assert seen["memory.w1"] == seen["memory.proj"] == seen["memory.gates"] == "torch.float32", seen
        assert seen["attn.qkv"] == "torch.bfloat16", seen  # the rest of the block computes in bf16
        assert math.isfinite(r["fsdp"]["loss"]) and r["fsdp"]["loss"] == ranks[0]["fsdp"]["loss"]
        assert set(r["fsdp"]["stored"].values()) == {"torch.float32"}  # the sharded masters stay fp32


@pytest.mark.slow
@pytest.mark.parametrize("block", ["mac", "mal"])
def test_titans_under_fsdp2_with_fp32_memory_units_equals_one_process(block, tmp_path, one_thread):
    """The memory units are gathered once per block: MAC's per-segment calls (a count that differs between
    ranks with different sequence lengths) pair up; loss and gradients equal one process (minutes on CPU)."""
    kw = dict(family="titans", preset="titans-debug", batches=uneven_chats, model={"block": block})
    one = lm_steps(str(tmp_path / "one"), 4, 2, 1, **kw)
    two = run_ranks(lm_steps, 2, tmp_path / "two", str(tmp_path / "two"), 4, 1, 1, "titans", "titans-debug",
                    uneven_chats, {"block": block}, **{"train.parallel": "fsdp"})  # fmt: skip
    same(two[0], one)
