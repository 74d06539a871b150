from __future__ import annotations

import pytest
import torch

from kititans.config import OptimConfig
from kititans.models.lite import SPEC, LiteModel
from kititans.train.muon import Muon
from kititans.train.optim import build_optimizer
from kititans.train.schedule import lr_multiplier


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


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_schedules(kind):
    mults = [lr_multiplier(s, 100, 10, kind, 0.1, 0.2) for s in range(100)]
    assert mults[0] == pytest.approx(0.1) and mults[9] == pytest.approx(1.0)
    assert max(mults) == pytest.approx(1.0)
    if kind == "constant":
        assert mults[-1] == 1.0
    else:
        assert mults[-1] == pytest.approx(0.1, abs=0.05) and all(
            a >= b - 1e-12 for a, b in zip(mults[10:], mults[11:])
        )
    if kind == "wsd":
        assert mults[79] == 1.0 and mults[81] < 1.0
