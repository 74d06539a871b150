"""Training an "embed" family (the sentence encoder): contrastive InfoNCE with in-batch negatives, through the
same loop as pretraining (train/loop.py: optimizers, checkpoints, several devices, resume, progress).

Loss: symmetric InfoNCE (query->positive and positive->query cross entropy over the batch), cosine
similarity of unit vectors divided by a FIXED temperature of 0.05 (sentence-transformers'
MultipleNegativesRankingLoss scale 20). A learned temperature (CLIP) needs batches of thousands to stay
stable; with the tens of pairs a CPU batch holds it drifts and collapses the margin, so it is a config value
(`contrastive.temperature`), not a parameter. Hard negatives, when every pair has one, join the candidates.

Evaluation on the held-out pairs: each query against every held-out positive (and negative): retrieval@1,
MRR, recall@5 and the mean margin (positive similarity minus the best other candidate), TanAILite's report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kititans.config import RunConfig
from kititans.data.pairs import PairStore, build_pairs
from kititans.data.tokenizer import Tokenizer
from kititans.embedding import retrieval_scores
from kititans.errors import KititansError
from kititans.files import write_json
from kititans.models.spec import find_preset, get_family
from kititans.train.loop import Batch, TrainResult, TrainSetup, batch_generator, default_run_dir, run_training

log = logging.getLogger("kititans")
THRESHOLDS = {"retrieval_at1": 0.7, "mrr": 0.5, "mean_margin": 0.05}  # TanAILite's acceptance
REPORT = "eval_report.json"


def pad(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, T) and the attention mask (B, T)."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.from_numpy(np.asarray(r, dtype=np.int64))
        mask[i, : len(r)] = 1
    return ids, mask


class PairBatches:
    """train_batch(step, index, count): the step's count x B pairs, taken from a seeded permutation per epoch
    (no pair twice in a batch, so in-batch negatives are true negatives), padded per column."""

    def __init__(self, store: PairStore, batch_size: int, seed: int, pad_id: int):
        self.store, self.b, self.seed, self.pad_id = store, batch_size, seed, pad_id
        self._perm: tuple[int, list[int]] = (-1, [])

    def _at(self, j: int) -> int:
        n = len(self.store)
        epoch = j // n
        if self._perm[0] != epoch:
            gen = batch_generator(self.seed, epoch, 13)
            self._perm = (epoch, torch.randperm(n, generator=gen).tolist())
        return self._perm[1][j % n]

    def rows(self, idx: list[int]) -> Batch:
        out: list[torch.Tensor] = []
        for c in self.store.columns:
            out += pad([self.store.get(c, i) for i in idx], self.pad_id)
        return tuple(out)

    def __call__(self, step: int, index: int, count: int) -> Batch:
        first = (step * count + index) * self.b
        return self.rows([self._at(first + k) for k in range(self.b)])


def info_nce(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over unit vectors q, p (B, D) and optional hard negatives n (B, D)."""
    cands = p if n is None else torch.cat([p, n])
    target = torch.arange(len(q), device=q.device)
    loss_q = F.cross_entropy(q.float() @ cands.float().T / temperature, target)
    loss_p = F.cross_entropy(p.float() @ q.float().T / temperature, target)
    return (loss_q + loss_p) / 2


def make_loss(temperature: float) -> Any:
    def loss_fn(model: torch.nn.Module, batch: Batch, device: torch.device, ctx: Any) -> torch.Tensor:
        parts = [t.to(device, non_blocking=True) for t in batch]
        with ctx:
            embs = [model(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
        return info_nce(embs[0], embs[1], embs[2] if len(embs) > 2 else None, temperature)

    return loss_fn


@torch.no_grad()
def embed_rows(model: torch.nn.Module, rows: list[np.ndarray], pad_id: int, device: Any, ctx: Any,
               batch: int = 64) -> torch.Tensor:  # fmt: skip
    out = []
    for k in range(0, len(rows), batch):
        ids, mask = pad(rows[k : k + batch], pad_id)
        with ctx:
            out.append(model(ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def torch_embedder(model: torch.nn.Module, pad_id: int) -> Any:
    """rows -> unit vectors (N, dim) as numpy, with the model in eval mode on its own device."""
    device = next(model.parameters()).device

    def embed(rows: Any) -> np.ndarray:
        model.eval()
        return embed_rows(
            model, [np.asarray(r) for r in rows], pad_id, device, contextlib.nullcontext()
        ).numpy()

    return embed


def retrieval_metrics(q: torch.Tensor, cands: torch.Tensor, temperature: float) -> dict[str, float]:
    """Query i's positive is candidate i; every other candidate is a negative for it (+ the InfoNCE loss)."""
    target = torch.arange(len(q))
    loss = float(F.cross_entropy((q @ cands.T) / temperature, target))
    return {"loss": loss, **retrieval_scores(q.float().cpu().numpy(), cands.float().cpu().numpy())}


def make_eval(store: PairStore, pad_id: int, temperature: float) -> Any:
    queries = [store.get("query", i) for i in range(len(store))]
    cands = [store.get("positive", i) for i in range(len(store))]
    if "negative" in store.columns:
        cands += [store.get("negative", i) for i in range(len(store))]

    def eval_fn(model: torch.nn.Module, _batches: Any, device: Any, ctx: Any) -> dict[str, float]:
        was = model.training
        model.eval()
        try:
            q = embed_rows(model, queries, pad_id, device, ctx)
            c = embed_rows(model, cands, pad_id, device, ctx)
        finally:
            model.train(was)
        return retrieval_metrics(q, c, temperature)

    return eval_fn


def _init_from(cfg: RunConfig, tok_path: str | None) -> tuple[Any, dict[str, Any], str]:
    """--init RUN: the Lite run's weights, its dims as the encoder's defaults, and its tokenizer."""
    from kititans.checkpoint import load_checkpoint, read_meta
    from kititans.files import sha256_file

    meta = read_meta(cfg.init)
    src = get_family(meta["family"])
    allowed = getattr(get_family(cfg.family).model_cls, "init_families", ())
    if src.name not in allowed:
        raise KititansError(
            f"--init {cfg.init}: a {src.name} run; a {cfg.family} run starts from a "
            f"{' or '.join(allowed) or 'matching'} run (the same blocks and weight names)"
        )
    if tok_path and sha256_file(Tokenizer.load(tok_path).model_path) != sha256_file(
        Path(cfg.init) / "tokenizer.model"
    ):
        raise KititansError(
            f"--init {cfg.init} has another tokenizer than --tokenizer {tok_path}: drop --tokenizer"
        )
    ckpt = load_checkpoint(cfg.init)
    dims = {k: v for k, v in dataclasses.asdict(ckpt.config).items() if k != "tie_embeddings"}
    return ckpt.model.state_dict(), dims, str(cfg.init)


def copy_matching(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> int:
    own = model.state_dict()
    same = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    if not same:
        raise KititansError("--init: no weight of that run fits this encoder (different dimensions)")
    model.load_state_dict(same, strict=False)
    return len(same)


def train_encoder(
    cfg: RunConfig, *, resume: bool = False, progress: bool = True, on_step: Any = None
) -> TrainResult:
    """Build (or reuse) the pair store, then train with InfoNCE; writes eval_report.json at the end."""
    run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
    cfg.out = str(run_dir)
    if not resume and (run_dir / "config.json").exists():
        raise KititansError(
            f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out"
        )
    spec, preset = find_preset(cfg.preset, cfg.family)
    init_weights, overrides, tok_path = None, dict(cfg.model), cfg.tokenizer.path
    if cfg.init and not resume:
        init_weights, dims, tok_path = _init_from(cfg, cfg.tokenizer.path)
        overrides = {**dims, **cfg.model}
        cfg.tokenizer.path = tok_path
    tok = _tokenizer(cfg, run_dir, tok_path, preset, progress)
    mcfg = spec.make_config(preset.name, {**overrides, "vocab_size": tok.vocab_size})
    t = cfg.train
    if t.seq_len > mcfg.context_length:
        raise KititansError(f"train.seq_len {t.seq_len} exceeds the encoder's context {mcfg.context_length}")
    pairs_dir = run_dir / "pairs"
    if not (pairs_dir / "pairs.json").is_file():
        m = build_pairs(cfg.data.sources, tok, pairs_dir, max_len=t.seq_len, val_fraction=cfg.contrastive.val_fraction,
                        seed=cfg.data.seed, builtin_bytes=cfg.data.builtin_bytes)  # fmt: skip
        log.info("pairs: %d train, %d held out (%d labelled, %d unsupervised span pairs)",
                 m["train"], m["val"], m["labelled"], m["spans"])  # fmt: skip
    train, val = PairStore(pairs_dir, "train"), PairStore(pairs_dir, "val")
    torch.manual_seed(t.seed)
    model = spec.build(mcfg)
    if init_weights is not None:
        log.info("--init: copied %d tensors from %s", copy_matching(model, init_weights), cfg.init)
    pad_id = tok.pad_id if tok.pad_id >= 0 else tok.eos_id
    temp = cfg.contrastive.temperature
    setup = TrainSetup(
        spec=spec, model_config=mcfg, model=model, tokenizer=tok,
        train_batch=PairBatches(train, t.batch_size, t.seed, pad_id), eval_batches=[],
        extra_meta={"stage": "contrastive", "pairs": str(pairs_dir), "init": cfg.init,
                    "temperature": temp},
        eval_fn=make_eval(val, pad_id, temp), eval_at_start=True, loss_fn=make_loss(temp),
    )  # fmt: skip
    result = run_training(cfg, setup, run_dir, resume=resume, progress=progress, on_step=on_step)
    report = {"metrics": result.extra.get("val_metrics", {}), "thresholds": THRESHOLDS, "step": result.step,
              "pairs": str(pairs_dir), "held_out_pairs": len(val)}  # fmt: skip
    if os.environ.get("RANK", "0") == "0":
        # beside the pair-level metrics: every held-out query against every distinct held-out document, with
        # the lexical baseline on the same candidates (kititans.retrieval)
        from kititans.retrieval.heldout import document_report

        embed = torch_embedder(model, pad_id)
        report["documents"] = document_report(pairs_dir, embed, tok, mcfg.context_length, t.seq_len)
        write_json(run_dir / REPORT, report)
    result.extra["eval_report"] = report
    return result


def _tokenizer(cfg: RunConfig, run_dir: Path, tok_path: str | None, preset: Any, progress: bool) -> Tokenizer:
    """The given tokenizer, the run's own (resume), or one trained on a sample of the pair texts."""
    if tok_path:
        return Tokenizer.load(tok_path)
    own = run_dir / "tokenizer"
    if (own / "tokenizer.model").is_file():
        return Tokenizer.load(own)
    from kititans.data.pairs import read_items
    from kititans.data.sampling import TokenizerSample
    from kititans.data.tokenizer import train_tokenizer

    vocab = cfg.tokenizer.vocab_size or int(cfg.model.get("vocab_size", preset.model["vocab_size"]))
    sample = TokenizerSample(int(cfg.data.tokenizer_sample_mb * 1e6), cfg.data.seed)
    for item in read_items(cfg.data.sources, cfg.data.builtin_bytes, cfg.data.seed):
        text = "\n".join(item.texts)
        sample.offer(text, text.encode("utf-8"))
    log.info(
        "training a SentencePiece BPE tokenizer (vocab %d) on %.1f MB of pair texts",
        vocab,
        sample.bytes / 1e6,
    )
    return train_tokenizer(sample.documents(), own, vocab, character_coverage=cfg.data.character_coverage)
