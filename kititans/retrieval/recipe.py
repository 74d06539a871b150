"""The two-stage retriever recipe (`kititans train-retriever`), one command or one YAML file:

  stage 1  unsupervised span pairs (two crops of one document) over the training documents of the pairs file
           and the user's --corpus, optionally starting from a Lite run (--init) trained on that text;
  mine     one hard negative per labelled pair: a training document that BM25 or the stage-1 encoder ranks
           high for the query but that is not its positive (kititans.retrieval.mining);
  stage 2  the labelled pairs with those negatives, starting from the stage-1 encoder;
  report   the lexical baseline, dense after stage 1, dense after stage 2 and hybrid on the same held-out
           documents (grouped by positive document), with the pair-level report of the same run beside it.

RUN/ is the stage-2 encoder (export, embed, search, index it as any encoder run); RUN/stage1/ the stage-1
run; RUN/mined.jsonl the pairs with negatives; RUN/retrieval_report.json the report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kititans.errors import KititansError
from kititans.files import atomic_path, write_json
from kititans.retrieval.fusion import Fusion

log = logging.getLogger("kititans")
REPORT = "retrieval_report.json"
SETTINGS = (
    "retrieval.json"  # the run's search defaults (fusion weight, analyzer, passages), read by index/search
)
MAX_CROPS = 32  # span pairs per training document in stage 1 (fewer when the steps need fewer)
STAGE1_VAL = 0.02  # stage 1's own held-out spans (its loss curve only)
WEIGHTS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)  # rrf: BM25's weight
DENSE_SHARES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7)  # convex: the encoder's share (0: BM25 alone)


@dataclass
class RecipeConfig:
    pairs: str = ""  # labelled {"query", "positive"} JSONL (the documents are the positives)
    out: str = ""
    corpus: list[str] = field(default_factory=list)  # more unlabelled text for stage 1
    preset: str = "encoder-tiny"
    init: str | None = None  # a Lite run (same text) to start stage 1 from
    vocab_size: int | None = None  # tokenizer trained on the pairs and corpus (default: the preset's)
    stage1_steps: int = 600
    stage2_steps: int = 600
    batch_size: int = 32
    lr: float | None = None
    seq_len: int = 128
    val_fraction: float = 0.1  # held-out share of the documents
    seed: int = 0
    miners: str = "both"  # lexical | dense | both
    depth: int = 3
    lexical_weight: float | None = (
        None  # rrf with this BM25 weight; None (and no fusion): tuned on dev documents
    )
    fusion: str | None = None  # "rrf:16" / "convex:0.1"; None (and no lexical_weight): tuned on dev documents
    dev_fraction: float = 0.1  # training documents kept out of stage 2 to tune the fusion weight on
    sets: list[str] = field(default_factory=list)  # --set KEY=VALUE for both stages

    def check(self) -> RecipeConfig:
        if not self.pairs:
            raise KititansError("train-retriever needs --pairs FILE (labelled query/positive pairs)")
        if not Path(self.pairs).exists():
            raise KititansError(f"--pairs: no such file: {self.pairs}")
        if not self.out:
            raise KititansError("train-retriever needs --out RUN")
        if (Path(self.out) / "config.json").exists():
            raise KititansError(f"{self.out} already holds a run: choose another --out")
        if self.stage1_steps < 0 or self.stage2_steps < 1:
            raise KititansError("--stage1-steps must be >= 0 and --stage2-steps >= 1")
        if not 0 < self.val_fraction < 0.5:
            raise KititansError(f"--val-fraction must be in (0, 0.5), got {self.val_fraction}")
        _fixed_fusion(self)  # a bad --fusion / --lexical-weight fails before any training
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, **flags: Any) -> RecipeConfig:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise KititansError(f"recipe not found: {p}")
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        known = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(data) - known)
        if bad:
            raise KititansError(f"{p}: unknown recipe key {bad[0]!r}; valid: {', '.join(sorted(known))}")
        return cls(**{**data, **{k: v for k, v in flags.items() if v is not None}})


def read_pairs(path: str) -> list[tuple[str, str]]:
    from kititans.data.pairs import read_items

    out = [(it.texts[0], it.texts[1]) for it in read_items([path]) if it.kind == "pair"]
    if not out:
        raise KititansError(f"{path}: no labelled pair ({{'query', 'positive'}} or chat turns) found")
    return out


def _run_config(rc: RecipeConfig, out: Path, sources: list[str], steps: int, tokenizer: str | None,
                init: str | None, seed: int, val_fraction: float) -> Any:  # fmt: skip
    """A `kititans train --family encoder` config: the preset's training defaults, then the recipe's."""
    from kititans.config import parse_set, resolve_run_config
    from kititans.models.spec import find_preset

    def hints(family: str | None, preset: str) -> tuple[str, list[tuple[str, Any]]]:
        spec, p = find_preset(preset, family)
        return spec.name, list(p.train.items())

    layers = [("family", "encoder"), ("preset", rc.preset), ("data.sources", sources), ("out", str(out)),
              ("train.steps", steps), ("train.batch_size", rc.batch_size), ("train.seq_len", rc.seq_len),
              ("contrastive.val_fraction", val_fraction), ("data.seed", seed),
              ("train.eval_every", max(steps // 4, 1)), ("train.save_every", max(steps // 2, 1))]  # fmt: skip
    if rc.lr is not None:
        layers.append(("optim.lr", rc.lr))
    if tokenizer:
        layers.append(("tokenizer.path", tokenizer))
    if init:
        layers.append(("init", init))
    return resolve_run_config([*layers, *parse_set(rc.sets)], hints)


def _tokenizer(rc: RecipeConfig, pairs: list[tuple[str, str]], out: Path) -> str:
    """A SentencePiece tokenizer trained on the pairs' texts and the corpus (the preset's vocabulary size)."""
    from kititans.data.pairs import read_items
    from kititans.data.sampling import TokenizerSample
    from kititans.data.tokenizer import train_tokenizer
    from kititans.models.spec import find_preset

    _, preset = find_preset(rc.preset, "encoder")
    vocab = rc.vocab_size or int(preset.model["vocab_size"])
    sample = TokenizerSample(int(200e6), rc.seed)
    texts = ({t for p in pairs for t in p}) | {it.texts[0] for it in read_items(rc.corpus) if rc.corpus}
    for t in sorted(texts):
        sample.offer(t, t.encode("utf-8"))
    log.info(
        "recipe: training a %d-piece tokenizer on %.1f MB of pair and corpus text", vocab, sample.bytes / 1e6
    )
    train_tokenizer(sample.documents(), out, vocab)
    return str(out)


def _stage1_fraction(docs: set[str], seed: int) -> float:
    """Stage 1's held-out share: STAGE1_VAL, raised just enough that at least one document is held out
    (the split hashes documents as kititans.data.shards.is_val does), for small corpora."""
    import hashlib

    def h(d: str) -> float:
        digest = hashlib.blake2b(f"{seed}\x00{d[:4096]}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64

    return min(0.49, max(STAGE1_VAL, min((h(d) for d in docs), default=0.0) + 1e-9))


def _stage1_corpus(pairs: list[tuple[str, str]], heldout: list[bool], path: Path, crops: int) -> int:
    """The training documents of the pairs file as {"text"} lines, each `crops` times (every line gives its
    own two spans: Contriever's fresh crops per epoch); held-out documents never enter stage 1."""
    docs = sorted({p for (_, p), h in zip(pairs, heldout) if not h})
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for _ in range(crops):
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    return len(docs)


def evaluate_run(run: Path, ev: Any, rc: RecipeConfig) -> dict[str, Any]:
    """Document-level report of an encoder run on the recipe's held-out set (torch runtime)."""
    from kititans.embedding import embed_rows
    from kititans.retrieval.evaluate import EvalSettings, evaluate
    from kititans.retrieval.passages import check_passages
    from kititans.runtimes import load_runtime

    rt = load_runtime(run, "torch")
    pt, stride = check_passages(rc.seq_len - 1, None, rt.context_length)
    return evaluate(
        ev,
        lambda rows: embed_rows(rt, rows),
        rt.codec,
        EvalSettings(pt, stride, fusion=_fixed_fusion(rc) or Fusion()),
        rt.context_length,
    ), rt


def split_pairs(rc: RecipeConfig, pairs: list[tuple[str, str]]) -> tuple[list[bool], list[bool]]:
    """Per pair: held out (its document never trains), and dev (a training document kept out of stage 2, for
    tuning the fusion)."""
    from kititans.data.pairs import DocumentSplit
    from kititans.data.shards import is_val
    from kititans.retrieval.evaluate import MAX_HELDOUT_PAIRS

    decide = DocumentSplit(rc.seed, rc.val_fraction, MAX_HELDOUT_PAIRS)
    heldout = [decide(p) is not None for _, p in pairs]
    dev = [not h and is_val(p, rc.seed + 2, rc.dev_fraction) for (_, p), h in zip(pairs, heldout)]
    return heldout, dev


def run_recipe(rc: RecipeConfig, progress: bool = True) -> dict[str, Any]:
    """Stage 1, mining, stage 2 and the report; returns the report (also written to RUN/retrieval_report.json)."""
    from kititans.retrieval.evaluate import EvalSet, heldout_set
    from kititans.retrieval.metrics import scores_report
    from kititans.retrieval.mining import mine_negatives, write_pairs
    from kititans.train.contrastive import train_encoder

    rc.check()
    out = Path(rc.out)
    pairs = read_pairs(rc.pairs)
    heldout, dev = split_pairs(rc, pairs)
    ev = heldout_set(pairs, rc.seed, rc.val_fraction, where=rc.pairs)  # fails early on a one-sided split
    out.mkdir(parents=True, exist_ok=True)
    tok = None if rc.init else _tokenizer(rc, pairs, out / "tokenizer")
    stage1 = rc.init
    report: dict[str, Any] = {"recipe": dataclasses.asdict(rc), "split": ev.info}
    if rc.stage1_steps:
        n_docs = len({p for (_, p), h in zip(pairs, heldout) if not h})
        crops = max(1, min(MAX_CROPS, -(-rc.stage1_steps * rc.batch_size // max(n_docs, 1))))
        n = _stage1_corpus(pairs, heldout, out / "stage1_docs.jsonl", crops)
        s1_val = _stage1_fraction({p for (_, p), h in zip(pairs, heldout) if not h}, rc.seed + 1)
        log.info(
            "stage 1: span pairs over %d training documents%s", n, f" + {rc.corpus}" if rc.corpus else ""
        )
        cfg = _run_config(rc, out / "stage1", [str(out / "stage1_docs.jsonl"), *rc.corpus], rc.stage1_steps,
                          tok, rc.init, rc.seed + 1, s1_val)  # fmt: skip  # seed + 1: its own held-out spans
        train_encoder(cfg, progress=progress)
        stage1 = str(out / "stage1")
    if stage1 is None:
        raise KititansError("--stage1-steps 0 needs --init (an encoder or Lite run to mine negatives with)")
    s1, rt = evaluate_run(Path(stage1), ev, rc) if rc.stage1_steps else (None, None)
    if rt is None:
        from kititans.runtimes import load_runtime

        rt = load_runtime(stage1, "torch")
    from kititans.embedding import embed_rows
    from kititans.retrieval.passages import check_passages

    pt, stride = check_passages(rc.seq_len - 1, None, rt.context_length)
    negs, counts = mine_negatives(pairs, heldout, rt.codec, lambda rows: embed_rows(rt, rows), passage_tokens=pt,
                                  stride=stride, max_len=rt.context_length, miners=rc.miners, depth=rc.depth,
                                  seed=rc.seed)  # fmt: skip
    keep = [not d for d in dev]  # dev pairs stay out of stage 2: the fusion weight is tuned on them
    written = write_pairs(out / "mined.jsonl", [p for p, k in zip(pairs, keep) if k],
                          [n for n, k in zip(negs, keep) if k])  # fmt: skip
    report["mining"] = {**counts, "pairs_written": written}
    log.info("mined negatives: %s", counts)
    cfg = _run_config(
        rc, out, [str(out / "mined.jsonl")], rc.stage2_steps, None, stage1, rc.seed, rc.val_fraction
    )
    result = train_encoder(cfg, progress=progress)
    s2, _ = evaluate_run(out, ev, rc)
    dense, lex = s2.pop("_scores")
    fusion, sweep_dev = tune_fusion(out, rc, pairs, dev, EvalSet)
    report["fusion"] = {**fusion.to_json(), "tuned_on_dev": sweep_dev}
    report["lexical"] = s2["lexical"]
    if s1 is not None:
        d1, l1 = s1.pop("_scores")
        report["stage1"] = {
            "dense": s1["dense"],
            "hybrid": scores_report(fusion(d1, l1), ev.gold, False),
        }
    report["stage2"] = {
        "dense": s2["dense"],
        "hybrid": scores_report(fusion(dense, lex), ev.gold, False),
    }
    keys = ("candidates", "queries", "passages", "passage_tokens", "stride", "split_documents",
            "cut_share_without_passages", "analyzer")  # fmt: skip
    report["candidates"] = {k: s2[k] for k in keys}
    report["heldout_fusion_sweep"] = {str(f): scores_report(f(dense, lex), ev.gold, with_margin=False)
                                      for f in CANDIDATES}  # fmt: skip
    write_json(out / SETTINGS, {"fusion": fusion.to_json(), "analyzer": s2["analyzer"],
                                "passage_tokens": s2["passage_tokens"], "stride": s2["stride"]})  # fmt: skip
    report["pair_level"] = result.extra["eval_report"]["metrics"]
    write_json(out / REPORT, report)
    return report


def _fixed_fusion(rc: RecipeConfig) -> Fusion | None:
    if rc.fusion is not None and rc.lexical_weight is not None:
        raise KititansError("give fusion or lexical_weight, not both (lexical_weight W is fusion rrf:W)")
    if rc.fusion is not None:
        return Fusion.parse(rc.fusion)
    return Fusion("rrf", rc.lexical_weight) if rc.lexical_weight is not None else None


# tried on the dev documents, in order of preference: BM25 alone first, then a growing dense share, then rrf
# from BM25's side; the choice is the first whose dev MRR is within one standard error of the best (below)
CANDIDATES = (*(Fusion("convex", a) for a in DENSE_SHARES), *(Fusion("rrf", w) for w in reversed(WEIGHTS)))


def pick_fusion(reciprocal_ranks: dict[Fusion, np.ndarray]) -> tuple[Fusion, float]:
    """The one-standard-error rule (Breiman et al. 1984) over CANDIDATES' per-query reciprocal ranks on the dev
    queries: the first candidate, in order of preference, whose MRR is within one standard error of the best
    one's. A dev set of a few dozen queries cannot tell a 0.02 MRR gain from noise; this keeps hybrid search
    on BM25's side until the encoder's gain is larger than that noise. Returns (choice, the threshold)."""
    mrr = {f: float(rr.mean()) for f, rr in reciprocal_ranks.items()}
    best = max(mrr, key=lambda f: mrr[f])
    rr = reciprocal_ranks[best]
    se = float(rr.std(ddof=1) / np.sqrt(len(rr))) if len(rr) > 1 else 0.0
    threshold = mrr[best] - se
    return next(f for f in CANDIDATES if f in mrr and mrr[f] >= threshold), threshold


def tune_fusion(
    run: Path, rc: RecipeConfig, pairs: list[tuple[str, str]], dev: list[bool], cls: Any
) -> tuple[Fusion, dict]:
    """The fusion (method and weight) chosen on the dev pairs (training documents stage 2 never saw) by
    pick_fusion, or the recipe's fixed one."""
    from kititans.retrieval.metrics import gold_ranks

    fixed = _fixed_fusion(rc)
    if fixed is not None:
        return fixed, {}
    index: dict[str, int] = {}
    queries, gold = [], []
    for (q, p), d in zip(pairs, dev):
        if d:
            gold.append(index.setdefault(p, len(index)))
            queries.append(q)
    if len(index) < 2:
        log.info("fusion: fewer than 2 dev documents; rrf:1")
        return Fusion(), {}
    rep, _ = evaluate_run(run, cls(queries, gold, list(index), {}), rc)
    dense, lex = rep.pop("_scores")
    rrs = {f: 1.0 / gold_ranks(f(dense, lex), np.asarray(gold))[0] for f in CANDIDATES}
    best, threshold = pick_fusion(rrs)
    sweep = {str(f): float(rr.mean()) for f, rr in rrs.items()}
    log.info("fusion: %s (dev MRR: %s)", best, {k: round(v, 4) for k, v in sweep.items()})
    if best == Fusion("convex", 0.0):
        log.warning(
            "fusion: on the dev documents the encoder's gain is within noise; hybrid search is BM25 alone"
        )
    return best, {"queries": len(queries), "documents": len(index), "mrr_by_fusion": sweep,
                  "rule": "one standard error", "mrr_threshold": threshold}  # fmt: skip
