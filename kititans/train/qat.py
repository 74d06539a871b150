"""`kititans qat`: quantization-aware fine-tuning of a trained run into a NEW run directory (the base is only
read). The model trains with its weights fake-quantized exactly as the target export stores them
(kititans/quantize/qat.py), on windows of the base run's own token data, for ~10% of its pretraining steps
(ParetoQ: ~10% of the budget in QAT is near-optimal), by default distilling the float base model's
next-token distribution (--loss ce: the data's next tokens). The run keeps the latent float weights; exporting it at
its target gives the trained quantized values (tests/train/test_qat.py checks each format). The loop itself
is kititans.train.loop.run_training.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kititans.checkpoint import load_checkpoint, read_meta
from kititans.config import RunConfig, apply_overrides, flatten
from kititans.errors import KititansError
from kititans.models.spec import autocast_dtype
from kititans.quantize import qat as Q
from kititans.train import loss as L
from kititans.train.loop import TrainResult, TrainSetup, evaluate, run_training
from kititans.train.metrics import initial_val_loss
from kititans.train.pretrain import StepWindows

log = logging.getLogger("kititans")

DEFAULT_FRACTION = 0.1  # of the base run's optimizer steps
LR_SCALE = 0.01  # QAT peaks at the base's peak lr x this: Adam moves each weight ~lr per step, so lr must
# stay well under a quantization step (debug run, q4_0, 30 steps: x0.1 raised the KL to float by 23%, x0.01 cut it 72%)
MIN_STEPS = 10
DEFAULT_REFRESH = (
    8  # q4_k_m's scale search costs ~20x a q4_0 rounding; between searches the scales are reused
)


@dataclass
class QatSpec:
    """What `kititans qat` was asked for, besides the RunConfig."""

    base: Path
    target: Q.Target
    out: Path
    data: Path | None = None  # the token data; default: the one the base run was trained on
    steps: int | None = None  # default: fraction x the base run's steps
    fraction: float = DEFAULT_FRACTION
    refresh: int = DEFAULT_REFRESH  # K-quant targets: search the sub-block scales every N steps
    loss: str = "distill"  # distill: match the float base model's next-token distribution; ce: the data


def default_out(base: str | Path, target: Q.Target) -> Path:
    """RUN-qat-q4_0 for a GGUF level (their names are unique), RUN-qat-onnx-int4 for the others."""
    base = Path(base)
    tag = target.level if target.format == "gguf" else f"{target.format}-{target.level}"
    return base.with_name(f"{base.name}-qat-{tag}")


def base_steps(meta: dict[str, Any]) -> int:
    run = meta.get("run") if isinstance(meta.get("run"), dict) else {}
    return int(meta.get("step") or (run.get("train") or {}).get("steps") or 0)


def qat_steps(meta: dict[str, Any], steps: int | None, fraction: float) -> int:
    if steps is not None:
        if steps < 1:
            raise KititansError(f"--steps must be >= 1, got {steps}")
        return steps
    if not 0 < fraction <= 1:
        raise KititansError(f"--fraction must be in (0, 1], got {fraction}")
    return max(MIN_STEPS, math.ceil(fraction * base_steps(meta)))


def full_context_windows(meta: dict[str, Any], cfg: RunConfig) -> list[tuple[str, int]]:
    """Windows of the model's whole context, with as many tokens per step as the base run took: the float
    model is matched at every position a user (and the bench, whose chunks span the context) runs it at.
    A base trained on shorter windows is least sure, and its quantized copy drifts most, on the positions
    it never trained (tiny, trained on 256 of 512: KLD 0.0074 at positions 256-511 against 0.0009 below)."""
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    context = int(model.get("context_length") or 0)
    t = cfg.train
    if context <= t.seq_len:
        return []
    return [("train.seq_len", context), ("train.batch_size", max(1, t.batch_size * t.seq_len // context))]


def qat_config(spec: QatSpec, layers: list[tuple[str, Any]]) -> RunConfig:
    """The base run's config < QAT defaults (lr x 0.01, short warmup, compile off, windows of the model's
    whole context at the base's tokens per step) < `layers` (recipe, --set, flags)."""
    meta = read_meta(spec.base)
    cfg = RunConfig(family=meta["family"])
    if isinstance(meta.get("run"), dict):
        apply_overrides(cfg, flatten(meta["run"]), source="base run")
    steps = qat_steps(meta, spec.steps, spec.fraction)
    defaults = [
        *full_context_windows(meta, cfg),
        ("optim.lr", cfg.optim.lr * LR_SCALE),
        ("optim.muon_lr", cfg.optim.muon_lr * LR_SCALE),
        ("optim.schedule", "cosine"),
        ("optim.warmup_steps", min(20, max(1, steps // 10))),
        ("train.steps", steps),
        ("train.eval_every", max(1, steps // 4)),
        ("train.save_every", max(1, steps // 2)),
        ("train.log_every", max(1, min(10, steps // 10))),
        ("train.compile", "off"),  # the fake-quant kernels are eager PyTorch
        ("train.report", False),
        ("out", str(spec.out)),
    ]
    return apply_overrides(cfg, [*defaults, *layers])


LOSSES = ("distill", "ce")


class DistillLoss:
    """KL(float base || fake-quantized student) per token, the base frozen: the quantized model learns to
    predict what the float model predicts, which is what the bench's KLD and drift measure against, instead
    of drifting with more training on the data (a base that is still learning would otherwise pull it
    away from the reference)."""

    def __init__(self, teacher: torch.nn.Module, rows: int = 0):
        self.teacher = teacher.eval().requires_grad_(False)
        self.rows = rows

    def __call__(self, model: torch.nn.Module, batch: tuple, device: torch.device, ctx: Any) -> torch.Tensor:
        """The KL summed over the batch's tokens (the loop divides by the step's token count), teacher and
        student logits made chunk by chunk (train/loss.py), never the whole (B, T, V) in fp32."""
        x = batch[0].to(device, non_blocking=True)
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad(), ctx:
            teacher = L.HeadLogits(self.teacher(x, hidden=True).flatten(0, 1), L.head_weight(self.teacher))
        with ctx:
            h = model(x, hidden=True).flatten(0, 1)  # (B*T, D)
            return L.linear_loss(h, L.head_weight(model), L.Distill(teacher), self.rows)


def find_data(base: Path, given: Path | None) -> Path:
    """The token data to fine-tune on: --data, else the shards the base run was trained on."""
    from kititans.data.shards import is_shards_dir
    from kititans.quantize.imatrix import run_shards

    if given is not None:
        if not is_shards_dir(given):
            raise KititansError(
                f"--data {given}: not a prepared token data folder (make one with `kititans data FILES --out DIR "
                f"--tokenizer {base}`)"
            )
        return given
    found = run_shards(base)
    if found is None:
        named = read_meta(base).get("data") or "none recorded"
        raise KititansError(
            f"{base}: its training data ({named}) is gone; pass --data DIR (token data made with this run's "
            f"tokenizer: kititans data FILES --tokenizer {base} --out DIR)"
        )
    return found


def base_seconds(base: Path) -> float | None:
    """The base run's training time from its metrics (the last logged `time`)."""
    path = base / "metrics.jsonl"
    if not path.is_file():
        return None
    seconds = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        seconds = row.get("time", seconds)
    return float(seconds) if seconds is not None else None


def prepared_model(base: Path, target: Q.Target, device: str = "cpu") -> tuple[Any, Q.Plan]:
    """The base checkpoint and the plan of its target, before fake quantization is switched on."""
    ckpt = load_checkpoint(base)
    plan = Q.make_plan(ckpt.model, ckpt.spec, target)
    Q.check_shapes(ckpt.model, plan)
    return ckpt, plan


def qat(
    spec: QatSpec,
    cfg: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Fine-tune spec.base with the target's fake quantization into spec.out; resumable."""
    base, out = Path(spec.base), Path(spec.out)
    if out.resolve() == base.resolve():
        raise KititansError(
            f"--out {out} is the base run: QAT writes a new run directory (choose another --out)"
        )
    if not resume and (out / "config.json").exists():
        raise KititansError(
            f"{out} already holds a run: pass --resume to continue it, or choose another --out"
        )
    meta = read_meta(base)
    ckpt, plan = prepared_model(base, spec.target)
    data_dir = find_data(base, spec.data)
    from kititans.data.tokendata import TokenData

    data = TokenData(data_dir)
    data.check_tokenizer(ckpt.tokenizer)
    t = cfg.train
    if t.seq_len > ckpt.config.context_length:
        raise KititansError(
            f"train.seq_len {t.seq_len} exceeds the model context {ckpt.config.context_length} (lower --seq-len)"
        )
    eval_batches = data.eval_batches(t.eval_batches, t.batch_size, t.seq_len)
    float_val = evaluate(
        ckpt.model, eval_batches, torch.device("cpu"), autocast_dtype(torch.device("cpu"), torch.float32)
    )
    if spec.refresh < 1:
        raise KititansError(f"--refresh must be >= 1, got {spec.refresh}")
    if spec.loss not in LOSSES:
        raise KititansError(f"--loss must be one of {', '.join(LOSSES)}; got {spec.loss!r}")
    teacher = copy.deepcopy(ckpt.model) if spec.loss == "distill" else None
    Q.prepare(ckpt.model, plan, refresh=spec.refresh)
    seconds = base_seconds(base)
    setup = TrainSetup(
        spec=ckpt.spec,
        model_config=ckpt.config,
        model=ckpt.model,
        tokenizer=ckpt.tokenizer,
        train_batch=StepWindows(
            data, t.batch_size, t.seq_len, t.seed + 1
        ),  # other windows than pretraining's
        eval_batches=eval_batches,
        extra_meta={
            "stage": meta.get("stage", "pretrain"),
            "data": str(data_dir),
            "base_run": {"path": str(base), "step": meta.get("step"), "val_loss": meta.get("val_loss")},
            "qat": {
                "target": spec.target.name,
                "format": spec.target.format,
                "level": spec.target.level,
                "base_steps": base_steps(meta),
                "base_seconds": seconds,
                "float_val_loss": float_val,
                "refresh": spec.refresh,
                "loss": spec.loss,
                "plan": plan.to_dict(),
            },
        },
        eval_at_start=True,  # step 0 = the base model quantized after training (PTQ) on the same windows
        loss_fn=DistillLoss(teacher, t.loss_chunk) if teacher is not None else None,
    )
    torch.manual_seed(t.seed)
    result = run_training(cfg, setup, out, resume=resume, progress=progress, on_step=on_step)
    result.extra.update(
        float_val_loss=float_val,
        ptq_val_loss=result.extra.get("initial_val_loss", initial_val_loss(out)),
        base_seconds=seconds,
        target=spec.target.name,
        plan=plan.to_dict(),
    )
    return result


def resume_spec(run_dir: Path, layers: list[tuple[str, Any]]) -> tuple[QatSpec, RunConfig]:
    """The saved spec and config of a QAT run, with `layers` on top (e.g. more --steps)."""
    meta = read_meta(run_dir)
    q = meta.get("qat")
    if not isinstance(q, dict) or not isinstance(meta.get("run"), dict):
        raise KititansError(f"{run_dir} is not a QAT run (no saved qat section to resume)")
    spec = QatSpec(
        base=Path(meta["base_run"]["path"]),
        target=Q.parse_target(q["target"]),
        out=run_dir,
        data=Path(meta["data"]),
        refresh=int(q.get("refresh", DEFAULT_REFRESH)),
        loss=str(q.get("loss", "distill")),
    )
    cfg = apply_overrides(RunConfig(), [*flatten(meta["run"]), ("out", str(run_dir)), *layers])
    return spec, cfg
