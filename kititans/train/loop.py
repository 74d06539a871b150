"""The training loop: get lr -> micro-steps -> clip -> step -> log -> eval -> checkpoint. Runs pretraining
(train/pretrain.py) and chat fine-tuning (train/sft.py), on one device or on every rank of a torchrun job
(train/distributed.py: DDP / FSDP2), with committed checkpoints (train/checkpoints.py), experiment tracking
(train/tracking.py) and a curves report at the end (train/report.py).

Batches: each optimizer step consumes `count` = grad_accum x world micro-batches; the micro-batch at global
index i (rank r runs i = micro * world + r) is `setup.train_batch(step, i, count)`, deterministic, so a step
trains on the same windows whatever the world size, and resuming is exact.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kititans.config import RunConfig
from kititans.data.tokenizer import Tokenizer
from kititans.device import is_out_of_memory, resolve_compile, resolve_device, resolve_dtype, set_threads
from kititans.errors import KititansError
from kititans.models.spec import FamilySpec, autocast_dtype, count_params, find_preset
from kititans.train import checkpoints as ckpts
from kititans.train import distributed as D
from kititans.train.feed import Prefetcher
from kititans.train.guard import catch_stop_signals, out_of_memory, resolve_activation_checkpointing
from kititans.train.loss import LMLoss, LossFn, StepEnv, TokenObjective, resolve_impl
from kititans.train.memory import PeakMemory
from kititans.train.metrics import Window, open_metrics, step_row, val_row
from kititans.train.mfu import flops_per_token, peak_flops
from kititans.train.optim import build_optimizer
from kititans.train.schedule import Schedule, resumed_schedule, schedule_for
from kititans.train.state import Snapshotter, restore_into
from kititans.train.tracking import Tracker, check_available, open_tracker

log = logging.getLogger("kititans")
Batch = tuple[torch.Tensor, ...]  # (x, y) or (x, y, loss_mask)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    total_steps: int
    train_loss: float | None
    val_loss: float | None
    tokens: int
    seconds: float
    interrupted: bool = False
    params: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass
class TrainSetup:
    """Everything the loop needs besides the config: the model, where batches come from, the tokenizer."""

    spec: FamilySpec
    model_config: Any
    model: torch.nn.Module
    tokenizer: Tokenizer
    train_batch: Callable[[int, int, int], Batch]  # (step, global micro index, micro-batches per step)
    eval_batches: list[Batch]
    extra_meta: dict[str, Any] = field(default_factory=dict)
    # SFT: a step-0 eval (the base model's val loss on the same split); an eval_fn returns the val loss or a
    # dict of metrics with a "loss" (default: the objective's token-weighted loss over eval_batches)
    eval_fn: Callable[[torch.nn.Module, list[Batch], torch.device, Any], Any] | None = None
    eval_at_start: bool = False
    # the summed loss of one micro-batch over its supervised tokens (default: next-token cross entropy through
    # the chunked head, train/loss.py), reduced by the step's global token count
    loss_fn: LossFn | None = None
    # or a whole step's objective (counts + forward/backward of the micro-batches), e.g. a contrastive loss
    # over the global batch
    objective: Any = None


def default_run_dir(cfg: RunConfig, prefix: str = "") -> Path:
    return Path("runs") / f"{prefix}{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def batch_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + micro)


def evaluate(model: torch.nn.Module, batches: list[Batch], device: torch.device, ctx: Any) -> float:
    """The token-weighted next-token loss of `model` over `batches` (x, y[, mask])."""
    return TokenObjective(LMLoss()).evaluate(model, batches, device, ctx)


def model_for_run(cfg: RunConfig, vocab_size: int) -> tuple[FamilySpec, Any, torch.nn.Module]:
    spec, preset = find_preset(cfg.preset, cfg.family)
    mcfg = spec.make_config(preset.name, {**cfg.model, "vocab_size": vocab_size})
    if cfg.train.seq_len > mcfg.context_length:
        raise KititansError(
            f"train.seq_len {cfg.train.seq_len} exceeds the model context {mcfg.context_length} "
            "(lower --set train.seq_len or raise --set model.context_length)"
        )
    torch.manual_seed(cfg.train.seed)
    return spec, mcfg, spec.build(mcfg)


def make_scaler(dtype: torch.dtype, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 training's loss scaler (its state is checkpointed: a resume keeps its scale)."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def resolve_accum(t: Any, world: int) -> int:
    """grad_accum for this world size: global_batch / (batch_size x world) when a global batch is fixed."""
    if not t.global_batch:
        return t.grad_accum
    per = t.batch_size * world
    if t.global_batch % per:
        raise KititansError(
            f"the global batch of {t.global_batch} sequences does not divide into micro-batches of "
            f"{t.batch_size} on {world} rank(s): use a --batch-size that divides {t.global_batch // world} "
            f"or a --global-batch that is a multiple of {per}"
        )
    return t.global_batch // per


class Trainer:
    """One training run over a TrainSetup: devices and ranks, precision, compile, optimizer, checkpoints."""

    def __init__(self, cfg: RunConfig, setup: TrainSetup, run_dir: Path, resume: bool, progress: bool):
        t = self.t = cfg.train
        self.cfg, self.setup, self.run_dir = cfg, setup, run_dir
        self.dist, device_name = D.init_distributed(t.device, t.dist_timeout)
        self.device = resolve_device(device_name)
        self.dtype = resolve_dtype(t.dtype, self.device)
        self.progress = progress and self.dist.main
        n_params = count_params(setup.model)
        self.parallel = D.choose_parallel(t.parallel, self.dist.world, n_params)
        self.accum = resolve_accum(t, self.dist.world)
        t.grad_accum, t.global_batch = self.accum, t.batch_size * self.accum * self.dist.world
        self.compiled = resolve_compile(t.compile, self.device, n_params)
        self.threads = (
            set_threads(t.threads or _cpu_share(self.dist.world)) if self.device.type == "cpu" else 0
        )
        if self.dist.main:
            check_available(t.log)
        # a resume: only rank 0 reads the tensors (weights, optimizer state) and broadcasts them once wrapped
        restored = ckpts.load_for_resume(run_dir, tensors=self.dist.main) if resume else None
        if restored is not None:
            import dataclasses

            ckpts.check_same_model(run_dir, dataclasses.asdict(setup.model_config))
            if self.dist.main:
                restore_into(setup.model, restored.weights, run_dir)
            if restored.rng is not None:
                ckpts.set_rng_state(restored.rng)
        self.model = setup.model.to(self.device)
        self.model.activation_checkpointing = resolve_activation_checkpointing(
            t.activation_checkpointing, n_params
        )
        self.model.train()
        self.wrapped = D.wrap(self.model, self.parallel, self.dist, self.device, self.dtype, setup.spec)
        self.grad_factor = D.grad_factor(self.parallel, self.dist.world)
        fused = self.device.type == "cuda" and self.parallel != "fsdp"
        self.opt = build_optimizer(self.model, setup.spec, cfg.optim, fused=fused)
        self.snap = Snapshotter(self.model, self.opt, self.parallel, self.dist, t.checkpoint_shards)
        self.start = self.step = 0
        self.updating = False  # inside clip + optimizer step: the parameters are half-updated
        self.tokens_seen, self.seconds_before = 0, 0.0
        self.scaler = make_scaler(self.dtype, self.device)
        self.schedule = self._schedule(restored)
        if restored is not None:
            self.snap.load_model(restored)
            self.snap.load_optimizer(restored, self.parallel)
            if self.scaler is not None and restored.state.get("grad_scaler"):
                self.scaler.load_state_dict(restored.state["grad_scaler"])
            self.start = self.step = restored.step
            self.tokens_seen = int(restored.state.get("tokens", 0))
            self.seconds_before = float(restored.state.get("seconds", 0.0))
            log.info("resuming %s from step %d", run_dir, restored.step)
        self.ctx = autocast_dtype(self.device, self.dtype)
        self.fwd = torch.compile(self.wrapped) if self.compiled else self.wrapped
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        impl = resolve_impl(t.loss_impl, self.device)
        self.objective = setup.objective or TokenObjective(setup.loss_fn or LMLoss(impl, t.loss_chunk))
        self.eval_objective = TokenObjective(LMLoss(impl, t.loss_chunk))
        self.eval_fn = setup.eval_fn or self.eval_objective.evaluate
        self.val_loss: float | None = None
        self.val_metrics: dict[str, Any] = {}
        self.stop_requested = False
        self.metrics = open_metrics(run_dir, self.start) if self.dist.main else None
        self.tracker: Tracker = (
            open_tracker(t.log, run_dir, cfg.to_dict(), resume) if self.dist.main else Tracker()
        )
        self.peak = peak_flops(self.device, self.dtype)
        self.flops_per_token = flops_per_token(self.model, setup.model_config, t.seq_len)
        self.memory = PeakMemory(self.device)
        self.resume_peak = self.memory.read() if restored is not None else None  # host/device peak so far
        self.row_extra: dict[str, Any] = {}  # added to the next logged row
        self.feed = Prefetcher(self._draw, self.device, t.steps, t.prefetch)

    def _draw(self, step: int) -> list[Batch]:
        """This rank's micro-batches of `step` (global index i = micro * world + rank)."""
        world, rank, count = self.dist.world, self.dist.rank, self.accum * self.dist.world
        return [self.setup.train_batch(step, m * world + rank, count) for m in range(self.accum)]

    def _schedule(self, restored: Any) -> Schedule:
        """The run's lr schedule: the saved one on a resume (train/schedule.py says when it may change)."""
        t = self.t
        wanted = schedule_for(self.cfg.optim, t.steps)
        saved = restored.state.get("schedule") if restored is not None else None
        schedule, note = resumed_schedule(
            Schedule.from_dict(saved) if saved else None,
            wanted,
            restored.step if restored is not None else 0,
            t.reset_schedule,
        )
        if note and self.dist.main:
            log.info("%s", note)
        t.reset_schedule = False  # a launch option: not part of the run config that checkpoints keep
        return schedule

    def describe(self) -> str:
        t, n = self.t, count_params(self.model)
        threads = f", {self.threads} threads" if self.threads else ""
        ranks = f" x {self.dist.world} ranks ({self.parallel})" if self.dist.enabled else ""
        return (
            f"{self.setup.spec.name} {self.cfg.preset}: {n / 1e6:.2f}M params on {self.device}{ranks} "
            f"({str(self.dtype).removeprefix('torch.')}, compile {'on' if self.compiled else 'off'}{threads}), "
            f"optimizer {self.cfg.optim.name}, {t.steps} steps x {t.global_batch * t.seq_len:,} tokens "
            f"({t.global_batch} sequences: {t.batch_size} per micro-batch x {self.accum} accumulation"
            f"{f' x {self.dist.world} ranks' if self.dist.enabled else ''})"
        )

    def optimizer_step(self) -> tuple[torch.Tensor, int, torch.Tensor | None, int]:
        """lr -> this rank's micro-batches -> forward/backward -> clip -> step. Returns (this rank's summed loss,
        the step's supervised count over all ranks, grad norm, non-padding tokens over all ranks)."""
        mult = self.schedule.multiplier(self.step)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * mult
        batches = self.feed.get(self.step)
        local = [sum(c) for c in zip(*(self.objective.counts(b) for b in batches))]
        supervised, tokens = self.dist.sum_ints(local, self.device)  # the step's one all-reduce of counts
        env = StepEnv(
            self.device,
            self.ctx,
            self.grad_factor / max(supervised, 1),
            lambda last: D.no_grad_sync(self.wrapped, self.parallel, sync=last),
            self._backward,
            self.dist,
        )
        loss_sum = self.objective.step(self.fwd, batches, env)
        self.updating = True
        if self.scaler:
            for opt in self.opt.optimizers:
                self.scaler.unscale_(opt)
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip) if clip else None
        if self.scaler:
            for opt in self.opt.optimizers:
                self.scaler.step(opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.updating = False
        return loss_sum, supervised, None if grad_norm is None else D.full_value(grad_norm), tokens

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def write(self, row: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(row) + "\n")
            self.tracker.log(row)

    def evaluate(self) -> float:
        """The val loss (the default eval: each rank evaluates its share of the batches, reduced once; a
        family's eval_fn: every rank evaluates all of them); rank 0 records it. An eval_fn returns the val
        loss, or a dict of metrics with a "loss" (e.g. retrieval@1 for an encoder)."""
        if self.setup.eval_fn is None and self.dist.enabled:
            out: Any = self._sharded_eval()
        else:
            out = self.eval_fn(self.model, self.setup.eval_batches, self.device, self.ctx)
        row, self.val_metrics = val_row(self.step, out)
        self.val_loss = float(self.val_metrics["loss"])
        self.write(row)
        return self.val_loss

    @torch.no_grad()
    def _sharded_eval(self) -> float:
        """Rank r evaluates batches r, r + world, ...: summed losses and supervised counts, all-reduced once.
        Every rank runs the same number of forwards (FSDP2 gathers parameters in lockstep): a rank short of
        batches runs its first one again and does not count it."""
        batches, world, rank = self.setup.eval_batches, self.dist.world, self.dist.rank
        mine = batches[rank::world]
        rounds = -(-len(batches) // world)
        obj, total, count = self.eval_objective, 0.0, 0
        was = self.model.training
        self.model.eval()
        try:
            for i in range(rounds):
                b = mine[i] if i < len(mine) else batches[0]
                loss = float(obj.loss_fn(self.model, b, self.device, self.ctx))
                if i < len(mine):
                    total, count = total + loss, count + obj.counts(b)[0]
        finally:
            self.model.train(was)
        summed = self.dist.sum(torch.tensor(total, dtype=torch.float32, device=self.device)).item()
        return summed / max(self.dist.sum_ints([count], self.device)[0], 1)

    def save(self, seconds: float) -> None:
        state = {
            "step": self.step,
            "tokens": self.tokens_seen,
            "seconds": round(self.seconds_before + seconds, 3),
            "val_loss": self.val_loss,
            "data": {"seed": self.t.seed, "global_batch": self.t.global_batch, "next_step": self.step},
            "world_size": self.dist.world,
            "parallel": self.parallel,
            "schedule": self.schedule.to_dict(),
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        self.saved_step = self.step
        snap = self.snap.take(self.step, state)  # a collective under FSDP2
        tmp = self._write_shards(snap) if self.t.checkpoint_shards else None
        if self.dist.main:
            extra = {
                "run": self.cfg.to_dict(),
                "step": self.step,
                "val_loss": self.val_loss,
                **self.setup.extra_meta,
            }
            ckpts.commit(self.run_dir, snap, self.setup, extra, self.t.keep, self.t.keep_best, tmp)
        self.dist.barrier()  # no rank runs ahead (or exits) before the checkpoint is committed

    def _write_shards(self, snap: ckpts.Snapshot) -> Path:
        """Every rank writes its optimizer shard into the step's hidden folder (rank 0 made it); rank 0
        commits once all have."""
        from kititans.train import sharded

        tmp = self.run_dir / ckpts.DIRNAME / f".{ckpts.step_name(snap.step)}.tmp-shards"
        if self.dist.main:
            ckpts.prepare(self.run_dir, snap.step, "shards")
        self.dist.barrier()
        try:
            snap.shards = sharded.write_shard(tmp, snap.optimizers, self.dist.rank, self.dist.world)
        except OSError as e:
            raise KititansError(
                f"could not write checkpoint shard in {tmp} ({e.strerror or e}): free disk space and resume; "
                "the previous checkpoint is intact"
            ) from None
        snap.optimizers = []
        self.dist.barrier()
        return tmp

    def close(self) -> None:
        self.feed.close()
        if self.metrics is not None:
            self.metrics.close()
        self.tracker.close()


def _cpu_share(world: int) -> int:
    import os

    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return max(1, (os.cpu_count() or 1) // max(local, 1))


def run_training(
    cfg: RunConfig,
    setup: TrainSetup,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    tr = Trainer(cfg, setup, run_dir, resume, progress)
    try:
        with D.collective("training") if tr.dist.enabled else contextlib.nullcontext():
            return _loop(tr, on_step)
    finally:
        tr.close()


def _loop(tr: Trainer, on_step: Callable[[int, float], None] | None) -> TrainResult:
    t = tr.t
    log.info("%s", tr.describe())
    extra: dict[str, Any] = {}
    loss_val: float | None = None
    w = Window()
    bar = tqdm(total=t.steps, initial=tr.start, desc="train", unit="step", disable=not tr.progress,
               dynamic_ncols=True)  # fmt: skip
    say = bar.write if tr.progress else (lambda _: None)
    if tr.resume_peak is not None:  # each rank's peak memory while resuming, in the first row after it
        peaks = tr.dist.gather_ints([tr.resume_peak], tr.device)
        tr.row_extra["resume_peak_mem_mb"] = [round(p / 2**20, 1) for p in peaks]
    if tr.setup.eval_at_start and tr.start == 0:
        extra["initial_val_loss"] = tr.evaluate()
        say(f"step 0: val loss {tr.val_loss:.4f}")
    tr.memory.reset()
    handlers = catch_stop_signals(tr)
    tr.saved_step = tr.start
    try:
        while tr.step < t.steps:
            loss, supervised, grad_norm, n = tr.optimizer_step()
            w.tokens += n
            tr.tokens_seen += n
            bar.update(1)
            step = tr.step
            if step % t.log_every == 0 or step == t.steps:
                row = step_row(tr, loss, supervised, grad_norm, w)
                loss_val = row["loss"]
                bar.set_postfix(
                    loss=f"{loss_val:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}", lr=f"{row['lr']:.2e}"
                )
            if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                say(f"step {step}: val loss {tr.evaluate():.4f}")
            if tr.metrics is not None:
                tr.metrics.flush()
            # the ranks agree on a stop every stop_check_every steps (one all-reduce), and at the last step
            check = not tr.dist.enabled or step % t.stop_check_every == 0 or step == t.steps
            stop = tr.dist.any(tr.stop_requested, tr.device) if check else False
            if (t.save_every and step % t.save_every == 0) or step == t.steps or stop:
                tr.save(time.perf_counter() - w.t0)
            if on_step is not None:
                on_step(step, loss.item() / max(supervised, 1))
            if stop:
                log.warning("stopped at step %d on a signal; continue with: kititans train --resume %s",
                            step, tr.run_dir)  # fmt: skip
                break
    except (RuntimeError, torch.OutOfMemoryError) as e:
        if not is_out_of_memory(e):
            raise
        out_of_memory(tr, time.perf_counter() - w.t0)
    finally:
        bar.close()
        for sig, old in handlers.items():
            signal.signal(sig, old)
    interrupted = tr.step < t.steps
    if tr.dist.main and t.report and not interrupted:
        _write_report(tr.run_dir)
    extra["val_metrics"] = tr.val_metrics
    return TrainResult(tr.run_dir, tr.step, t.steps, loss_val, tr.val_loss, w.tokens,
                       time.perf_counter() - w.t0, interrupted, count_params(tr.model), extra)  # fmt: skip


def _write_report(run_dir: Path) -> None:
    from kititans.train.report import write_report

    try:
        paths = write_report(run_dir)
        log.info("training curves: %s", paths["html"])
    except KititansError as e:  # matplotlib missing: the run itself succeeded
        log.info("no training report (%s)", e)
