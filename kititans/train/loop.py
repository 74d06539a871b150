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


def run_training(
    cfg: RunConfig,
    setup: TrainSetup,
    run_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    t = cfg.train
    device = resolve_device(t.device)
    dtype = resolve_dtype(t.dtype, device)
    use_compile = resolve_compile(t.compile, device, count_params(setup.model))
    threads = set_threads(t.threads) if device.type == "cpu" else 0
    model = setup.model.to(device)
    model.activation_checkpointing = t.activation_checkpointing
    model.train()
    opt = build_optimizer(model, setup.spec, cfg.optim)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    ctx = autocast_dtype(device, dtype)
    start = 0
    if resume:
        start = _restore(run_dir, model, opt, scaler)
    fwd = torch.compile(model) if use_compile else model
    n_params = count_params(model)
    log.info(
        "%s %s: %.2fM params on %s (%s, compile %s%s), optimizer %s, %d steps x %d tokens",
        setup.spec.name,
        cfg.preset,
        n_params / 1e6,
        device,
        str(dtype).removeprefix("torch."),
        "on" if use_compile else "off",
        f", {threads} threads" if threads else "",
        cfg.optim.name,
        t.steps,
        t.batch_size * t.seq_len * t.grad_accum,
    )
    metrics = _open_metrics(run_dir, start)
    eval_fn = setup.eval_fn or evaluate
    extra: dict[str, Any] = {}
    params = [p for p in model.parameters() if p.requires_grad]
    val_loss: float | None = None
    loss_val: float | None = None
    step, t0, tokens = start, time.perf_counter(), 0
    window = (t0, 0)  # tokens/s is reported over the last log interval
    bar = tqdm(
        total=t.steps, initial=start, desc="train", unit="step", disable=not progress, dynamic_ncols=True
    )
    if setup.eval_at_start and start == 0:
        val_loss = extra["initial_val_loss"] = eval_fn(model, setup.eval_batches, device, ctx)
        row0 = {"step": 0, "val_loss": round(val_loss, 6), "val_ppl": round(math.exp(min(val_loss, 50)), 4)}
        metrics.write(json.dumps(row0) + "\n")
        bar.write(f"step 0: val loss {val_loss:.4f}") if progress else None

    def save() -> None:
        save_train_state(
            run_dir,
            {"step": step, "optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler else None},
        )
        save_checkpoint(
            run_dir,
            model,
            setup.spec,
            setup.model_config,
            setup.tokenizer,
            extra={"run": cfg.to_dict(), "step": step, "val_loss": val_loss, **setup.extra_meta},
        )

    interrupted = False
    try:
        while step < t.steps:
            mult = lr_multiplier(
                step,
                t.steps,
                cfg.optim.warmup_steps,
                cfg.optim.schedule,
                cfg.optim.min_lr_ratio,
                cfg.optim.decay_fraction,
            )
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * mult
            loss_sum = torch.zeros((), device=device)
            step_tokens = 0
            for micro in range(t.grad_accum):
                batch = setup.train_batch(step, micro)
                step_tokens += batch[0].numel()  # SFT batches are padded to their longest example
                loss = batch_loss(fwd, batch, device, ctx) / t.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
                loss_sum += loss.detach()
            if scaler:
                for o in opt.optimizers:
                    scaler.unscale_(o)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip) if cfg.optim.grad_clip else None
            )
            if scaler:
                for o in opt.optimizers:
                    scaler.step(o)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens += step_tokens
            bar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                loss_val = loss_sum.item()
                if not math.isfinite(loss_val):
                    raise KititansError(
                        f"training diverged at step {step} (loss {loss_val}): lower the learning rate"
                    )
                now = time.perf_counter()
                tps = (tokens - window[1]) / max(now - window[0], 1e-9)
                window = (now, tokens)
                bar.set_postfix(
                    loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", lr=f"{opt.param_groups[0]['lr']:.2e}"
                )
                row = {
                    "step": step,
                    "loss": round(loss_val, 6),
                    "lr": opt.param_groups[0]["lr"],
                    "tokens_per_s": round(tps, 1),
                }
                if grad_norm is not None:
                    row["grad_norm"] = round(float(grad_norm), 4)
                metrics.write(json.dumps(row) + "\n")
            if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                val_loss = eval_fn(model, setup.eval_batches, device, ctx)
                metrics.write(
                    json.dumps(
                        {
                            "step": step,
                            "val_loss": round(val_loss, 6),
                            "val_ppl": round(math.exp(min(val_loss, 50)), 4),
                        }
                    )
                    + "\n"
                )
                bar.write(f"step {step}: val loss {val_loss:.4f}") if progress else None
            metrics.flush()
            if (t.save_every and step % t.save_every == 0) or step == t.steps:
                save()
            if on_step is not None:
                on_step(step, loss_sum.item())
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: saving step %d", step)
        if step > start:
            save()
    finally:
        bar.close()
        metrics.close()
    return TrainResult(
        run_dir,
        step,
        t.steps,
        loss_val,
        val_loss,
        tokens,
        time.perf_counter() - t0,
        interrupted,
        n_params,
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
