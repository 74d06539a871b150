"""`kititans data` as a streaming pipeline whose memory does not depend on the corpus size:

  pass 1  read the corpus once for a bounded uniform sample of the training documents (data/sampling.py)
          and train SentencePiece on it;
  pass 2  read it again: drop exact duplicates (data/dedup.py), split train/val by content hash, tokenize
          chunks in worker processes in order (data/encode.py) and write size-capped shards (data/shards.py);
  commit  write manifest.json last, atomically. A folder without one is not a dataset: an interrupted run
          leaves nothing that looks complete, and the files it made are removed (now, or by the re-run).

`--append DIR` runs pass 2 only, with the dataset's own tokenizer, and commits a manifest that lists the old
shards and the new ones: what is there is never re-tokenized.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import kititans
from kititans.config import DataConfig
from kititans.data.dedup import HashSet, doc_hash
from kititans.data.encode import EncoderPool, default_workers
from kititans.data.readers import BuiltinCorpus, Corpus
from kititans.data.sampling import MB, build_tokenizer, progress_bar
from kititans.data.shards import (
    FORMAT_VERSION,
    FULL_DISK,
    MANIFEST,
    SPLITS,
    ShardWriter,
    disk_full,
    is_shards_dir,
    is_val,
    load_manifest,
    token_dtype,
    verify_shards,
)
from kititans.data.tokenizer import Tokenizer
from kititans.errors import KititansError
from kititans.files import sha256_file, write_json

log = logging.getLogger("kititans")
CHUNK_BYTES = 1 << 20  # text per tokenization task
OWNED = ("train-*.bin", "val-*.bin", "hashes-*.u64", ".*.tmp-*")  # files this pipeline writes


def open_corpus(cfg: DataConfig) -> Corpus | BuiltinCorpus:
    if cfg.sources or cfg.dataset:
        return Corpus(cfg.sources, cfg.dataset, cfg.text_field, cfg.skip_invalid, cfg.split, cfg.max_docs)
    log.info("no data given: generating the built-in corpus (%.1f MB)", cfg.builtin_bytes / MB)
    return BuiltinCorpus(seed=cfg.seed, target_bytes=cfg.builtin_bytes, max_docs=cfg.max_docs)


@dataclass
class _Chunk:
    docs: list[str] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    bytes: int = 0


class _Pass2:
    """Pass 2 state: writers, the dedup set, counters; `run` streams the corpus through the encoder pool."""

    def __init__(self, out_dir: Path, tok: Tokenizer, cfg: DataConfig, segment: int, base: dict | None):
        self.out_dir, self.tok, self.cfg, self.segment = out_dir, tok, cfg, segment
        dtype = token_dtype(tok.vocab_size)
        first = {s: len(base["splits"][s]["shards"]) if base else 0 for s in SPLITS}
        shard_bytes = int(cfg.shard_mb * MB)
        self.writers = {s: ShardWriter(out_dir, s, dtype, shard_bytes, first[s]) for s in SPLITS}
        self.dedup: HashSet | None = _load_hashes(out_dir, base) if cfg.dedup else None
        self.hash_path = out_dir / f"hashes-{segment:05d}.u64"
        self.hash_file: Any = None
        self.written = self.duplicates = self.val_seen = self.read_bytes = 0
        self.stop = False
        self.dups: dict[str, int] = {}

    def files(self) -> list[Path]:
        return [*self.writers["train"].files, *self.writers["val"].files, self.hash_path]

    def consume(self, results: Any) -> None:
        """Write finished chunks in order; with max_tokens, cut at the document that reaches it."""
        for (split, hashes), enc in results:
            if self.stop:
                continue
            tokens, lengths = enc.tokens, enc.lengths
            budget = self.cfg.max_tokens
            if budget and self.written + len(tokens) >= budget:
                n = min(int(np.searchsorted(np.cumsum(lengths), budget - self.written)) + 1, len(lengths))
                tokens, lengths, hashes = tokens[: int(lengths[:n].sum())], lengths[:n], hashes[:n]
                self.stop = True
            self.writers[split].write(tokens, lengths)
            self.written += len(tokens)
            if self.hash_file is not None:
                np.asarray(hashes, dtype="<u8").tofile(self.hash_file)

    def run(self, corpus: Any, progress: bool) -> None:
        workers = self.cfg.workers or default_workers()
        dtype = self.writers["train"].dtype.name
        if self.dedup is not None:
            self.hash_file = open(self.hash_path, "wb")  # noqa: SIM115 - closed in finish
        chunks = {s: _Chunk() for s in SPLITS}
        held: _Chunk | None = None  # the newest full train chunk: kept back so val can never end up empty
        with (
            EncoderPool(  # chat tokens of chat records rendered as text become their ids
                self.tok.document_model_proto(), self.tok.bos_id, self.tok.eos_id, dtype, workers
            ) as pool,
            progress_bar(corpus, f"tokenize ({workers} worker{'s' * (workers > 1)})", progress) as bar,
        ):

            def submit(split: str, c: _Chunk) -> None:
                if c.docs:
                    self.consume(pool.submit(c.docs, (split, c.hashes)))

            for n, doc in enumerate(corpus, 1):
                data = doc.encode("utf-8")
                self.read_bytes += len(data)
                h = doc_hash(data) if self.dedup is not None else 0
                if self.dedup is not None and not self.dedup.add(h):
                    self.duplicates += 1
                    self.dups[corpus.source] = self.dups.get(corpus.source, 0) + 1
                    continue
                split = "val" if is_val(doc, self.cfg.seed, self.cfg.val_fraction) else "train"
                self.val_seen += split == "val"
                c = chunks[split]
                c.docs.append(doc)
                c.hashes.append(h)
                c.bytes += len(data)
                if c.bytes >= CHUNK_BYTES:
                    if split == "train":
                        if held is not None:
                            submit("train", held)
                        held = c
                    else:
                        submit("val", c)
                    chunks[split] = _Chunk()
                if n % 256 == 0:
                    bar.update(corpus.raw_read - bar.n)
                    bar.set_postfix(docs=f"{n:,}", tokens=f"{self.written / 1e6:.1f}M", dups=self.duplicates)
                if self.stop:
                    break
            bar.update(corpus.raw_read - bar.n)
            if not self.stop:
                last = chunks["train"] if chunks["train"].docs else held
                if self.val_seen == 0 and last is not None and last.docs:  # guarantee a validation split
                    chunks["val"].docs.append(last.docs.pop())
                    chunks["val"].hashes.append(last.hashes.pop())
                for split, c in (
                    ("train", held or _Chunk()),
                    ("train", chunks["train"]),
                    ("val", chunks["val"]),
                ):
                    submit(split, c)
                self.consume(pool.drain())

    def finish(self) -> dict[str, Any]:
        shards = {s: [vars(x) for x in self.writers[s].close()] for s in SPLITS}
        if self.hash_file is not None:
            self.hash_file.flush()
            self.hash_file.close()
            self.hash_file = None
        return shards

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            for w in self.writers.values():
                w.close()
            if self.hash_file is not None:
                self.hash_file.close()
        for path in self.files():
            path.unlink(missing_ok=True)


def _load_hashes(out_dir: Path, base: dict | None) -> HashSet:
    """The content hashes of the documents already in the dataset (for --append)."""
    files = [out_dir / s["hashes"] for s in (base or {}).get("segments", []) if s.get("hashes")]
    files = [f for f in files if f.is_file()]
    total = sum(f.stat().st_size // 8 for f in files)
    hs = HashSet(total + 1024)
    for f in files:
        for h in np.fromfile(f, dtype="<u8").tolist():
            hs.add(h)
    return hs


def clean_stale(out_dir: Path, manifest: dict | None = None) -> list[Path]:
    """Remove files of an interrupted run: this pipeline's files that the manifest does not list."""
    keep = set()
    if manifest:
        keep = {s["file"] for split in SPLITS for s in manifest["splits"][split]["shards"]}
        keep |= {s["hashes"] for s in manifest.get("segments", []) if s.get("hashes")}
    removed = [p for pat in OWNED for p in out_dir.glob(pat) if p.name not in keep and p.is_file()]
    for p in removed:
        p.unlink()
    return removed


def _open_append(out_dir: Path, tokenizer: str | None, cfg: DataConfig) -> tuple[dict[str, Any], Tokenizer]:
    """The dataset being extended and its tokenizer; the split rule becomes the dataset's own."""
    if not is_shards_dir(out_dir):
        raise KititansError(
            f"--append {out_dir}: not a prepared dataset (no {MANIFEST}); run `kititans data`"
        )
    base = load_manifest(out_dir)
    verify_shards(out_dir)
    if tokenizer and sha256_file(Tokenizer.load(tokenizer).model_path) != base["tokenizer_sha256"]:
        raise KititansError(
            f"--append {out_dir}: --tokenizer {tokenizer} is not the tokenizer of this dataset; drop --tokenizer "
            "(the dataset's own is used) or prepare a new dataset"
        )
    cfg.val_fraction, cfg.seed = base["val_fraction"], base["seed"]
    clean_stale(out_dir, base)
    return base, Tokenizer.load(out_dir)


def _new_tokenizer(
    cfg: DataConfig, out_dir: Path, vocab_size: int, tokenizer: str | None, progress: bool, stages: dict
) -> tuple[Tokenizer, Any]:
    """The given tokenizer copied into out_dir, or one trained on a sample (pass 1); (tokenizer, report)."""
    if tokenizer:
        Tokenizer.load(tokenizer).save(out_dir)
        return Tokenizer.load(out_dir), None
    tok, report = build_tokenizer(open_corpus(cfg), cfg, vocab_size, out_dir, progress)
    for line in report.lines():
        log.info("tokenizer: %s", line)
    s = report.sample or {}
    stages["read"] = {"mb": round(s.get("read_bytes", 0) / MB, 3), "seconds": s.get("seconds"),
                      "mb_per_s": s.get("mb_per_s")}  # fmt: skip
    stages["tokenizer"] = {"mb": round(s.get("bytes", 0) / MB, 3), "seconds": s.get("train_seconds"),
                           "mb_per_s": s.get("train_mb_per_s")}  # fmt: skip
    return tok, report


def _encode_segment(
    out_dir: Path, tok: Tokenizer, cfg: DataConfig, base: dict | None, progress: bool, stages: dict
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pass 2 into new shard files: (their shard lists, the segment record for the manifest)."""
    segment = 0 if base is None else max(1, len(base.get("segments", [])))  # format-1 content is segment 0
    corpus = open_corpus(cfg)
    p2 = _Pass2(out_dir, tok, cfg, segment, base)
    t0 = time.perf_counter()
    try:
        p2.run(corpus, progress)
        shards = p2.finish()
    except OSError as e:
        p2.abort()
        if e.errno in FULL_DISK:
            raise disk_full(e, out_dir) from None
        raise
    except BaseException:
        p2.abort()
        raise
    seconds = time.perf_counter() - t0
    stages["encode"] = {"mb": round(p2.read_bytes / MB, 3), "seconds": round(seconds, 3),
                        "mb_per_s": round(p2.read_bytes / MB / max(seconds, 1e-9), 2),
                        "workers": cfg.workers or default_workers()}  # fmt: skip
    record = {
        "index": segment,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sources": [
            {"source": src, "documents": d, "bytes": b, "duplicates": p2.dups.get(src, 0)}
            for src, (d, b) in corpus.stats.per_source.items()
        ],
        "documents_read": corpus.stats.documents,
        "duplicates": p2.duplicates,
        "skipped_files": corpus.stats.skipped_files,
        "hashes": p2.hash_path.name if cfg.dedup else None,
        "tokens": p2.written,
        "shards": {s: [x["file"] for x in shards[s]] for s in SPLITS},
        "stages": stages,
    }
    return shards, record


def prepare_dataset(
    cfg: DataConfig,
    out_dir: str | Path,
    vocab_size: int,
    tokenizer: str | None = None,
    *,
    append: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write (or with append, extend) a dataset in out_dir and return its committed manifest."""
    out_dir = Path(out_dir)
    base, report, stages = None, None, {}
    if append:
        base, tok = _open_append(out_dir, tokenizer, cfg)
    else:
        if is_shards_dir(out_dir):
            raise KititansError(f"{out_dir} already holds prepared shards; choose another --out or delete it")
        out_dir.mkdir(parents=True, exist_ok=True)
        if clean_stale(out_dir):
            log.info("removed the files of an interrupted run in %s", out_dir)
    try:
        if not append:
            tok, report = _new_tokenizer(cfg, out_dir, vocab_size, tokenizer, progress, stages)
        shards, record = _encode_segment(out_dir, tok, cfg, base, progress, stages)
        manifest = _manifest(tok, cfg, base, shards, record, report)
        if manifest["splits"]["train"]["documents"] == 0:
            raise KititansError("the corpus is too small to split: it needs at least 2 documents")
        write_json(out_dir / MANIFEST, manifest)  # the commit
    except BaseException:
        if not append and not is_shards_dir(out_dir):
            clean_stale(out_dir)
        raise
    return manifest


def _manifest(
    tok: Tokenizer, cfg: DataConfig, base: dict | None, shards: dict, record: dict, report: Any
) -> dict[str, Any]:
    splits = {}
    for s in SPLITS:
        listed = (base["splits"][s]["shards"] if base else []) + shards[s]
        splits[s] = {
            "tokens": sum(x["tokens"] for x in listed),
            "documents": sum(x["documents"] for x in listed),
            "shards": listed,
        }
    segments = list(base.get("segments", [])) if base else []
    if base is not None and not segments:  # a format-1 dataset: its content is segment 0
        segments.append(
            {"index": 0, "sources": [{"source": x} for x in base.get("sources", [])], "hashes": None}
        )
    segments.append(record)
    sources = [x["source"] for seg in segments for x in seg["sources"]]
    return {
        "format_version": FORMAT_VERSION,
        "kititans": kititans.__version__,
        "dtype": token_dtype(tok.vocab_size).name,
        "vocab_size": tok.vocab_size,
        "tokenizer_sha256": sha256_file(tok.model_path),
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "dedup": cfg.dedup,
        "train_tokens": splits["train"]["tokens"],
        "val_tokens": splits["val"]["tokens"],
        "train_documents": splits["train"]["documents"],
        "val_documents": splits["val"]["documents"],
        "duplicates": sum(seg.get("duplicates", 0) for seg in segments),
        "sources": sources,
        "tokenizer": (vars(report) if report else (base or {}).get("tokenizer")),
        "splits": splits,
        "segments": segments,
    }


def prepare_data(
    cfg: DataConfig,
    data_dir: str | Path,
    vocab_size: int,
    tokenizer: str | None = None,
    progress: bool = True,
) -> Any:
    """Token data for training: prepared datasets in cfg.sources (a weighted mixture when there are several),
    the run's own prepared data, or a new dataset made from raw sources (or the built-in corpus)."""
    from kititans.data.tokendata import TokenData, open_token_data  # torch: only for training

    prepared = [s for s in cfg.sources if is_shards_dir(s)]
    if prepared and len(prepared) == len(cfg.sources) and not cfg.dataset:
        data = open_token_data(cfg.sources, cfg.weights or None)
        if tokenizer:
            data.check_tokenizer(Tokenizer.load(tokenizer))
        return data
    if cfg.weights or prepared:
        raise KititansError(
            "a weighted mixture (--weights) and several --data entries need prepared datasets only: run "
            "`kititans data SOURCE --tokenizer DIR --out DATASET` for each source first"
        )
    data_dir = Path(data_dir)
    if not is_shards_dir(data_dir):
        prepare_dataset(cfg, data_dir, vocab_size, tokenizer, progress=progress)
    return TokenData(data_dir)
