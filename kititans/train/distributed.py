"""Training past one device with torch's own engine: the process group torchrun sets up, DDP or FSDP2
(`fully_shard` per block, then the root), collectives with a timeout, and a launcher for one machine.

Who does what (docs/distributed.md):
  every rank   builds the same model, loads the same checkpoint, draws its own slice of each step's windows,
               runs forward/backward, evaluates the same validation batches (so FSDP stays in lockstep);
  rank 0       prepares data (others wait at a barrier), writes checkpoints, metrics, trackers and reports.
A rank that dies makes the next collective fail on the others (gloo) or time out (NCCL, after
train.dist_timeout seconds); they stop with one line instead of hanging.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kititans.errors import KititansError

log = logging.getLogger("kititans")
PARALLEL = ("auto", "none", "ddp", "fsdp")
FSDP_MIN_PARAMS = 300_000_000  # auto: FSDP2 from lite-350m / titans-500m up (their AdamW state is 4-8 GB)


@dataclass
class Dist:
    """This process's place in the job (world 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            with collective("a barrier"):
                dist.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if flag is true on any (e.g. a SIGTERM that reached one rank first)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        with collective("agreeing on a stop"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of a scalar tensor over ranks (a copy; for logging)."""
        if not self.enabled:
            return value.detach()
        t = value.detach().clone().float().reshape(1)
        with collective("summing the loss"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t[0]

    def sum_ints(self, values: list[int], device: torch.device) -> list[int]:
        """Integers summed over ranks in one all-reduce (a step's token counts)."""
        if not self.enabled:
            return [int(v) for v in values]
        t = torch.tensor(values, dtype=torch.int64, device=device)
        with collective("counting the step's tokens"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [int(v) for v in t.tolist()]

    def gather_ints(self, values: list[int], device: torch.device) -> list[int]:
        """Every rank's integers, rank by rank (the same length on every rank)."""
        if not self.enabled:
            return [int(v) for v in values]
        t = torch.tensor(values, dtype=torch.int64, device=device)
        out = [torch.zeros_like(t) for _ in range(self.world)]
        with collective("gathering a measurement"):
            dist.all_gather(out, t)
        return [int(v) for o in out for v in o.tolist()]


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# what a collective raises when a peer is gone or silent (gloo, NCCL, the c10d store)
_PEER_LOST = re.compile(r"gloo|nccl|connection|connect|timed out|timeout|socket|peer|broken pipe|store", re.I)


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed collective (a peer died, a timeout) into one line that says how to continue; other
    errors pass through unchanged."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if not (isinstance(e, dist.DistError) or _PEER_LOST.search(str(e))):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise KititansError(
            f"rank {os.environ.get('RANK', '?')} lost its peers while {what} ({first}): another rank died or "
            "timed out; fix the cause and continue with `kititans train --resume RUN`"
        ) from None


def init_distributed(device_name: str, timeout_s: int) -> tuple[Dist, str]:
    """Join the torchrun job (if any). Returns (Dist, the device name this rank trains on)."""
    world = env_world()
    if world <= 1:
        return Dist(), device_name
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if torch.cuda.device_count() <= local:
            raise KititansError(
                f"rank {rank} needs GPU {local} but only {torch.cuda.device_count()} are visible: "
                "launch at most one process per GPU (--nproc-per-node)"
            )
        torch.cuda.set_device(local)
        device_name, backend = f"cuda:{local}", "nccl"
    else:
        device_name, backend = "cpu", "gloo"
    if not dist.is_initialized():
        with collective("joining the process group"):
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank, world, local, backend), device_name


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def choose_parallel(setting: str, world: int, n_params: int) -> str:
    """none | ddp | fsdp for this job; an impossible choice is refused with what to do instead."""
    if setting not in PARALLEL:
        raise KititansError(f"--parallel must be one of {', '.join(PARALLEL)}; got {setting!r}")
    if world <= 1:
        if setting in ("ddp", "fsdp"):
            raise KititansError(
                f"--parallel {setting} needs several processes: launch with torchrun --nproc-per-node N "
                "or `kititans train --nproc N`"
            )
        return "none"
    if setting == "none":
        raise KititansError("--parallel none with several processes: use ddp or fsdp (or auto)")
    if setting == "auto":
        return "fsdp" if n_params >= FSDP_MIN_PARAMS else "ddp"
    return setting


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (children of every ModuleList named `layers`): FSDP2's units."""
    return [
        m
        for name, ml in model.named_modules()
        if isinstance(ml, nn.ModuleList) and name.endswith("layers")
        for m in ml
    ]


def grad_factor(parallel: str, world: int) -> float:
    """What each rank's loss is multiplied by so that the wrapper's gradient reduction yields the SUM over
    ranks (the loss is already divided by the global token count, train/loss.py): DDP averages (x world);
    FSDP2 is set to sum by wrap()."""
    return float(world) if parallel == "ddp" else 1.0


def fp32_modules(model: nn.Module, spec: Any) -> list[nn.Module]:
    """The modules the family keeps in fp32 under mixed precision (FamilySpec.fp32_modules, e.g. Titans'
    neural memory), outermost first."""
    hook = getattr(spec, "fp32_modules", None) if spec is not None else None
    return list(hook(model)) if hook is not None else []


def wrap(model: nn.Module, parallel: str, d: Dist, device: torch.device, dtype: torch.dtype,
         spec: Any = None) -> nn.Module:  # fmt: skip
    """DDP, or FSDP2 with `fully_shard` per block then the root (tied embedding, final norm and head share
    the root unit); bf16 runs get MixedPrecisionPolicy(bf16 params, fp32 reduce), except the family's fp32
    modules, each its own unit with fp32 parameters (its output cast back to the run's dtype). FSDP2 sums
    gradients over ranks (the loss is divided by the global token count already)."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        _check_reduce_scatter(d, device)
        low = dtype != torch.float32
        mp = (
            MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
            if low
            else MixedPrecisionPolicy()
        )
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, output_dtype=dtype)
        units = []
        parents = {id(c): m for m in model.modules() for c in m.children()}
        for module in fp32_modules(model, spec):
            units.append(fully_shard(module, mp_policy=fp32, reshard_after_forward=False))
            # gathered once when its block starts, kept until the step's gradients are reduced: a block may
            # call the memory's methods besides forward, a number of times that differs between ranks (Titans'
            # MAC: one per segment of each rank's own sequence length), so per-call hooks would not pair up
            parents[id(module)].register_forward_pre_hook(lambda *_, unit=module: unit.unshard())
        for block in blocks(model):
            units.append(fully_shard(block, mp_policy=mp))
        units.append(fully_shard(model, mp_policy=mp))
        for unit in units:
            unit.set_gradient_divide_factor(1.0)
            if d.backend == "gloo":  # gloo has no pre-multiplied sum: sum, then divide by 1
                unit.set_force_sum_reduction_for_comms(True)
        return model
    return model


def _check_reduce_scatter(d: Dist, device: torch.device) -> None:
    """FSDP2 reduce-scatters gradients; some builds' gloo (CPU) backend cannot."""
    x = torch.ones(d.world, device=device)
    out = torch.zeros(1, device=device)
    try:
        dist.reduce_scatter_tensor(out, x)
    except (RuntimeError, NotImplementedError) as e:
        raise KititansError(
            f"--parallel fsdp needs reduce-scatter, which this torch's {d.backend} backend lacks "
            f"({str(e).splitlines()[0][:120]}): use --parallel ddp"
        ) from None


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, parallel: str, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on micro-steps that are not the last of a step."""
    if sync or parallel == "none":
        yield
    elif parallel == "ddp":
        with model.no_sync():  # type: ignore[operator]
            yield
    else:
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]


def full_value(t: Any) -> Any:
    """A DTensor (FSDP2 grad norm, ...) as a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ------------------------------------------------------------------------------------ the launcher
def launch(nproc: int, argv: list[str]) -> int:
    """`kititans train --nproc N ...`: torchrun on this machine (torch's elastic agent), one line on failure."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise KititansError(f"--nproc must be >= 1, got {nproc}")
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the agent's own log lines: we say it in one
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        run_id=f"kititans-{os.getpid()}",
        max_restarts=0,
        monitor_interval=0.5,
    )
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        elastic_launch(config, sys.executable)("-m", "kititans", *argv)
    except SignalException as e:  # SIGTERM/SIGINT to the launcher: the ranks saved a checkpoint and stopped
        log.warning("stopped by %s; continue with: kititans train --resume RUN", e.sigval.name)
        return 130
    except Exception as e:  # ChildFailedError: which rank failed and how
        failures = getattr(e, "failures", {}) or {}
        first = min(failures.items(), key=lambda kv: kv[1].timestamp)[1] if failures else None
        how = f"rank {first.local_rank} exited with code {first.exitcode}" if first else type(e).__name__
        raise KititansError(
            f"distributed training stopped: {how} (see its message above); continue with "
            "`kititans train --resume RUN`"
        ) from None
    return 0
