"""`kititans distill RUN --teacher T` (logit distillation from a KiTitans run with the same tokenizer) and
`kititans distill RUN --teacher-scores DIR` (from stored teacher top-k log-probs), through the one training loop
(kititans.train.loop.run_training: several devices, exact resume, tracking).

Per token:  loss = (1 - a) x CE(student, next token) + a x T^2 x KL(teacher_T || student_T)
where _T is softmax(logits / T). With stored scores the teacher is its top-k log-probs plus the mass of the
rest, and the KL is over those k + 1 buckets (T must be 1: the rest cannot be re-tempered).

Memory: the loss walks the (B*T, V) logits in row chunks; each chunk's fp32 log-softmaxes (student, teacher)
and its gradient are computed there, so no full-vocabulary fp32 log-softmax exists at any time, only the
model-dtype logits of student and teacher and their gradient. When train/loss.py's chunked losses over hidden
states land, `kd_loss` is the one function to move onto them (the logits then never exist in full).

The teacher is frozen (eval, no grad), in bf16/fp16 on GPUs (--teacher-dtype; fp32 on CPUs, where bf16 is
emulated and slower), on the student's device or its own
(--teacher-device). A teacher with another tokenizer is refused: its token ids mean other things.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kititans.checkpoint import load_checkpoint, read_meta
from kititans.config import RunConfig, apply_overrides, flatten
from kititans.errors import KititansError
from kititans.files import sha256_file
from kititans.train.loop import Batch, TrainResult, TrainSetup, run_training

log = logging.getLogger("kititans")
CHUNK_ELEMENTS = 1 << 22  # fp32 elements per chunk tensor (16 MB): rows = CHUNK_ELEMENTS // vocab


# ------------------------------------------------------------------------------------------------ loss
@dataclass
class TopK:
    """Sparse teacher rows: ids (N, k) (-1 = none), log-probs (N, k), log of the rest mass (N,)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    rest: torch.Tensor


def _chunk_loss(
    s: torch.Tensor, y: torch.Tensor, w: torch.Tensor, teacher: Any, alpha: float, temp: float
) -> torch.Tensor:
    """sum_i w_i [(1-a) CE_i + a T^2 KL_i] over one chunk; s: (c, V) fp32 student logits."""
    logp = F.log_softmax(s, dim=-1)  # (c, V)
    loss = (1 - alpha) * -logp.gather(1, y[:, None]).squeeze(1)  # (c,)
    if alpha > 0 and isinstance(teacher, TopK):
        valid = teacher.ids >= 0  # (c, k)
        q = logp.gather(1, teacher.ids.clamp(min=0))  # (c, k) student log-probs of the teacher's top k
        p = torch.where(valid, teacher.logprobs.exp(), 0.0)
        q_rest = torch.log1p(-torch.where(valid, q.exp(), 0.0).sum(1).clamp(max=1 - 1e-6))  # (c,)
        kl = (p * (torch.where(valid, teacher.logprobs, 0.0) - q)).sum(1)
        kl = kl + teacher.rest.exp() * (teacher.rest - q_rest)
        loss = loss + alpha * kl
    elif alpha > 0 and teacher is not None:
        ps = F.log_softmax(s / temp, dim=-1) if temp != 1 else logp
        pt = F.log_softmax(teacher.float() / temp, dim=-1)  # (c, V)
        loss = loss + alpha * temp**2 * (pt.exp() * (pt - ps)).sum(1)
    return (loss * w).sum()


def _rows(teacher: Any, a: int, b: int) -> Any:
    if teacher is None:
        return None
    if isinstance(teacher, TopK):
        return TopK(teacher.ids[a:b], teacher.logprobs[a:b].float(), teacher.rest[a:b].float())
    return teacher[a:b]


class _ChunkedKD(torch.autograd.Function):
    """The loss and its gradient w.r.t. the student logits, chunk by chunk in the forward pass."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                teacher: Any, alpha: float, temp: float, rows: int) -> torch.Tensor:  # fmt: skip
        grad = torch.empty_like(logits)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for a in range(0, logits.shape[0], rows):
            b = min(a + rows, logits.shape[0])
            with torch.enable_grad():
                s = logits[a:b].detach().float().requires_grad_(True)  # (c, V)
                part = _chunk_loss(s, targets[a:b], weights[a:b], _rows(teacher, a, b), alpha, temp)
                (g,) = torch.autograd.grad(part, s)
            grad[a:b] = g.to(grad.dtype)
            total += part.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, out: torch.Tensor) -> tuple:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * out.to(grad.dtype), None, None, None, None, None, None


def kd_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    teacher: torch.Tensor | TopK | None = None,
    alpha: float = 0.0,
    temperature: float = 1.0,
    rows: int | None = None,
) -> torch.Tensor:
    """Mean over the counted positions of (1-a) CE + a T^2 KL; logits (B, T, V), targets/mask (B, T),
    teacher: logits (B, T, V) or TopK rows (B, T, k) (flattened alike). alpha 0 ignores the teacher."""
    v = logits.shape[-1]
    flat = logits.reshape(-1, v)
    w = torch.ones(flat.shape[0], device=flat.device) if mask is None else mask.reshape(-1).float()
    w = w / w.sum().clamp(min=1)
    if isinstance(teacher, TopK):
        teacher = TopK(
            *(t.reshape(flat.shape[0], *t.shape[2:]) for t in (teacher.ids, teacher.logprobs, teacher.rest))
        )
    elif teacher is not None:
        teacher = teacher.reshape(-1, v)
    rows = rows or max(1, CHUNK_ELEMENTS // v)
    return _ChunkedKD.apply(
        flat, targets.reshape(-1), w, teacher if alpha > 0 else None, alpha, temperature, rows
    )


class DistillLoss:
    """TrainSetup.loss_fn: the student's logits against the frozen teacher's (or the batch's stored rows)."""

    def __init__(self, teacher: torch.nn.Module | None, alpha: float, temperature: float, device: str | None):
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        self.device = torch.device(device) if device else None

    def __call__(self, model: torch.nn.Module, batch: Batch, device: torch.device, ctx: Any) -> torch.Tensor:
        x, y, *extra = (t.to(device, non_blocking=True) for t in batch)
        mask = extra[0] if extra else None
        teacher: Any = None
        if len(extra) == 4:  # stored scores: (mask, topk_ids, topk_logprobs, rest)
            teacher = TopK(extra[1], extra[2], extra[3])
        elif self.teacher is not None and self.alpha > 0:
            tdev = self.device or device
            if next(self.teacher.parameters()).device != tdev:
                self.teacher.to(tdev)
            with torch.no_grad():
                teacher = self.teacher(x.to(tdev)).to(device)  # (B, T, V) in the teacher's dtype
        with ctx:
            logits = model(x)  # (B, T, V)
        return kd_loss(logits, y, mask, teacher, self.alpha, self.temperature)


# ------------------------------------------------------------------------------------------------ runs
TEACHER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class DistillSpec:
    """What `kititans distill RUN` was asked for, besides the RunConfig (saved in the run for --resume)."""

    student: Path  # an existing run (read only) or, with `fresh`, the new run's directory
    out: Path
    teacher: Path | None = None
    scores: Path | None = None
    alpha: float = 0.5
    temperature: float = 1.0
    teacher_dtype: str = "auto"  # auto: bf16 on CUDA (fp16 without bf16, and on MPS), fp32 on CPU
    teacher_device: str | None = None  # default: the student's device
    fresh: bool = False  # a new student from --preset, trained from scratch
    chat: list[str] = field(default_factory=list)  # chat files: SFT data (else pretraining data)
    tokenizer: Path | None = None  # a new student's tokenizer when there is no --teacher run

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillSpec:
        paths = {"student", "out", "teacher", "scores", "tokenizer"}
        return cls(**{k: (Path(v) if k in paths and v is not None else v) for k, v in d.items()})


def tokenizer_sha(run: Path) -> str:
    from kititans.data.tokenizer import Tokenizer

    return sha256_file(Tokenizer.load(run).model_path)


def check_spec(spec: DistillSpec) -> None:
    if (spec.teacher is None) == (spec.scores is None):
        raise KititansError("give one teacher: --teacher RUN (a KiTitans run) or --teacher-scores DIR")
    if not 0 <= spec.alpha <= 1:
        raise KititansError(f"--alpha must be in [0, 1], got {spec.alpha}")
    if spec.temperature <= 0:
        raise KititansError(f"--temperature must be > 0, got {spec.temperature}")
    if spec.scores is not None and spec.temperature != 1:
        raise KititansError(
            "--temperature must be 1 with --teacher-scores (stored top-k log-probs cannot be re-tempered)"
        )
    if spec.scores is not None and spec.chat:
        raise KititansError("--teacher-scores carries its own conversations: drop --chat")
    if spec.teacher_dtype not in ("auto", *TEACHER_DTYPES):
        raise KititansError(f"--teacher-dtype must be auto, bf16, fp16 or fp32, got {spec.teacher_dtype!r}")
    if spec.out.resolve() == (spec.teacher or spec.out.with_name("-")).resolve():
        raise KititansError(f"--out {spec.out} is the teacher run: choose another --out")


def same_tokenizer(student_tok: Path, teacher: Path) -> None:
    a, b = tokenizer_sha(student_tok), tokenizer_sha(teacher)
    if a != b:
        raise KititansError(
            f"{teacher} uses another tokenizer than the student (sha256 {b[:12]} vs {a[:12]}): logit "
            "distillation needs one vocabulary; for this teacher use sequence-level distillation "
            f"(`kititans serve {teacher}`, `kititans distill gen --teacher URL ...`, then `kititans sft`)"
        )


def distill_config(spec: DistillSpec, layers: list[tuple[str, Any]], preset_hints: Any = None) -> RunConfig:
    """fresh: the preset's defaults with the teacher's tokenizer < layers; a student run: its config (SFT
    defaults for chat data or scores) < layers."""
    from kititans.config import resolve_run_config
    from kititans.train.sft import sft_config

    if spec.fresh:
        tok = spec.teacher or spec.tokenizer
        if tok is None:
            raise KititansError(
                "a new student trained on --teacher-scores needs the tokenizer the scores were made with: "
                "pass --tokenizer RUN, or start from an existing student run"
            )
        return resolve_run_config(
            [("tokenizer.path", str(tok)), *layers, ("out", str(spec.out))], preset_hints
        )
    if spec.chat or spec.scores is not None:
        return sft_config(spec.student, [*layers, ("out", str(spec.out))])
    meta = read_meta(spec.student)
    cfg = RunConfig(family=meta["family"])
    if isinstance(meta.get("run"), dict):
        apply_overrides(cfg, flatten(meta["run"]), source="student run")
    return apply_overrides(cfg, [*layers, ("out", str(spec.out))])


def load_teacher(spec: DistillSpec, device: torch.device) -> torch.nn.Module:
    ckpt = load_checkpoint(spec.teacher)
    name = spec.teacher_dtype
    tdev = torch.device(spec.teacher_device or device)
    if name == "auto":  # CPUs without bf16 units emulate it: 3x slower than fp32 (benchmarks/distill_step.py)
        cuda_bf16 = tdev.type == "cuda" and torch.cuda.is_bf16_supported()
        name = "bf16" if cuda_bf16 else "fp16" if tdev.type in ("cuda", "mps") else "fp32"
    model = ckpt.model.eval().requires_grad_(False)
    return model.to(device=tdev, dtype=TEACHER_DTYPES[name])


def _pretrain_data(spec: DistillSpec, cfg: RunConfig, tok: Any, out: Path) -> tuple[Any, Path]:
    """Token data: --data (shards or raw sources, tokenized with the student's tokenizer into OUT/data),
    else the student run's own shards, else (a new student) the built-in corpus."""
    from kititans.data.prepare import prepare_data
    from kititans.quantize.imatrix import run_shards

    if not cfg.data.sources and not cfg.data.dataset and not spec.fresh:
        found = run_shards(spec.student)
        if found is None:
            raise KititansError(
                f"{spec.student}: its training data is gone; pass --data (files, or shards of this tokenizer)"
            )
        cfg.data.sources = [str(found)]
    data = prepare_data(cfg.data, out / "data", tok.vocab_size, str(tok.model_path.parent), progress=False)
    data.check_tokenizer(tok)
    return data, Path(data.dir)


def build_setup(spec: DistillSpec, cfg: RunConfig, resume: bool, progress: bool) -> TrainSetup:
    """The student, its batches and eval, and the distillation loss."""
    from kititans.train.loop import model_for_run
    from kititans.train.pretrain import StepWindows
    from kititans.train.sft import LengthGroupedBatches, evaluate_assistant, prepare_sft_data

    t, out = cfg.train, spec.out
    if spec.fresh:
        from kititans.data.tokenizer import Tokenizer

        tok = Tokenizer.load(cfg.tokenizer.path)
        s, mcfg, model = model_for_run(cfg, tok.vocab_size)
    else:
        ckpt = load_checkpoint(out if resume else spec.student)
        tok, s, mcfg, model = ckpt.tokenizer, ckpt.spec, ckpt.config, ckpt.model
    if spec.teacher is not None:
        same_tokenizer(Path(tok.model_path).parent, spec.teacher)
    meta: dict[str, Any] = {"stage": "distill", "distill": spec.to_dict()}
    pad = tok.pad_id if tok.pad_id >= 0 else tok.eos_id
    if spec.scores is not None:
        from kititans.distill.scores import ScoreBatches, TeacherScores, split_records

        scores = TeacherScores(spec.scores)
        scores.check_tokenizer(sha256_file(tok.model_path), tok.vocab_size, str(spec.student))
        train_i, val_i = split_records(scores, cfg.sft.val_fraction, cfg.sft.seed)
        batches = ScoreBatches(scores, train_i, t.batch_size, t.seed, pad, t.seq_len)
        val = batches.eval_batches(val_i[: t.eval_batches * t.batch_size])
        meta["distill_data"] = {"scores": str(spec.scores), "train": len(train_i), "val": len(val_i)}
        train_batch, evals, eval_fn = batches, val, evaluate_assistant
    elif spec.chat:
        data = prepare_sft_data(cfg, tok, progress)
        train_batch = LengthGroupedBatches(data.train, t.batch_size, t.seed, pad, t.seq_len)
        evals, eval_fn = data.eval_batches, evaluate_assistant
        meta["sft_data"] = data.describe
    else:
        data, data_dir = _pretrain_data(spec, cfg, tok, out)
        train_batch = StepWindows(data, t.batch_size, t.seq_len, t.seed)
        evals, eval_fn = data.eval_batches(t.eval_batches, t.batch_size, t.seq_len), None
        meta["data"] = str(data_dir)
    from kititans.device import resolve_device

    teacher = load_teacher(spec, resolve_device(t.device)) if spec.teacher is not None else None
    if teacher is not None:
        meta["teacher_run"] = {
            "path": str(spec.teacher),
            **{k: read_meta(spec.teacher).get(k) for k in ("step", "val_loss")},
        }
    return TrainSetup(
        spec=s, model_config=mcfg, model=model, tokenizer=tok, train_batch=train_batch, eval_batches=evals,
        extra_meta=meta, eval_fn=eval_fn, eval_at_start=eval_fn is not None,
        loss_fn=DistillLoss(teacher, spec.alpha, spec.temperature, spec.teacher_device),
    )  # fmt: skip


def distill(
    spec: DistillSpec,
    cfg: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train spec.out from the student (or from scratch) against the teacher; resumable."""
    check_spec(spec)
    out = spec.out
    if not spec.fresh and out.resolve() == spec.student.resolve():
        raise KititansError(
            f"--out {out} is the student run: distillation writes a new run (choose another --out)"
        )
    if not resume and (out / "config.json").exists():
        raise KititansError(
            f"{out} already holds a run: pass --resume to continue it, or choose another --out"
        )
    setup = build_setup(spec, cfg, resume, progress)
    if cfg.train.seq_len > setup.model_config.context_length:
        raise KititansError(
            f"train.seq_len {cfg.train.seq_len} exceeds the model context {setup.model_config.context_length}"
        )
    torch.manual_seed(cfg.train.seed)
    return run_training(cfg, setup, out, resume=resume, progress=progress, on_step=on_step)


def resume_spec(run_dir: Path, layers: list[tuple[str, Any]]) -> tuple[DistillSpec, RunConfig]:
    """The saved spec and config of a distillation run, with `layers` on top (e.g. more --steps)."""
    meta = read_meta(run_dir)
    if not isinstance(meta.get("distill"), dict) or not isinstance(meta.get("run"), dict):
        raise KititansError(f"{run_dir} is not a distillation run (no saved distill section to resume)")
    spec = DistillSpec.from_dict(meta["distill"])
    spec.out = run_dir
    return spec, apply_overrides(RunConfig(), [*flatten(meta["run"]), ("out", str(run_dir)), *layers])
