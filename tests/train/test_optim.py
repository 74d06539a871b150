from __future__ import annotations

import pytest
import torch

from kititans.config import OptimConfig
from kititans.models.lite import SPEC, LiteModel
from kititans.train.muon import Muon
from kititans.train.optim import build_optimizer


def model():
    return LiteModel(SPEC.make_config("debug"))


def test_muon_takes_block_matrices_adamw_the_rest():
    m = model()
    opt = build_optimizer(m, SPEC, OptimConfig(name="muon"))
    kinds = {id(p): g["kind"] for g in opt.param_groups for p in g["params"]}
    names = dict(m.named_parameters())
    assert kinds[id(names["model.layers.0.self_attn.q_proj.weight"])] == "muon"
    assert kinds[id(names["model.embed_tokens.weight"])] == "adamw"  # tied with the head
    assert kinds[id(names["model.norm.weight"])] == "adamw"
    assert len(kinds) == len(names)
    assert isinstance(opt.optimizers[1], Muon)


def test_adamw_half_matches_torch_adamw():
    torch.manual_seed(0)
    a, b = model(), model()
    b.load_state_dict(a.state_dict())
    ours = build_optimizer(a, SPEC, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1))
    decay = [p for n, p in b.named_parameters() if p.ndim >= 2]
    nodecay = [p for n, p in b.named_parameters() if p.ndim < 2]
    ref = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": nodecay, "weight_decay": 0.0}],
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    x = torch.randint(0, 512, (2, 16))
    for opt, m in ((ours, a), (ref, b)):
        for _ in range(3):
            m.loss(x[:, :-1], x[:, 1:]).backward()
            opt.step()
            opt.zero_grad()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_state_dict_round_trip():
    m = model()
    opt = build_optimizer(m, SPEC, OptimConfig(name="muon"))
    m.loss(torch.randint(0, 512, (2, 9))[:, :-1], torch.randint(0, 512, (2, 8))).backward()
    opt.step()
    opt2 = build_optimizer(m, SPEC, OptimConfig(name="muon"))
    opt2.load_state_dict(opt.state_dict())
    k = next(iter(opt.optimizers[1].state))
    assert torch.equal(
        opt.optimizers[1].state[k]["momentum_buffer"], opt2.optimizers[1].state[k]["momentum_buffer"]
    )


def _steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[list[torch.Tensor]]) -> None:
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("scale", ["original", "match_rms_adamw"])
def test_muon_is_torch_muon_on_plain_matrices(scale):
    torch.manual_seed(0)
    shapes = [(64, 32), (32, 96)]
    ours = [torch.randn(s) * 0.02 for s in shapes]
    ref = [p.clone() for p in ours]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    kw = dict(lr=0.02, weight_decay=0.01, momentum=0.95, nesterov=True, adjust_lr_fn=scale)
    _steps(Muon(ours, ns_dtype=torch.bfloat16, **kw), ours, grads)  # torch's Newton-Schulz runs in bf16
    _steps(torch.optim.Muon(ref, **kw), ref, grads)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)  # one rounding of lr x scale apart at most


def test_newton_schulz_runs_in_fp32_on_cpus_without_fast_bf16(monkeypatch):
    """bf16 products are 8-100x slower than fp32 on AVX2 CPUs: Muon orthogonalises in fp32 there, in bf16 on
    CUDA and AVX512-BF16/AMX CPUs; the fp32 update is the bf16 one to bf16's rounding, and more orthogonal."""
    from kititans.train import muon as muon_mod

    cpu = torch.device("cpu")
    monkeypatch.setattr(muon_mod, "cpu_has_fast_bf16", lambda: False)
    assert muon_mod.ns_dtype(cpu) == torch.float32
    monkeypatch.setattr(muon_mod, "cpu_has_fast_bf16", lambda: True)
    assert muon_mod.ns_dtype(cpu) == torch.bfloat16
    assert muon_mod.ns_dtype(torch.device("cuda")) == torch.bfloat16
    assert muon_mod.ns_dtype(torch.device("meta")) == torch.float32
    torch.manual_seed(0)
    g = torch.randn(64, 192)
    g0 = g.clone()
    o32 = muon_mod.newton_schulz(g, dtype=torch.float32)
    o16 = muon_mod.newton_schulz(g, dtype=torch.bfloat16).float()
    assert torch.equal(g, g0)  # the update is not modified in place, whatever the dtype
    assert o32.dtype == torch.float32 and (o32 - o16).abs().max() < 0.05
    s32, s16 = torch.linalg.svdvals(o32), torch.linalg.svdvals(o16)
    assert s32.min() > 0.6 and s32.max() < 1.25  # quintic NS: singular values in about [0.7, 1.2]
    assert (s32 - 1).abs().mean() <= (s16 - 1).abs().mean() + 1e-3
    p32, p16 = [g.clone() * 0.02], [g.clone() * 0.02]
    grads = [[torch.randn(64, 192)] for _ in range(2)]
    _steps(Muon(p32, ns_dtype=torch.float32), p32, grads)
    _steps(Muon(p16, ns_dtype=torch.bfloat16), p16, grads)
    torch.testing.assert_close(p32[0], p16[0], rtol=0, atol=2e-3)


def test_fused_matrices_get_exactly_the_updates_of_separate_ones():
    """q|k|v fused in one (3D, D) matrix with splits == three (D, D) matrices; orthogonalised as one block the
    update differs (coupled, and sqrt(3) larger under the original scaling)."""
    torch.manual_seed(0)
    d = 32
    fused = torch.randn(3 * d, d) * 0.02
    parts = [t.clone() for t in fused.split(d)]
    whole = fused.clone()
    grads = [torch.randn(3 * d, d) for _ in range(3)]
    _steps(Muon([fused], splits={id(fused): (d, d, d)}), [fused], [[g] for g in grads])
    _steps(Muon(parts), parts, [list(g.split(d)) for g in grads])
    _steps(Muon([whole]), [whole], [[g] for g in grads])
    assert torch.equal(fused, torch.cat(parts))
    assert (whole - fused).abs().max() > 1e-3


def test_titans_fused_weights_step_as_their_logical_matrices():
    from kititans.models.titans.model import SPEC as TITANS

    torch.manual_seed(0)
    m = TITANS.build(TITANS.make_config("titans-debug"))
    opt = build_optimizer(m, TITANS, OptimConfig(name="muon", muon_lr=0.05))
    muon = opt.optimizers[1]
    names = dict(m.named_parameters())
    split = {n for n, p in names.items() if id(p) in muon.splits}
    assert split == {n for n in names if n.endswith(("attn.qkv.weight", "memory.proj.weight"))} and split
    x = torch.randint(0, 512, (2, 33))
    m.loss(x[:, :-1], x[:, 1:]).backward()
    before = {n: names[n].detach().clone() for n in split}
    muon.step()
    for name in sorted(split):
        p, d = names[name], names[name].shape[0] // 3
        parts = [t.clone() for t in before[name].split(d)]
        _steps(Muon(parts, lr=0.05, weight_decay=0.01), parts, [list(p.grad.split(d))])
        assert torch.equal(p.detach(), torch.cat(parts)), name
