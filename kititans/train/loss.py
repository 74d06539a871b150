"""Training losses, reduced in one place: the loss of an optimizer step is the SUM over all of its supervised
units (tokens; pairs for a contrastive loss) on every micro-batch and every rank, divided by their GLOBAL
count, so a token weighs the same whatever micro-batch, accumulation step or rank it lands in (a mean of
per-micro-batch means weighs a token of a 2-token micro-batch 100x one of a 200-token micro-batch).

  counts     every micro-batch of a step is drawn first and its supervised units counted; one all-reduce per
             step sums the counts of all ranks (the loop, train/loop.py);
  scale      each micro-batch backpropagates its sum x grad_factor / global count, where grad_factor undoes
             what the data-parallel wrapper does to gradients (DDP averages over ranks: x world; FSDP2 is set
             to sum, train/distributed.py), so the accumulated gradient is d(step loss)/d(weights);
  logging    the printed and logged loss is (sum over ranks) / global count: the same token-weighted number.

The LM head and its loss never materialise full-vocabulary fp32 logits: `linear_loss` runs head matmul, loss
and gradient per chunk of rows (the fused-linear-cross-entropy method of Liger and torchtitan), holding one
chunk's logits at a time. What a chunk is scored against is pluggable (`CrossEntropy`; `Distill` from a
teacher's hidden states and head, `HeadLogits`; `Mixed`), so logit distillation reuses it. On CUDA with
liger-kernel installed, cross entropy may run through Liger's Triton kernel instead (train.loss_impl).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kititans.errors import KititansError

IGNORE = -100  # an unsupervised target (padding), as transformers and torch's cross_entropy use it
CHUNK_ELEMENTS = 1 << 23  # auto chunk: about 8M logits (32 MB in fp32) whatever the vocabulary
MIN_ROWS = 64  # ... but never fewer rows than this (a 150k vocabulary: 64 rows, 38 MB)
LOSS_IMPLS = ("auto", "chunked", "liger")

Batch = tuple[Tensor, ...]


# ----------------------------------------------------------------------------------- per-chunk targets
class ChunkTarget(Protocol):
    """What the logits of rows [a, b) are scored against: the loss per row (n,) and, when `grad`, the
    gradient of their sum with respect to the fp32 logits (n, V) (which may overwrite `logits`)."""

    def __call__(self, logits: Tensor, a: int, b: int, grad: bool) -> tuple[Tensor, Tensor | None]: ...


@dataclass
class CrossEntropy:
    """Cross entropy against integer targets (N,)."""

    targets: Tensor

    def __call__(self, logits: Tensor, a: int, b: int, grad: bool) -> tuple[Tensor, Tensor | None]:
        y = self.targets[a:b]
        picked = logits.gather(1, y[:, None])[:, 0]  # (n,)
        if not grad:
            return torch.logsumexp(logits, dim=-1) - picked, None
        top = logits.amax(dim=-1, keepdim=True)
        g = logits.sub_(top).exp_()  # in place: the chunk's logits are the only (n, V) buffer
        total = g.sum(dim=-1, keepdim=True)
        loss = (top + total.log())[:, 0] - picked
        g.div_(total)  # softmax
        g[torch.arange(len(y), device=g.device), y] -= 1.0
        return loss, g


@dataclass
class HeadLogits:
    """A (teacher) model's logits, chunk by chunk, from its hidden states (N, D) and head weight (V, D)."""

    hidden: Tensor
    weight: Tensor
    device: torch.device | None = None  # where the logits go (the student's), when the teacher is elsewhere

    def __call__(self, a: int, b: int) -> Tensor:
        with torch.no_grad():
            out = F.linear(self.hidden[a:b], self.weight).float()
        return out if self.device is None else out.to(self.device)


@dataclass
class Distill:
    """KL(teacher || student) per row at `temperature`, times temperature^2 (Hinton) so gradients keep their
    size across temperatures; `teacher(a, b)` gives the teacher's logits of rows [a, b) (e.g. HeadLogits)."""

    teacher: Callable[[int, int], Tensor]
    temperature: float = 1.0

    def __call__(self, logits: Tensor, a: int, b: int, grad: bool) -> tuple[Tensor, Tensor | None]:
        t = self.temperature
        log_pt = F.log_softmax(self.teacher(a, b).float() / t, dim=-1)  # (n, V)
        log_ps = F.log_softmax(logits / t, dim=-1)
        pt = log_pt.exp()
        loss = (pt * (log_pt - log_ps)).sum(-1) * (t * t)
        if not grad:
            return loss, None
        return loss, log_ps.exp_().sub_(pt).mul_(t)  # d(t^2 KL)/dz = t (softmax(z / t) - p_teacher)


@dataclass
class Mixed:
    """A weighted sum of targets, e.g. [(0.5, CrossEntropy(y)), (0.5, Distill(teacher))]."""

    parts: list[tuple[float, ChunkTarget]]

    def __call__(self, logits: Tensor, a: int, b: int, grad: bool) -> tuple[Tensor, Tensor | None]:
        loss: Tensor | None = None
        total: Tensor | None = None
        for i, (w, target) in enumerate(self.parts):
            last = i == len(self.parts) - 1
            part, g = target(logits if last or not grad else logits.clone(), a, b, grad)
            loss = part * w if loss is None else loss + part * w
            if g is not None:
                total = g.mul_(w) if total is None else total.add_(g, alpha=w)
        assert loss is not None, "Mixed needs at least one target"
        return loss, total


# ------------------------------------------------------------------------- the chunked head + loss
def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype the head matmul runs in: autocast's where autocast is on, else the tensor's own."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


def chunk_rows(vocab: int, rows: int = 0) -> int:
    """Rows per chunk: `rows` if given, else about CHUNK_ELEMENTS logits per chunk (at least MIN_ROWS rows)."""
    return rows if rows > 0 else max(MIN_ROWS, CHUNK_ELEMENTS // max(vocab, 1))


class _LinearLoss(torch.autograd.Function):
    """sum over rows of target(hidden @ weight.T), a chunk of rows at a time. Gradients are computed in the
    forward, chunk by chunk (each chunk's logits are freed at once), and scaled by the incoming gradient in
    backward. Matmuls run in the compute dtype (autocast's), logits, losses and softmax in fp32; the weight
    gradient accumulates in fp32."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, target: ChunkTarget, rows: int, dt: torch.dtype,
                need_h: bool, need_w: bool) -> Tensor:  # fmt: skip
        w = weight.to(dt)
        n, dev = hidden.shape[0], hidden.device
        total = torch.zeros((), dtype=torch.float32, device=dev)
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=dev) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for a in range(0, n, rows):
            b = min(a + rows, n)
            h = hidden[a:b].to(dt)
            loss, g = target(F.linear(h, w).float(), a, b, need_h or need_w)  # (n,), (n, V) fp32
            total += loss.sum()
            if g is None:
                continue
            g = g.to(dt)
            if grad_h is not None:
                grad_h[a:b] = g @ w
            if grad_w is not None and dt == grad_w.dtype:
                grad_w.addmm_(g.T, h)  # accumulated in place: no (V, D) temporary per chunk
            elif grad_w is not None:
                grad_w.add_(g.T @ h)
            del g
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        if getattr(ctx, "done", False):
            raise RuntimeError("linear_loss: its gradients are scaled in place, so backward runs once")
        ctx.done = True
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = grad_h.mul_(grad_out).to(h_dtype) if grad_h is not None else None
        gw = grad_w.mul_(grad_out).to(w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def linear_loss(hidden: Tensor, weight: Tensor, target: ChunkTarget, rows: int = 0) -> Tensor:
    """sum_i target_i(hidden_i @ weight.T) for hidden (N, D), weight (V, D), without ever holding more than
    `rows` (default: about CHUNK_ELEMENTS / V) rows of logits. Differentiable in hidden and weight."""
    grad = torch.is_grad_enabled()
    dt = compute_dtype(hidden)
    rows = chunk_rows(weight.shape[0], rows)
    need_h, need_w = grad and hidden.requires_grad, grad and weight.requires_grad
    return _LinearLoss.apply(hidden, weight, target, rows, dt, need_h, need_w)


class _LogitsLoss(torch.autograd.Function):
    """sum over rows of target(logits) for logits already made (N, V): each chunk goes to fp32 alone."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: ChunkTarget, rows: int, need: bool) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        grad = torch.empty_like(logits) if need else None
        for a in range(0, logits.shape[0], rows):
            b = min(a + rows, logits.shape[0])
            # a copy even in fp32: targets may overwrite the chunk they are given (CrossEntropy does)
            loss, g = target(logits[a:b].to(torch.float32, copy=True), a, b, need)
            total += loss.sum()
            if grad is not None and g is not None:
                grad[a:b] = g
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_out.to(grad.dtype) if grad is not None else None), None, None, None


def logits_loss(logits: Tensor, target: ChunkTarget, rows: int = 0) -> Tensor:
    """sum_i target_i(logits_i) for logits (N, V) a model already made (a runtime that only gives logits):
    the same targets as linear_loss, one chunk in fp32 at a time. Differentiable in logits."""
    need = torch.is_grad_enabled() and logits.requires_grad
    return _LogitsLoss.apply(logits, target, chunk_rows(logits.shape[-1], rows), need)


def resolve_impl(setting: str, device: torch.device) -> str:
    """chunked | liger for `train.loss_impl` on this device (auto: liger on CUDA when installed)."""
    if setting not in LOSS_IMPLS:
        raise KititansError(f"train.loss_impl must be one of {', '.join(LOSS_IMPLS)}; got {setting!r}")
    have = importlib.util.find_spec("liger_kernel") is not None
    if setting == "liger":
        if device.type != "cuda":
            raise KititansError(
                "train.loss_impl=liger runs on CUDA only: use chunked (or auto) on this device"
            )
        if not have:
            raise KititansError("train.loss_impl=liger needs liger-kernel: pip install 'kititans[liger]'")
        return "liger"
    return "liger" if setting == "auto" and device.type == "cuda" and have else "chunked"


def _liger_ce(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    out = LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets)
    return out[0] if isinstance(out, tuple) else out


def head_loss(
    hidden: Tensor, weight: Tensor, target: ChunkTarget, impl: str = "chunked", rows: int = 0
) -> Tensor:
    """The summed loss of hidden rows (N, D) through a head (V, D): Liger's kernel for cross entropy when
    impl is "liger", else linear_loss."""
    if impl == "liger" and isinstance(target, CrossEntropy):
        return _liger_ce(hidden, weight, target.targets).float()
    return linear_loss(hidden, weight, target, rows)


# ------------------------------------------------------------------------------------ LM objectives
def unwrap(model: nn.Module) -> nn.Module:
    """The model under torch.compile and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def head_weight(model: nn.Module) -> Tensor:
    """The LM head's weight as the forward uses it (fake-quantized under QAT, unsharded under FSDP2 after the
    root's forward)."""
    return unwrap(model).lm_head.weight


def lm_counts(batch: Batch) -> tuple[int, int]:
    """(supervised targets, non-padding tokens) of an LM batch (x, y[, mask]); padding targets are IGNORE."""
    y = batch[1]
    if len(batch) > 2:
        return int(batch[2].sum()), int((y != IGNORE).sum())
    return y.numel(), y.numel()


def lm_rows(model: nn.Module, batch: Batch, device: torch.device) -> tuple[Tensor, Tensor]:
    """The hidden states (N, D) of the supervised positions of a batch, and their targets (N,)."""
    x, y, *mask = (t.to(device, non_blocking=True) for t in batch)
    h = model(x, hidden=True).flatten(0, 1)  # (B*T, D)
    y = y.flatten()
    if mask:
        keep = mask[0].flatten()
        return h[keep], y[keep]
    return h, y


@dataclass
class LMLoss:
    """Next-token cross entropy of a batch, summed over its supervised targets."""

    impl: str = "chunked"
    rows: int = 0

    def __call__(self, model: nn.Module, batch: Batch, device: torch.device, ctx: Any) -> Tensor:
        with ctx:
            h, y = lm_rows(model, batch, device)
            return head_loss(h, head_weight(model), CrossEntropy(y), self.impl, self.rows)


# ------------------------------------------------------------------------------------ one optimizer step
@dataclass
class StepEnv:
    """What an objective needs to run one optimizer step's micro-batches on this rank."""

    device: torch.device
    ctx: Any  # autocast (or a no-op)
    scale: float  # grad_factor / the step's global count: each micro-batch's sum is multiplied by it
    sync: Callable[[bool], contextlib.AbstractContextManager]  # sync(last micro-batch) around each backward
    backward: Callable[[Tensor], None]  # loss.backward(), through the GradScaler where there is one
    dist: Any = None  # train.distributed.Dist (gathers across ranks)


LossFn = Callable[[nn.Module, Batch, torch.device, Any], Tensor]


class TokenObjective:
    """The default step: per micro-batch, the summed loss times the step's scale, backpropagated."""

    def __init__(self, loss_fn: LossFn, counts: Callable[[Batch], tuple[int, int]] = lm_counts):
        self.loss_fn, self.count_fn = loss_fn, counts

    def counts(self, batch: Batch) -> tuple[int, int]:
        return self.count_fn(batch)

    def step(self, model: nn.Module, batches: list[Batch], env: StepEnv) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=env.device)
        for i, batch in enumerate(batches):
            with env.sync(i == len(batches) - 1):
                s = self.loss_fn(model, batch, env.device, env.ctx)
                env.backward(s * env.scale)
            total += s.detach().float()
        return total

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: list[Batch], device: torch.device, ctx: Any) -> float:
        """The token-weighted mean loss over batches (sum of sums / sum of counts)."""
        was = model.training
        model.eval()
        total, count = 0.0, 0
        try:
            for b in batches:
                total += float(self.loss_fn(model, b, device, ctx))
                count += self.count_fn(b)[0]
        finally:
            model.train(was)
        return total / max(count, 1)


@contextlib.contextmanager
def no_sync(_last: bool) -> Iterator[None]:
    yield
