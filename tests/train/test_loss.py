"""The chunked head + loss (train/loss.py): exact to the dense fp32 loss (value and gradients to 1e-5), never
holding more than one chunk of logits, for cross entropy (Lite and Titans, masked and not), distillation and a
mix; the Liger switch refuses what it cannot do in one line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kititans.errors import KititansError
from kititans.models.spec import get_family
from kititans.train.loss import (
    IGNORE,
    CrossEntropy,
    Distill,
    HeadLogits,
    LMLoss,
    Mixed,
    linear_loss,
    lm_counts,
    resolve_impl,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


class LogitRows(TorchDispatchMode):
    """The most rows of vocabulary-wide tensors (last dim == vocab) any op produced while active."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor) or t.untyped_storage().data_ptr() in inputs:
                continue  # a view (e.g. the head weight transposed) allocates nothing
            if t.ndim >= 2 and t.shape[-1] == self.vocab:
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


@pytest.mark.parametrize("family, preset", [("lite", "debug"), ("titans", "titans-debug")])
def test_chunked_lm_loss_equals_the_dense_loss(family, preset, one_thread):
    spec = get_family(family)
    torch.manual_seed(0)
    model = spec.build(spec.make_config(preset, {"vocab_size": 1000}))
    x = torch.randint(0, 512, (3, 40))
    y = torch.randint(0, 512, (3, 40))
    mask = torch.rand(3, 40) > 0.6
    y[~mask & (torch.rand(3, 40) > 0.5)] = IGNORE  # padding targets are never supervised
    for batch in ((x, y.clamp(min=0)), (x, y, mask)):
        model.zero_grad()
        logits = model(x).float()
        keep = batch[2].flatten() if len(batch) > 2 else torch.ones(120, dtype=torch.bool)
        dense = F.cross_entropy(logits.flatten(0, 1)[keep], batch[1].flatten()[keep], reduction="sum")
        dense.backward()
        ref = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        with LogitRows(1000) as probe:
            chunked = LMLoss(rows=16)(model, batch, torch.device("cpu"), torch.autocast("cpu", enabled=False))
        chunked.backward()
        assert abs(float(chunked.detach() - dense.detach())) <= 1e-5 * float(dense.detach())
        for n, p in model.named_parameters():
            assert rel(p.grad, ref[n]) <= 1e-5, n
        assert probe.rows == 16  # never (B, T, V) logits: one 16-row chunk at a time
        assert lm_counts(batch)[0] == int(keep.sum())


def test_distill_and_mixed_targets_equal_dense_kl_and_ce():
    torch.manual_seed(0)
    h = torch.randn(50, 16, requires_grad=True)
    w = (torch.randn(300, 16) * 0.3).requires_grad_()
    th, tw, y = torch.randn(50, 16), torch.randn(300, 16) * 0.3, torch.randint(0, 300, (50,))
    for t in (1.0, 2.0):
        dense = F.kl_div(F.log_softmax(h @ w.T / t, -1), F.log_softmax(th @ tw.T / t, -1), log_target=True,
                         reduction="sum") * t * t  # fmt: skip
        mixed = 0.5 * F.cross_entropy(h @ w.T, y, reduction="sum") + 0.5 * dense
        for ref, target in ((dense, Distill(HeadLogits(th, tw), t)),
                            (mixed, Mixed([(0.5, CrossEntropy(y)), (0.5, Distill(HeadLogits(th, tw), t))]))):  # fmt: skip
            gh, gw = torch.autograd.grad(ref, (h, w), retain_graph=True)
            out = linear_loss(h, w, target, rows=7)
            ch, cw = torch.autograd.grad(out, (h, w))
            assert abs(float(out.detach() - ref.detach())) <= 1e-5 * float(ref.detach())
            assert rel(ch, gh) <= 1e-5 and rel(cw, gw) <= 1e-5
    with torch.no_grad():  # evaluation: the value alone
        assert linear_loss(h, w, CrossEntropy(y)).requires_grad is False


def test_liger_is_chosen_only_where_it_runs():
    assert resolve_impl("auto", torch.device("cpu")) == "chunked"
    with pytest.raises(KititansError, match="runs on CUDA only"):
        resolve_impl("liger", torch.device("cpu"))
    with pytest.raises(KititansError, match="must be one of"):
        resolve_impl("fused", torch.device("cpu"))


def test_logit_distillation_runs_through_the_head_chunk_by_chunk(one_thread):
    """kititans distill's loss (train/distill.py DistillLoss): student and teacher hidden states through their
    heads a chunk at a time equal the dense formula on full fp32 logits (value and gradients, masked rows,
    dense teacher and stored top-k rows), and no tensor with the vocabulary as its last dim has more rows than
    one chunk."""
    from kititans.train.distill import DistillLoss, TopK, kd_loss

    spec = get_family("lite")
    torch.manual_seed(0)
    student = spec.build(spec.make_config("debug", {"vocab_size": 1000}))
    teacher = spec.build(spec.make_config("debug", {"vocab_size": 1000})).eval().requires_grad_(False)
    x, y = torch.randint(0, 1000, (3, 40)), torch.randint(0, 1000, (3, 40))
    mask = torch.rand(3, 40) > 0.4
    lp_t = F.log_softmax(teacher(x).float(), -1)
    top = lp_t.topk(5, -1)
    rest = torch.log1p(-top.values.exp().sum(-1))
    cpu, off = torch.device("cpu"), torch.autocast("cpu", enabled=False)
    for alpha, temp, batch in (
        (0.7, 2.0, (x, y, mask)),
        (1.0, 1.0, (x, y)),
        (0.5, 1.0, (x, y, mask, top.indices, top.values, rest)),
    ):
        scores = TopK(*batch[3:]) if len(batch) == 6 else teacher(x).float()
        student.zero_grad()
        ref = kd_loss(student(x).float(), y, batch[2] if len(batch) > 2 else None, scores, alpha, temp)
        count = int(mask.sum()) if len(batch) > 2 else y.numel()
        (ref * count).backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters()}
        student.zero_grad()
        with LogitRows(1000) as probe:
            got = DistillLoss(teacher, alpha, temp, None, rows=16)(student, batch, cpu, off)
        got.backward()
        assert abs(float(got.detach()) - float(ref.detach()) * count) <= 1e-5 * float(ref.detach()) * count
        for n, p in student.named_parameters():
            assert rel(p.grad, grads[n]) <= 1e-5, n
        assert probe.rows == 16
