"""`kititans sft`: chat fine-tuning of a pretrained run into a NEW run directory (the base is only read).

Conversations are rendered with the chat template (kititans.data.chat.render_conversation), so the loss
falls on assistant content and its <|end|> only. Examples are right-padded, never packed: with a causal
model and the loss mask, attention can never cross from one conversation into another. Batches come from
length-sorted groups (less padding), in a fixed order per (step, micro), so --resume is exact. The train
loop itself is kititans.train.loop.run_training.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kititans.checkpoint import load_checkpoint, read_meta
from kititans.config import RunConfig, apply_overrides, flatten
from kititans.data.chat import render_conversation
from kititans.data.chatdata import Conversation, builtin_conversations, read_chat_data, split_conversations
from kititans.data.readers import expand_sources
from kititans.data.tokenizer import END_TOKEN, Tokenizer
from kititans.device import resolve_device, resolve_dtype
from kititans.errors import KititansError
from kititans.models.spec import autocast_dtype
from kititans.train.loop import (
    Batch,
    TrainResult,
    TrainSetup,
    batch_generator,
    evaluate,
    run_training,
)
from kititans.train.loss import IGNORE
from kititans.train.metrics import initial_val_loss
from kititans.train.schedule import schedule_for

log = logging.getLogger("kititans")

# SFT's own schedule: ~3x below pretraining's peak lr, a short warmup, cosine to 10%, no weight decay on
# the AdamW side (a few hundred steps on a small set should not shrink what pretraining learned).
SFT_DEFAULTS: dict[str, Any] = {
    "optim.lr": 1e-3,
    "optim.muon_lr": 0.02,
    "optim.weight_decay": 0.0,
    "optim.schedule": "cosine",
    "optim.warmup_steps": 20,
    "optim.min_lr_ratio": 0.1,
    "train.steps": 600,
    "train.eval_every": 100,
    "train.save_every": 200,
    "train.log_every": 10,
}
GROUP_BATCHES = 32  # batches per length-sorted group


def default_out(base: str | Path) -> Path:
    base = Path(base)
    return base.with_name(base.name + "-sft")


def sft_config(base: str | Path, layers: list[tuple[str, Any]]) -> RunConfig:
    """The SFT run config: the base run's model settings < SFT_DEFAULTS (and seq_len = the model's
    context) < `layers` (recipe, --set, flags). A run shorter than the default warmup gets half its steps as
    warmup (a warmup the run never finishes is refused, train/schedule.py); one the user sets is kept."""
    base = Path(base)
    meta = read_meta(base)
    cfg = RunConfig(family=meta["family"])
    if isinstance(meta.get("run"), dict):
        apply_overrides(cfg, flatten(meta["run"]), source="base run")
    context = int(meta["model"].get("context_length", cfg.train.seq_len))
    defaults = [*SFT_DEFAULTS.items(), ("train.seq_len", context), ("sft.base", str(base))]
    cfg = apply_overrides(cfg, [*defaults, ("out", str(default_out(base))), *layers])
    t, o = cfg.train, cfg.optim
    if o.warmup_steps >= t.steps and not any(k == "optim.warmup_steps" for k, _ in layers):
        o.warmup_steps = t.steps // 2  # SFT's default warmup, shortened for a run shorter than it
    return cfg


def resume_config(run_dir: str | Path, layers: list[tuple[str, Any]]) -> RunConfig:
    """The saved config of an SFT run, with `layers` on top (e.g. more --steps)."""
    meta = read_meta(run_dir)
    if meta.get("stage") != "sft" or not isinstance(meta.get("run"), dict):
        raise KititansError(f"{run_dir} is not an SFT run (no saved sft config to resume)")
    return apply_overrides(RunConfig(), [*flatten(meta["run"]), ("out", str(run_dir)), *layers])


# ----------------------------------------------------------------------------------------------- data
Example = tuple[torch.Tensor, torch.Tensor]  # ids (L,), loss mask (L,) aligned with ids


@dataclass
class EncodeStats:
    conversations: int = 0
    truncated: int = 0
    skipped: int = 0
    tokens: int = 0
    assistant_tokens: int = 0


def encode_conversations(
    tok: Tokenizer,
    convs: list[Conversation],
    max_len: int,
    overlong: str = "truncate",
    progress: bool = False,
) -> tuple[list[Example], EncodeStats]:
    """Render and tokenize; conversations over `max_len` tokens keep their start (or are skipped)."""
    out: list[Example] = []
    stats = EncodeStats()
    for c in tqdm(convs, desc="encode", unit="conv", disable=not progress, leave=False):
        ids, mask = render_conversation(tok, c.messages)
        if len(ids) > max_len:
            if overlong == "skip":
                stats.skipped += 1
                continue
            ids, mask = ids[:max_len], mask[:max_len]
            if not any(mask[1:]):  # nothing left to learn from
                stats.skipped += 1
                continue
            stats.truncated += 1
        stats.conversations += 1
        stats.tokens += len(ids)
        stats.assistant_tokens += sum(mask[1:])
        out.append((torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)))
    return out, stats


def collate(examples: list[Example], pad_id: int, limit: int, multiple: int = 8) -> Batch:
    """Right-padded (x, y, loss_mask), each (B, T): T = the longest example, rounded up to `multiple`; padding
    inputs are pad_id, padding targets IGNORE (so the non-padding tokens are counted, train/loss.py)."""
    longest = max(len(ids) for ids, _ in examples) - 1
    t = min(-(-longest // multiple) * multiple, limit)
    x = torch.full((len(examples), t), pad_id, dtype=torch.long)
    y = torch.full((len(examples), t), IGNORE, dtype=torch.long)
    m = torch.zeros((len(examples), t), dtype=torch.bool)
    for i, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        x[i, :n], y[i, :n], m[i, :n] = ids[:-1], ids[1:], mask[1:]  # token j+1 is predicted at j
    return x, y, m


class LengthGroupedBatches:
    """batch(step, micro), deterministic: each epoch is a seeded permutation of the examples; every
    GROUP_BATCHES batches' worth is sorted by length, cut into batches, and the batches are shuffled."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int, limit: int):
        self.examples, self.b, self.seed = examples, batch_size, seed
        self.pad_id, self.limit = pad_id, limit
        self.lengths = [len(ids) for ids, _ in examples]
        self._perms: dict[int, list[int]] = {}
        self._cached: tuple[int, list[list[int]]] = (-1, [])

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            gen = batch_generator(self.seed, epoch, 7)
            self._perms[epoch] = torch.randperm(len(self.examples), generator=gen).tolist()
        return self._perms[epoch]

    def _group(self, g: int) -> list[list[int]]:
        if self._cached[0] != g:
            n, size = len(self.examples), GROUP_BATCHES * self.b
            idx = [self._perm(j // n)[j % n] for j in range(g * size, (g + 1) * size)]
            idx.sort(key=lambda i: (self.lengths[i], i))
            chunks = [idx[k : k + self.b] for k in range(0, size, self.b)]
            order = torch.randperm(len(chunks), generator=batch_generator(self.seed, g, 11)).tolist()
            self._cached = (g, [chunks[o] for o in order])
        return self._cached[1]

    def __call__(self, step: int, index: int, count: int) -> Batch:
        """Micro-batch `index` of the `count` (grad_accum x ranks) that make optimizer step `step`."""
        g, r = divmod(step * count + index, GROUP_BATCHES)
        return collate([self.examples[i] for i in self._group(g)[r]], self.pad_id, self.limit)


@dataclass
class SftData:
    train: list[Example]
    val: list[Example]
    eval_batches: list[Batch]
    describe: dict[str, Any] = field(default_factory=dict)


def load_conversations(cfg: RunConfig) -> tuple[list[Conversation], dict[str, Any]]:
    s = cfg.sft
    if s.data:
        convs = read_chat_data(s.data, s.format)
        files = expand_sources(list(s.data))
        sources = {str(f): hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in files}
        return convs, {"sources": sources, "format": s.format}
    from kititans.data.builtin import BUILTIN_CORPUS_VERSION

    log.info("no chat data given: generating %d built-in chat examples", s.builtin_examples)
    desc = f"builtin-chat:v{BUILTIN_CORPUS_VERSION}:seed{s.seed}:n{s.builtin_examples}"
    return builtin_conversations(s.seed, s.builtin_examples), {"sources": {desc: None}, "format": "messages"}


def prepare_sft_data(cfg: RunConfig, tok: Tokenizer, progress: bool = False) -> SftData:
    """Read, split (deterministically, by content) and encode the chat data; build the val batches."""
    t, s = cfg.train, cfg.sft
    convs, describe = load_conversations(cfg)
    train_c, val_c = split_conversations(convs, s.val_fraction, s.seed)
    val_c = val_c[: t.eval_batches * t.batch_size]  # bounds the cost of each eval
    max_len = t.seq_len + 1
    train, ts = encode_conversations(tok, train_c, max_len, s.overlong, progress)
    val, vs = encode_conversations(tok, val_c, max_len, s.overlong, progress)
    for what, st, n in (("train", ts, len(train_c)), ("val", vs, len(val_c))):
        if st.truncated or st.skipped:
            log.warning(
                "%s: %d of %d conversations are longer than %d tokens: %d truncated (start kept), %d skipped",
                what, st.truncated + st.skipped, n, max_len, st.truncated, st.skipped,
            )  # fmt: skip
    if not train or not val:
        raise KititansError(
            "no usable conversations left after the length limit: raise --seq-len or use sft.overlong=truncate"
        )
    pad = tok.pad_id if tok.pad_id >= 0 else tok.eos_id
    order = sorted(range(len(val)), key=lambda i: len(val[i][0]))  # similar lengths batch with less padding
    batches = [
        collate([val[i] for i in order[k : k + t.batch_size]], pad, t.seq_len)
        for k in range(0, len(order), t.batch_size)
    ]
    describe.update(
        conversations=len(convs),
        train_conversations=ts.conversations,
        val_conversations=vs.conversations,
        truncated=ts.truncated + vs.truncated,
        skipped=ts.skipped + vs.skipped,
        train_tokens=ts.tokens,
        train_assistant_tokens=ts.assistant_tokens,
        val_assistant_tokens=vs.assistant_tokens,
        max_tokens=max_len,
    )
    return SftData(train, val, batches, describe)


def evaluate_assistant(model: torch.nn.Module, batches: list[Batch], device: torch.device, ctx: Any) -> float:
    """Mean cross entropy over the assistant tokens of all batches (token-weighted, as training is)."""
    return evaluate(model, batches, device, ctx)


# ------------------------------------------------------------------------------------------------ run
def _check_tokenizer(tok: Tokenizer, where: Path) -> None:
    if tok.end_id < 0:
        raise KititansError(
            f"{where}: its tokenizer has no {END_TOKEN} token, so it cannot learn the chat format"
        )


def sft(
    cfg: RunConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Fine-tune cfg.sft.base on chat data into cfg.out (a new run directory); resumable."""
    if not cfg.sft.base or not cfg.out:
        raise KititansError("sft needs a base run (sft.base) and an output directory (out)")
    base, out = Path(cfg.sft.base), Path(cfg.out)
    if out.resolve() == base.resolve():
        raise KititansError(
            f"--out {out} is the base run: SFT writes a new run directory (choose another --out)"
        )
    if not resume and (out / "config.json").exists():
        raise KititansError(
            f"{out} already holds a run: pass --resume to continue it, or choose another --out"
        )
    schedule_for(cfg.optim, cfg.train.steps)  # a bad schedule is refused before any data is prepared
    ckpt = load_checkpoint(out if resume else base)
    tok = ckpt.tokenizer
    _check_tokenizer(tok, base)
    t = cfg.train
    if t.seq_len > ckpt.config.context_length:
        raise KititansError(
            f"train.seq_len {t.seq_len} exceeds the model context {ckpt.config.context_length} (lower --seq-len)"
        )
    data = prepare_sft_data(cfg, tok, progress)
    pad = tok.pad_id if tok.pad_id >= 0 else tok.eos_id
    base_meta = read_meta(base) if base.is_dir() else {}
    setup = TrainSetup(
        spec=ckpt.spec,
        model_config=ckpt.config,
        model=ckpt.model,
        tokenizer=tok,
        train_batch=LengthGroupedBatches(data.train, t.batch_size, t.seed, pad, t.seq_len),
        eval_batches=data.eval_batches,
        extra_meta={
            "stage": "sft",
            "base_run": {
                "path": str(base),
                "step": base_meta.get("step"),
                "val_loss": base_meta.get("val_loss"),
            },
            "sft_data": data.describe,
        },
        eval_at_start=True,
    )
    torch.manual_seed(t.seed)
    result = run_training(cfg, setup, out, resume=resume, progress=progress, on_step=on_step)
    result.extra.setdefault("initial_val_loss", initial_val_loss(out))
    result.extra["data"] = data.describe
    return result


@dataclass
class EvalReport:
    model: Path
    val_loss: float
    conversations: int
    assistant_tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(min(self.val_loss, 50))


def sft_eval(cfg: RunConfig, model_dir: str | Path, progress: bool = False) -> EvalReport:
    """The val loss on assistant tokens of `model_dir` on cfg's SFT val split (no training, nothing written)."""
    ckpt = load_checkpoint(model_dir)
    _check_tokenizer(ckpt.tokenizer, Path(model_dir))
    data = prepare_sft_data(cfg, ckpt.tokenizer, progress)
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.train.dtype, device)
    model = ckpt.model.to(device)
    loss = evaluate_assistant(model, data.eval_batches, device, autocast_dtype(device, dtype))
    return EvalReport(
        Path(model_dir), loss, data.describe["val_conversations"], data.describe["val_assistant_tokens"]
    )
