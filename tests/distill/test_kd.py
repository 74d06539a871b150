"""Logit distillation: the chunked loss equals the plain formula (value and gradient, dense and top-k), a = 0
trains exactly like plain training step for step, a real distillation run from a teacher run (bf16 teacher,
resumable), and a teacher with another tokenizer refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kititans.checkpoint import load_checkpoint
from kititans.cli import main
from kititans.train.distill import DistillSpec, TopK, build_setup, distill, distill_config, kd_loss
from kititans.train.loop import run_training

FAST = [("train.compile", "off"), ("train.dtype", "fp32"), ("train.batch_size", 4), ("train.seq_len", 64),
        ("train.log_every", 1), ("train.eval_every", 4), ("train.eval_batches", 2), ("train.save_every", 4),
        ("train.report", False), ("optim.warmup_steps", 2)]  # fmt: skip


def naive(logits, y, mask, teacher, alpha, temp):
    logp = F.log_softmax(logits, -1)
    ce = F.nll_loss(logp.flatten(0, 1), y.flatten(), reduction="none")
    ps = F.log_softmax(logits / temp, -1).flatten(0, 1)
    pt = F.log_softmax(teacher / temp, -1).flatten(0, 1)
    kl = (pt.exp() * (pt - ps)).sum(-1)
    per = (1 - alpha) * ce + alpha * temp**2 * kl
    w = mask.flatten().float()
    return (per * w).sum() / w.sum()


def test_chunked_kd_equals_the_plain_formula():
    torch.manual_seed(0)
    s = torch.randn(3, 7, 50, requires_grad=True)
    t, y = torch.randn(3, 7, 50), torch.randint(0, 50, (3, 7))
    mask = torch.rand(3, 7) > 0.3
    for alpha, temp in ((0.0, 1.0), (0.5, 2.0), (1.0, 1.0)):
        ref = naive(s, y, mask, t, alpha, temp)
        (g_ref,) = torch.autograd.grad(ref, s)
        got = kd_loss(s, y, mask, t, alpha, temp, rows=4)  # 21 rows in 6 chunks
        (g,) = torch.autograd.grad(got * 3.0, s)
        assert torch.allclose(got, ref, atol=1e-6) and torch.allclose(g, 3.0 * g_ref, atol=1e-6)
    assert torch.allclose(kd_loss(s, y), F.cross_entropy(s.flatten(0, 1), y.flatten()), atol=1e-6)


def test_topk_kd_is_the_kl_over_k_plus_one_buckets():
    torch.manual_seed(1)
    s = torch.randn(2, 5, 30, requires_grad=True)
    t = torch.randn(2, 5, 30)
    y = torch.randint(0, 30, (2, 5))
    lp_t = F.log_softmax(t, -1)
    top = lp_t.topk(4, -1)
    ids = top.indices.clone()
    ids[0, 0, 3] = -1  # a row with fewer than k entries
    lps = top.values.masked_fill(ids < 0, float("-inf"))
    rest = torch.log1p(-lps.exp().sum(-1))
    got = kd_loss(s, y, None, TopK(ids, lps, rest), alpha=1.0, rows=3)
    q = F.log_softmax(s, -1)
    qk = q.gather(-1, ids.clamp(min=0)).masked_fill(ids < 0, 0.0)
    pk = lps.exp()
    q_rest = torch.log1p(-(qk.exp() * (ids >= 0)).sum(-1))
    kl = (pk * (lps.masked_fill(ids < 0, 0.0) - qk)).sum(-1) + rest.exp() * (rest - q_rest)
    assert torch.allclose(got, kl.mean(), atol=1e-6)
    (g,) = torch.autograd.grad(got, s)
    (g_ref,) = torch.autograd.grad(kl.mean(), s)
    assert torch.allclose(g, g_ref, atol=1e-6)


@pytest.fixture(scope="module")
def student(debug_run, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("kd") / "student"
    shutil.copytree(debug_run, dst, ignore=shutil.ignore_patterns("train_state", "checkpoints"))
    return dst


def losses(run: Path) -> list[float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_alpha_zero_trains_like_plain_training(student, teacher_run, tmp_path):
    """a = 0 through the distillation loss and the teacher's forward = the loop's own loss, step for step."""
    layers = [*FAST, ("train.steps", 6)]
    spec = DistillSpec(student, tmp_path / "kd", teacher=teacher_run, alpha=0.0, teacher_dtype="fp32")
    cfg = distill_config(spec, layers)
    kd = distill(spec, cfg, progress=False)
    plain_spec = DistillSpec(student, tmp_path / "plain", teacher=teacher_run, alpha=0.0)
    plain_cfg = distill_config(plain_spec, layers)
    setup = build_setup(plain_spec, plain_cfg, False, False)
    setup.loss_fn = None  # the loop's default next-token cross entropy
    torch.manual_seed(plain_cfg.train.seed)
    plain = run_training(plain_cfg, setup, plain_spec.out, progress=False)
    a, b = losses(kd.run_dir), losses(plain.run_dir)
    assert len(a) == 6 and a == pytest.approx(b, rel=1e-5, abs=1e-6)
    wa, wb = load_checkpoint(kd.run_dir).model.state_dict(), load_checkpoint(plain.run_dir).model.state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_distill_cli_bf16_teacher_and_resume(student, teacher_run, tmp_path, capsys):
    out = tmp_path / "d"
    args = ["distill", str(student), "--teacher", str(teacher_run), "--alpha", "0.7", "--temperature", "2",
            "--teacher-dtype", "bf16",
            "--out", str(out), "--steps", "4", "-q", *[f"--set={k}={v}" for k, v in FAST]]  # fmt: skip
    assert main(args) == 0
    assert "distilled from" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())["kititans"]
    assert (
        cfg["stage"] == "distill"
        and cfg["distill"]["alpha"] == 0.7
        and cfg["distill"]["teacher_dtype"] == "bf16"
    )
    assert main(["distill", str(out), "--resume", "--steps", "6", "-q", "--reset-schedule"]) == 0
    assert len(losses(out)) == 6 and all(x == x for x in losses(out))


def test_teacher_with_another_tokenizer_is_refused(student, teacher_run, tmp_path, capsys):
    from sentencepiece import sentencepiece_model_pb2 as pb

    other = tmp_path / "other"
    shutil.copytree(teacher_run, other, ignore=shutil.ignore_patterns("train_state", "checkpoints"))
    proto = pb.ModelProto()
    proto.ParseFromString((other / "tokenizer.model").read_bytes())
    proto.pieces[20].score += 1.0  # the same vocabulary size, another tokenizer
    (other / "tokenizer.model").write_bytes(proto.SerializeToString())
    rc = main(["distill", str(student), "--teacher", str(other), "--out", str(tmp_path / "x"), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "another tokenizer" in err and "sequence-level" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_two_ranks_distill_like_one_rank(student, teacher_run, tmp_path):
    """torchrun with 2 CPU ranks (DDP over gloo) through the distillation loss = 1 rank with the same global
    batch, step for step: the teacher runs on each rank's own micro-batches."""
    import os
    import subprocess
    import sys

    def run(out: Path, ranks: int) -> list[float]:
        args = ["distill", str(student), "--teacher", str(teacher_run), "--alpha", "0.5", "--temperature", "2",
                "--teacher-dtype", "fp32", "--out", str(out), "--steps", "4", "-q",
                *[f"--set={k}={v}" for k, v in FAST], "--set=train.global_batch=8"]  # fmt: skip
        launch = ["-m", "torch.distributed.run", "--nproc-per-node", "2"] if ranks == 2 else []
        if ranks == 2:
            args.append("--set=train.parallel=ddp")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, *launch, "-m", "kititans", *args], capture_output=True, text=True,
                           env=env, timeout=900)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        return losses(out)

    one = run(tmp_path / "one", 1)
    two = run(tmp_path / "two", 2)
    assert len(one) == 4 and two == pytest.approx(one, rel=1e-4)
