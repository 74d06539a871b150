"""`kititans distill RUN --teacher T` (logit distillation from a KiTitans run with the same tokenizer) and
`kititans distill RUN --teacher-scores DIR` (from stored teacher top-k log-probs), through the one training loop
(kititans.train.loop.run_training: several devices, exact resume, tracking).

Per token:  loss = (1 - a) x CE(student, next token) + a x T^2 x KL(teacher_T || student_T)
where _T is softmax(logits / T). With stored scores the teacher is its top-k log-probs plus the mass of the
rest, and the KL is over those k + 1 buckets (T must be 1: the rest cannot be re-tempered).

Memory: student and teacher give their final hidden states; train/loss.py's linear_loss runs both heads, the
loss and its gradient a chunk of rows at a time (`train.loss_chunk`), so neither model's (B, T, V) logits
exist at any time, let alone their fp32 log-softmaxes; rows outside the mask (prompts, padding) never reach a
head.

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
from kititans.train import loss as L
from kititans.train.loop import Batch, TrainResult, TrainSetup, run_training
from kititans.train.schedule import schedule_for

log = logging.getLogger("kititans")


# ------------------------------------------------------------------------------------------------ loss
@dataclass
class TopK:
    """Sparse teacher rows: ids (N, k) (-1 = none), log-probs (N, k), log of the rest mass (N,)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    rest: torch.Tensor

    def rows(self, keep: torch.Tensor | None) -> TopK:
        """Flattened to (N, ...) rows (fp32 log-probs), the rows where `keep` (N,) is true when given."""
        ids = self.ids.flatten(0, 1) if self.ids.ndim == 3 else self.ids
        lps = (self.logprobs.flatten(0, 1) if self.logprobs.ndim == 3 else self.logprobs).float()
        rest = (self.rest.flatten() if self.rest.ndim == 2 else self.rest).float()
        return TopK(ids, lps, rest) if keep is None else TopK(ids[keep], lps[keep], rest[keep])


@dataclass
class TopKKL:
    """A train/loss.py ChunkTarget: KL(teacher || student) over the teacher's top k tokens plus one bucket for
    the rest of the vocabulary; the gradient of a chunk comes from autograd on that chunk alone."""

    teacher: TopK

    def kl(self, s: torch.Tensor, a: int, b: int) -> torch.Tensor:
        ids, lps, rest = self.teacher.ids[a:b], self.teacher.logprobs[a:b], self.teacher.rest[a:b]
        valid = ids >= 0  # (c, k)
        q = F.log_softmax(s, dim=-1).gather(1, ids.clamp(min=0))  # student log-probs of the teacher's top k
        p = torch.where(valid, lps.exp(), 0.0)
        q_rest = torch.log1p(-torch.where(valid, q.exp(), 0.0).sum(1).clamp(max=1 - 1e-6))  # (c,)
        return (p * (torch.where(valid, lps, 0.0) - q)).sum(1) + rest.exp() * (rest - q_rest)

    def __call__(self, logits: torch.Tensor, a: int, b: int, grad: bool) -> tuple[torch.Tensor, Any]:
        if not grad:
            return self.kl(logits, a, b), None
        with torch.enable_grad():
            s = logits.detach().requires_grad_(True)
            loss = self.kl(s, a, b)
            (g,) = torch.autograd.grad(loss.sum(), s)
        return loss.detach(), g


def kd_target(targets: torch.Tensor, teacher: Any, alpha: float, temperature: float) -> L.ChunkTarget:
    """(1 - a) CE + a T^2 KL per row as a train/loss.py ChunkTarget; teacher: a callable (a, b) -> teacher
    logits of rows [a, b) (L.HeadLogits), or TopK rows; alpha 0 (or no teacher) is plain cross entropy."""
    ce = L.CrossEntropy(targets)
    if alpha <= 0 or teacher is None:
        return ce
    kd = TopKKL(teacher) if isinstance(teacher, TopK) else L.Distill(teacher, temperature)
    return kd if alpha >= 1 else L.Mixed([(alpha, kd), (1 - alpha, ce)])


def kd_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    teacher: torch.Tensor | TopK | None = None,
    alpha: float = 0.0,
    temperature: float = 1.0,
    rows: int | None = None,
) -> torch.Tensor:
    """Mean over the counted positions of (1-a) CE + a T^2 KL, from logits a model already made (B, T, V);
    targets/mask (B, T), teacher: logits (B, T, V) or TopK rows (B, T, k). Training does not use this: it
    goes from hidden states through the head chunk by chunk (DistillLoss), so no (B, T, V) tensor exists."""
    v = logits.shape[-1]
    keep = None if mask is None else mask.reshape(-1).bool()
    flat, y = logits.reshape(-1, v), targets.reshape(-1)
    if keep is not None:
        flat, y = flat[keep], y[keep]
    t: Any = None
    if isinstance(teacher, TopK):
        t = teacher.rows(keep)
    elif teacher is not None:
        dense = teacher.reshape(-1, v) if keep is None else teacher.reshape(-1, v)[keep]
        t = lambda a, b: dense[a:b]  # noqa: E731
    total = L.logits_loss(flat, kd_target(y, t, alpha, temperature), rows or 0)
    return total / max(flat.shape[0], 1)


class DistillLoss:
    """TrainSetup.loss_fn: the student's hidden states through its head, chunk by chunk (train/loss.py
    linear_loss), scored against the frozen teacher's logits (made chunk by chunk from its hidden states and
    head) or the batch's stored top-k rows. Returns the sum over the batch's counted positions (the loop
    divides by the step's global count). Neither model's (B, T, V) logits exist at any time."""

    def __init__(
        self, teacher: torch.nn.Module | None, alpha: float, temperature: float, device: str | None,
        rows: int = 0,
    ):  # fmt: skip
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        self.device = torch.device(device) if device else None
        self.rows = rows

    def _teacher(self, x: torch.Tensor, keep: torch.Tensor | None, device: torch.device) -> L.HeadLogits:
        assert self.teacher is not None
        tdev = self.device or device
        if next(self.teacher.parameters()).device != tdev:
            self.teacher.to(tdev)
        with torch.no_grad():
            h = self.teacher(x.to(tdev), hidden=True).flatten(0, 1)  # (B*T, D) in the teacher's dtype
            h = h if keep is None else h[keep.to(tdev)]
        return L.HeadLogits(h, L.head_weight(self.teacher), device if tdev != device else None)

    def __call__(self, model: torch.nn.Module, batch: Batch, device: torch.device, ctx: Any) -> torch.Tensor:
        x, y, *extra = (t.to(device, non_blocking=True) for t in batch)
        keep = extra[0].flatten().bool() if extra else None
        y = y.flatten() if keep is None else y.flatten()[keep]
        teacher: Any = None
        if len(extra) == 4:  # stored scores: (mask, topk_ids, topk_logprobs, rest)
            teacher = TopK(extra[1], extra[2], extra[3]).rows(keep)
        elif self.teacher is not None and self.alpha > 0:
            teacher = self._teacher(x, keep, device)
        with ctx:
            h = model(x, hidden=True).flatten(0, 1)  # (B*T, D)
            h = h if keep is None else h[keep]
            target = kd_target(y, teacher, self.alpha, self.temperature)
            return L.linear_loss(h, L.head_weight(model), target, self.rows)


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
    schedule_for(cfg.optim, t.steps)  # a bad schedule is refused before any data is prepared
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
        loss_fn=DistillLoss(teacher, spec.alpha, spec.temperature, spec.teacher_device, t.loss_chunk),
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
