"""The training loop: get lr -> micro-steps -> clip -> step -> log -> eval -> save. Runs pretraining (here)
and chat fine-tuning (train/sft.py feeds it a different batch source)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kititans.checkpoint import load_checkpoint, load_train_state, save_checkpoint, save_train_state, unwrap
from kititans.config import RunConfig
from kititans.data.tokenizer import Tokenizer
from kititans.errors import KititansError
from kititans.models.spec import FamilySpec, autocast_dtype, count_params, find_preset
from kititans.train.device import resolve_compile, resolve_device, resolve_dtype, set_threads
from kititans.train.optim import CombinedOptimizer, build_optimizer
from kititans.train.schedule import lr_multiplier

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
    train_batch: Callable[[int, int], Batch]  # (step, micro) -> batch, deterministic
    eval_batches: list[Batch]
    extra_meta: dict[str, Any] = field(default_factory=dict)
    # SFT: a token-weighted masked eval, and a step-0 eval (the base model's val loss on the same split)
    eval_fn: Callable[[torch.nn.Module, list[Batch], torch.device, Any], float] | None = None
    eval_at_start: bool = False


def default_run_dir(cfg: RunConfig, prefix: str = "") -> Path:
    return Path("runs") / f"{prefix}{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def batch_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + micro)


def batch_loss(model: torch.nn.Module, batch: Batch, device: torch.device, ctx: Any) -> torch.Tensor:
    from kititans.models.lite import lm_loss

    x, y, *mask = (t.to(device, non_blocking=True) for t in batch)
    with ctx:
        return lm_loss(model(x), y, mask[0] if mask else None)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[Batch], device: torch.device, ctx: Any) -> float:
    was_training = model.training
    model.eval()
    losses = [batch_loss(model, b, device, ctx).item() for b in batches]
    model.train(was_training)
    return sum(losses) / max(len(losses), 1)


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


class Trainer:
    """One training run over a TrainSetup: device/precision/compile, optimizer, metrics, checkpoints."""

    def __init__(self, cfg: RunConfig, setup: TrainSetup, run_dir: Path, resume: bool, progress: bool):
        t = self.t = cfg.train
        self.cfg, self.setup, self.run_dir, self.progress = cfg, setup, run_dir, progress
        self.device = resolve_device(t.device)
        self.dtype = resolve_dtype(t.dtype, self.device)
        self.compiled = resolve_compile(t.compile, self.device, count_params(setup.model))
        self.threads = set_threads(t.threads) if self.device.type == "cpu" else 0
        self.model = setup.model.to(self.device)
        self.model.activation_checkpointing = t.activation_checkpointing
        self.model.train()
        self.opt = build_optimizer(self.model, setup.spec, cfg.optim)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.ctx = autocast_dtype(self.device, self.dtype)
        self.start = self.step = _restore(run_dir, self.model, self.opt, self.scaler) if resume else 0
        self.fwd = torch.compile(self.model) if self.compiled else self.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.eval_fn = setup.eval_fn or evaluate
        self.val_loss: float | None = None
        self.metrics = _open_metrics(run_dir, self.start)

    def describe(self) -> str:
        t, n = self.t, count_params(self.model)
        threads = f", {self.threads} threads" if self.threads else ""
        return (
            f"{self.setup.spec.name} {self.cfg.preset}: {n / 1e6:.2f}M params on {self.device} "
            f"({str(self.dtype).removeprefix('torch.')}, compile {'on' if self.compiled else 'off'}{threads}), "
            f"optimizer {self.cfg.optim.name}, {t.steps} steps x {t.batch_size * t.seq_len * t.grad_accum} tokens"
        )

    def optimizer_step(self) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """lr -> micro-batches -> clip -> step; returns (loss, grad norm, tokens)."""
        o, t = self.cfg.optim, self.t
        mult = lr_multiplier(self.step, t.steps, o.warmup_steps, o.schedule, o.min_lr_ratio, o.decay_fraction)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * mult
        loss_sum, tokens = torch.zeros((), device=self.device), 0
        for micro in range(t.grad_accum):
            batch = self.setup.train_batch(self.step, micro)
            tokens += batch[0].numel()  # SFT batches are padded to their longest example
            loss = batch_loss(self.fwd, batch, self.device, self.ctx) / t.grad_accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += loss.detach()
        if self.scaler:
            for opt in self.opt.optimizers:
                self.scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, o.grad_clip) if o.grad_clip else None
        if self.scaler:
            for opt in self.opt.optimizers:
                self.scaler.step(opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return loss_sum, grad_norm, tokens

    def write(self, row: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(row) + "\n")

    def evaluate(self) -> float:
        self.val_loss = self.eval_fn(self.model, self.setup.eval_batches, self.device, self.ctx)
        ppl = math.exp(min(self.val_loss, 50))
        self.write({"step": self.step, "val_loss": round(self.val_loss, 6), "val_ppl": round(ppl, 4)})
        return self.val_loss

    def save(self) -> None:
        state = {
            "step": self.step,
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }
        save_train_state(self.run_dir, state)
        extra = {
            "run": self.cfg.to_dict(),
            "step": self.step,
            "val_loss": self.val_loss,
            **self.setup.extra_meta,
        }
        save_checkpoint(
            self.run_dir,
            self.model,
            self.setup.spec,
            self.setup.model_config,
            self.setup.tokenizer,
            extra=extra,
        )


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
    t = cfg.train
    log.info("%s", tr.describe())
    extra: dict[str, Any] = {}
    loss_val: float | None = None
    t0 = time.perf_counter()
    tokens, window = 0, (t0, 0)  # tokens/s is reported over the last log interval
    bar = tqdm(
        total=t.steps, initial=tr.start, desc="train", unit="step", disable=not progress, dynamic_ncols=True
    )
    say = bar.write if progress else (lambda _: None)
    if setup.eval_at_start and tr.start == 0:
        extra["initial_val_loss"] = tr.evaluate()
        say(f"step 0: val loss {tr.val_loss:.4f}")
    interrupted = False
    try:
        while tr.step < t.steps:
            loss, grad_norm, n = tr.optimizer_step()
            tokens += n
            bar.update(1)
            step = tr.step
            if step % t.log_every == 0 or step == t.steps:
                loss_val = loss.item()
                if not math.isfinite(loss_val):
                    raise KititansError(
                        f"training diverged at step {step} (loss {loss_val}): lower the learning rate"
                    )
                now = time.perf_counter()
                tps, window = (tokens - window[1]) / max(now - window[0], 1e-9), (now, tokens)
                lr = tr.opt.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", lr=f"{lr:.2e}")
                row = {"step": step, "loss": round(loss_val, 6), "lr": lr, "tokens_per_s": round(tps, 1)}
                if grad_norm is not None:
                    row["grad_norm"] = round(float(grad_norm), 4)
                tr.write(row)
            if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                say(f"step {step}: val loss {tr.evaluate():.4f}")
            tr.metrics.flush()
            if (t.save_every and step % t.save_every == 0) or step == t.steps:
                tr.save()
            if on_step is not None:
                on_step(step, loss.item())
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: saving step %d", tr.step)
        if tr.step > tr.start:
            tr.save()
    finally:
        bar.close()
        tr.metrics.close()
    seconds = time.perf_counter() - t0
    return TrainResult(
        run_dir,
        tr.step,
        t.steps,
        loss_val,
        tr.val_loss,
        tokens,
        seconds,
        interrupted,
        count_params(tr.model),
        extra,
    )


def _open_metrics(run_dir: Path, start: int) -> Any:
    """metrics.jsonl, with lines past the resumed step dropped (they belong to the lost part of the run)."""
    path = run_dir / "metrics.jsonl"
    run_dir.mkdir(parents=True, exist_ok=True)
    if start and path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
        path.write_text("".join(ln + "\n" for ln in keep))
    elif path.is_file():
        path.unlink()
    return open(path, "a", encoding="utf-8")


def _restore(run_dir: Path, model: torch.nn.Module, opt: CombinedOptimizer, scaler: Any) -> int:
    state = load_train_state(run_dir)
    ckpt = load_checkpoint(run_dir)
    if ckpt.meta.get("step") != state["step"]:
        raise KititansError(
            f"{run_dir}: weights (step {ckpt.meta.get('step')}) and train_state (step {state['step']}) differ: "
            "the last save was interrupted; the run cannot be resumed exactly"
        )
    unwrap(model).load_state_dict(ckpt.model.state_dict())
    try:
        opt.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as e:
        raise KititansError(
            f"{run_dir}: optimizer state does not fit (was the optimizer changed?): {e}"
        ) from None
    if scaler and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    log.info("resuming %s from step %d", run_dir, state["step"])
    return int(state["step"])
