"""Model and optimizer state in a form that any world size and parallelism can resume: full (unsharded)
tensors keyed by parameter name (torch.distributed.checkpoint's state-dict API, which gathers FSDP2 shards
and shards them again on load)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kititans.checkpoint import aliases
from kititans.errors import KititansError
from kititans.train import sharded
from kititans.train.checkpoints import Restored, Snapshot
from kititans.train.optim import CombinedOptimizer


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def restore_into(model: nn.Module, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Load saved weights into the (not yet wrapped) model; every tensor must be there with its shape."""
    expected = {n: t.shape for n, t in model.state_dict().items() if n not in aliases(model)}
    missing = sorted(set(expected) - set(weights))
    wrong = sorted(n for n in expected if n in weights and weights[n].shape != expected[n])
    if missing or wrong:
        raise KititansError(
            f"{where}: the checkpoint does not fit the model (missing {missing[:3]}, wrong shape {wrong[:3]})"
        )
    model.load_state_dict({n: weights[n] for n in expected}, strict=False)


class Snapshotter:
    """Gathers (and restores) a full, name-keyed state; under FSDP2 every rank must call take()."""

    def __init__(
        self, model: nn.Module, opt: CombinedOptimizer, parallel: str, dist: Any, shards: bool = False
    ):
        self.model, self.opt, self.parallel, self.dist = model, opt, parallel, dist
        self.shards = shards  # the optimizer state written by every rank (train/sharded.py)

    def take(self, step: int, state: dict[str, Any]) -> Snapshot:
        """The consolidated weights on rank 0; the optimizer state gathered on rank 0 too, or (sharded) each
        rank's own part of it, uncopied (write it before the next step)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        if self.parallel != "fsdp" and not self.dist.main:  # weights: rank 0's copy, nothing to gather
            local = sharded.local_states(self.model, self.opt.optimizers) if self.shards else []
            return Snapshot(step, {}, local, state)
        opts = _options(cpu_offload=True)
        weights = (
            get_model_state_dict(self.model, options=opts)
            if self.parallel == "fsdp"
            else {n: t.detach().cpu() for n, t in self.model.state_dict().items()}
        )
        if self.shards:
            return Snapshot(step, weights, sharded.local_states(self.model, self.opt.optimizers), state)
        optimizers = [get_optimizer_state_dict(self.model, o, options=opts) for o in self.opt.optimizers]
        return Snapshot(step, weights, optimizers, state)

    def load_model(self, restored: Restored) -> None:
        """Several ranks: rank 0 holds the saved weights (restore_into, before wrapping); broadcast them into
        every rank's (possibly sharded) model. One process: already loaded."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        if not self.dist.enabled:
            return
        weights = _with_tied_names(self.model, restored.weights) if self.dist.main else {}
        set_model_state_dict(self.model, weights, options=_options(broadcast_from_rank0=True))

    def load_optimizer(self, restored: Restored, parallel: str) -> None:
        """The saved optimizer state into this (possibly sharded) optimizer: read by rank 0 only and broadcast
        tensor by tensor, each rank keeping its shard (torch.distributed.checkpoint's state-dict API). The
        learning rates stay the current config's (a resume may change --lr)."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        base = [g["base_lr"] for g in self.opt.param_groups]
        if restored.optimizers is None:  # a format-1 run: index-keyed torch state
            if parallel != "none":
                raise KititansError(
                    "this run was saved by an older kititans: resume it once on one process, then on several"
                )
            try:
                self.opt.load_state_dict(restored.legacy["optimizer"])
            except (ValueError, KeyError) as e:
                raise KititansError(
                    f"optimizer state does not fit (was the optimizer changed?): {e}"
                ) from None
        elif restored.shards is not None:  # every rank reads its own pieces
            sharded.load_optimizers(self.model, self.opt.optimizers, restored.shards)
        else:
            device = next(self.model.parameters()).device
            n = self.dist.gather_ints([len(restored.optimizers)], device)[0]  # rank 0 read the file
            if n != len(self.opt.optimizers):
                raise KititansError(
                    "the saved optimizer state does not fit this optimizer (was --optimizer changed?); resume "
                    "with the run's optimizer"
                )
            bcast = self.dist.enabled
            for i, o in enumerate(self.opt.optimizers):
                sd = restored.optimizers[i] if restored.optimizers else {}
                try:
                    set_optimizer_state_dict(self.model, o, sd, options=_options(broadcast_from_rank0=bcast))
                except (ValueError, KeyError, RuntimeError) as e:
                    raise KititansError(
                        f"the saved optimizer state does not fit (was the optimizer changed?): {str(e)[:200]}"
                    ) from None
        for g, lr in zip(self.opt.param_groups, base):
            g["base_lr"] = lr


def _with_tied_names(model: nn.Module, weights: dict[str, Any]) -> dict[str, Any]:
    """The saved weights under every name the model has for them: a tied head is saved once (safetensors keeps
    one name per tensor), and the broadcast loads strictly, by every parameter name."""
    from kititans.train.loss import unwrap

    names: dict[int, list[str]] = {}
    for name, p in unwrap(model).named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    out = dict(weights)
    for group in names.values():
        have = next((n for n in group if n in out), None)
        for n in group:
            if have is not None and n not in out:
                out[n] = out[have]
    return out
