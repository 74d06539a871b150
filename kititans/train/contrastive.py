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
import hashlib
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
from kititans.train.loss import StepEnv
from kititans.train.schedule import schedule_for

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


def text_hash(ids: np.ndarray) -> int:
    """A 63-bit content hash of a text's token ids (equal texts, equal hashes)."""
    digest = hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class PairBatches:
    """train_batch(step, index, count): micro-batch `index` of the step's count x B pairs. Epochs are seeded
    permutations cut into whole steps (the n mod (count x B) pairs left over differ every epoch), so no pair
    occurs twice in a step's global batch. A batch: per column (query, positive[, negative]) the right-padded
    ids and attention mask, then the content hash of every text (B, columns) for masking false negatives."""

    def __init__(self, store: PairStore, batch_size: int, seed: int, pad_id: int):
        self.store, self.b, self.seed, self.pad_id = store, batch_size, seed, pad_id
        self._perm: tuple[int, list[int]] = (-1, [])

    def _perm_of(self, epoch: int) -> list[int]:
        if self._perm[0] != epoch:
            gen = batch_generator(self.seed, epoch, 13)
            self._perm = (epoch, torch.randperm(len(self.store), generator=gen).tolist())
        return self._perm[1]

    def rows(self, idx: list[int]) -> Batch:
        out: list[torch.Tensor] = []
        texts = [[self.store.get(c, i) for i in idx] for c in self.store.columns]
        for col in texts:
            out += pad(col, self.pad_id)
        hashes = torch.tensor(
            [[text_hash(col[k]) for col in texts] for k in range(len(idx))], dtype=torch.long
        )
        return (*out, hashes)

    def __call__(self, step: int, index: int, count: int) -> Batch:
        per_step = count * self.b
        n = len(self.store)
        if per_step > n:
            raise KititansError(
                f"a global batch of {per_step} pairs exceeds the {n} training pairs (a pair would be its own "
                f"negative): lower --global-batch (or --batch-size) to at most {n}"
            )
        steps_per_epoch = n // per_step
        epoch, at = divmod(step, steps_per_epoch)
        perm = self._perm_of(epoch)
        first = at * per_step + index * self.b
        return self.rows(perm[first : first + self.b])


def info_nce(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE (mean over pairs) over unit vectors q, p (B, D) and optional hard negatives n (B, D)."""
    return info_nce_sum(q, p, n, temperature) / len(q)


def info_nce_sum(
    q: torch.Tensor,
    p: torch.Tensor,
    n: torch.Tensor | None,
    temperature: float,
    rows: slice | None = None,
    hashes: torch.Tensor | None = None,
) -> torch.Tensor:
    """The summed symmetric InfoNCE of pairs `rows` (default all) of a batch of unit vectors q, p (N, D) and
    optional hard negatives n (N, D): (CE(q_i over positives and negatives) + CE(p_i over queries)) / 2 per
    pair. With `hashes` (N, columns) of the texts, a candidate with the same text as the positive (or a query
    with the same text as the query) is masked: it is no negative."""
    rows = rows or slice(0, len(q))
    idx = torch.arange(len(q), device=q.device)[rows]
    cands = p if n is None else torch.cat([p, n])
    s_q = q[rows].float() @ cands.float().T / temperature  # (b, N[+N])
    s_p = p[rows].float() @ q.float().T / temperature  # (b, N)
    if hashes is not None:
        h = hashes.to(q.device)
        cand_h = h[:, 1] if n is None else torch.cat([h[:, 1], h[:, 2]])
        own = torch.zeros_like(s_q, dtype=torch.bool)
        own[torch.arange(len(idx)), idx] = True
        s_q = s_q.masked_fill((cand_h[None, :] == h[idx, 1][:, None]) & ~own, float("-inf"))
        s_p = s_p.masked_fill((h[None, :, 0] == h[idx, 0][:, None]) & ~own[:, : len(q)], float("-inf"))
    loss_q = F.cross_entropy(s_q, idx, reduction="sum")
    loss_p = F.cross_entropy(s_p, idx, reduction="sum")
    return (loss_q + loss_p) / 2


def _texts(batch: Batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ids, attention mask) per column of a pair batch (the trailing hash tensor left out)."""
    return [(batch[i], batch[i + 1]) for i in range(0, len(batch) - 1, 2)]


def _gather(t: torch.Tensor, dist: Any) -> torch.Tensor:
    """All ranks' rows, rank by rank; differentiable (its backward sums every rank's gradient)."""
    if dist is None or not dist.enabled:
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t))


def _gather_ids(t: torch.Tensor, dist: Any) -> torch.Tensor:
    if dist is None or not dist.enabled:
        return t
    import torch.distributed as tdist

    out = [torch.zeros_like(t) for _ in range(dist.world)]
    tdist.all_gather(out, t)
    return torch.cat(out)


class ContrastiveObjective:
    """InfoNCE over the GLOBAL batch: every query against the positives (and negatives) of every micro-batch
    on every rank. A gradient cache (GradCache, Gao et al. 2021; sentence-transformers'
    CachedMultipleNegativesRankingLoss) spans the accumulation steps: the step's micro-batches are embedded
    without autograd, gathered across ranks (a differentiable all-gather), the loss and its gradient with
    respect to this rank's embeddings are computed once, then each micro-batch is embedded again with autograd
    and backpropagates its cached gradient. The loss is summed over pairs and divided by the step's global pair
    count (train/loss.py), so 2 ranks x 2 accumulation steps equal one batch of the global size."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def counts(self, batch: Batch) -> tuple[int, int]:
        """(pairs, non-padding tokens) of a micro-batch."""
        return int(batch[0].shape[0]), sum(int(m.sum()) for _, m in _texts(batch))

    def _embed(self, model: torch.nn.Module, batch: Batch, env: StepEnv) -> list[torch.Tensor]:
        with env.ctx:
            return [model(ids.to(env.device), m.to(env.device)).float() for ids, m in _texts(batch)]

    def step(self, model: torch.nn.Module, batches: list[Batch], env: StepEnv) -> torch.Tensor:
        with torch.no_grad():
            cached = [self._embed(model, b, env) for b in batches]
        cols = len(cached[0])
        local = [torch.cat([c[k] for c in cached]).requires_grad_() for k in range(cols)]  # (A*B, D) each
        hashes = _gather_ids(torch.cat([b[-1] for b in batches]).to(env.device), env.dist)
        glob = [_gather(t, env.dist) for t in local]
        rank = env.dist.rank if env.dist is not None else 0
        mine = slice(rank * len(local[0]), (rank + 1) * len(local[0]))
        loss = info_nce_sum(glob[0], glob[1], glob[2] if cols > 2 else None, self.temperature, mine, hashes)
        grads = torch.autograd.grad(loss * env.scale, local)  # d(step loss)/d(this rank's embeddings)
        at = 0
        for i, batch in enumerate(batches):
            n = batch[0].shape[0]
            with env.sync(i == len(batches) - 1):
                embs = self._embed(model, batch, env)
                surrogate = sum((e * g[at : at + n]).sum() for e, g in zip(embs, grads))
                env.backward(surrogate)
            at += n
        return loss.detach()


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
    schedule_for(cfg.optim, cfg.train.steps)  # a bad schedule is refused before any data is prepared
    spec, preset = find_preset(cfg.preset, cfg.family)
    init_weights, overrides, tok_path = None, dict(cfg.model), cfg.tokenizer.path
    if cfg.init and not resume:
        init_weights, dims, tok_path = _init_from(cfg, cfg.tokenizer.path)
        overrides = {**dims, **cfg.model}
        cfg.tokenizer.path = tok_path
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # rank 0 trains the tokenizer and builds the pairs; the others read them
        _wait_for([run_dir / "pairs" / "pairs.json"] + ([] if tok_path else [run_dir / "tokenizer" / "tokenizer.model"]),
                  cfg.train.dist_timeout)  # fmt: skip
    tok = _tokenizer(cfg, run_dir, tok_path, preset, progress and rank == 0)
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
        eval_fn=make_eval(val, pad_id, temp), eval_at_start=True, objective=ContrastiveObjective(temp),
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


def _wait_for(paths: list[Path], timeout_s: float) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not all(p.is_file() for p in paths):
        if time.monotonic() > deadline:
            missing = next(p for p in paths if not p.is_file())
            raise KititansError(
                f"rank {os.environ.get('RANK')}: {missing} did not appear within {timeout_s:.0f} s"
            )
        time.sleep(0.5)


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
