"""Optimizers built from parameter roles (FamilySpec.roles).

adamw: AdamW on everything (no weight decay on 1-D gains).
muon:  Muon (train/muon.py: torch.optim.Muon's step, per logical matrix of a fused one) on the 2-D matrices
       inside the blocks ("matrix" role), AdamW on embeddings, head, norms, gates and >2-D tensors. With the
       "original" shape scaling (optim.muon_scale) ~0.02-0.05 is the right lr; torch's default lr=1e-3 is ~20x
       too small (research/training.md B1); "match_rms_adamw" takes an AdamW-sized lr. Muon is a steepest-
       descent rule for hidden matrices: not for embeddings, the head, or 0/1-D parameters.
Both come as one CombinedOptimizer: one state_dict, one set of param_groups for the schedule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kititans.config import OptimConfig
from kititans.models.spec import FamilySpec
from kititans.train.muon import Muon


class CombinedOptimizer:
    """Several torch optimizers stepped together, checkpointed as one."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state["optimizers"]
        if len(states) != len(self.optimizers):
            raise ValueError("optimizer state does not match this optimizer setup")
        for o, s in zip(self.optimizers, states):
            o.load_state_dict(s)


def build_optimizer(
    model: nn.Module, spec: FamilySpec, cfg: OptimConfig, fused: bool = False
) -> CombinedOptimizer:
    """The optimizer for a model's parameter roles; `fused`: CUDA's single-kernel AdamW."""
    roles = spec.roles(model)
    params = dict(model.named_parameters())
    by_role: dict[str, list[torch.Tensor]] = {}
    for name, role in roles.items():
        by_role.setdefault(role, []).append(params[name])
    adam_kw: dict[str, Any] = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if fused:
        adam_kw["fused"] = True
    muon_roles = ("matrix",) if cfg.name == "muon" else ()
    decay = [
        p
        for r in ("matrix", "embedding", "head", "tensor")
        if r not in muon_roles
        for p in by_role.get(r, [])
    ]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr, "base_lr": cfg.lr, "kind": "adamw"},
        {
            "params": by_role.get("scalar", []),
            "weight_decay": 0.0,
            "lr": cfg.lr,
            "base_lr": cfg.lr,
            "kind": "adamw",
        },
    ]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW([g for g in groups if g["params"]], **adam_kw)
    ]
    if muon_roles and by_role.get("matrix"):
        splits = {id(params[n]): rows for n, rows in spec.splits(model).items() if roles[n] == "matrix"}
        muon = Muon(
            by_role["matrix"],
            lr=cfg.muon_lr,
            weight_decay=cfg.muon_weight_decay,
            momentum=cfg.muon_momentum,
            nesterov=True,
            adjust_lr_fn=cfg.muon_scale,
            splits=splits,
        )
        for g in muon.param_groups:
            g.update(base_lr=cfg.muon_lr, kind="muon")
        optimizers.append(muon)
    opt = CombinedOptimizer(optimizers)
    covered = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(covered) == sorted(id(p) for p in params.values()), (
        "optimizer groups must cover every parameter"
    )
    return opt
