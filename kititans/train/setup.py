"""The data and tokenizer stages of a run: prepared shards are used as they are; raw sources (or the
built-in corpus) get a tokenizer (trained unless one is given) and are tokenized into shards."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from kititans.config import DataConfig
from kititans.data.readers import BuiltinCorpus, Corpus
from kititans.data.shards import MANIFEST, TokenData, is_shards_dir, is_val, prepare_shards
from kititans.data.tokenizer import Tokenizer, TokenizerReport, evaluate_tokenizer, train_tokenizer

log = logging.getLogger("kititans")


def open_corpus(cfg: DataConfig) -> Corpus | BuiltinCorpus:
    if cfg.sources or cfg.dataset:
        return Corpus(cfg.sources, cfg.dataset, cfg.text_field, cfg.skip_invalid)
    log.info("no data given: generating the built-in corpus (%.1f MB)", cfg.builtin_bytes / 1e6)
    return BuiltinCorpus(seed=cfg.seed, target_bytes=cfg.builtin_bytes)


def build_tokenizer(
    corpus: Corpus | BuiltinCorpus, cfg: DataConfig, vocab_size: int, out_dir: str | Path
) -> tuple[Tokenizer, TokenizerReport]:
    """Train a tokenizer on the train split of `corpus`; report on the val split."""
    log.info("training a SentencePiece BPE tokenizer (vocab %d)", vocab_size)
    docs = list(corpus)
    tok = train_tokenizer((d for d in docs if not is_val(d, cfg.seed, cfg.val_fraction)), out_dir, vocab_size)
    val = [d for d in docs if is_val(d, cfg.seed, cfg.val_fraction)] or docs[-1:]
    return tok, evaluate_tokenizer(tok, val)


def prepare_data(
    cfg: DataConfig,
    data_dir: str | Path,
    vocab_size: int,
    tokenizer: str | None = None,
    progress: bool = True,
) -> TokenData:
    """Shards for training: a prepared shards dir in cfg.sources, shards already in data_dir, or new ones."""
    if len(cfg.sources) == 1 and is_shards_dir(cfg.sources[0]) and not cfg.dataset:
        data = TokenData(cfg.sources[0])
        if tokenizer:
            data.check_tokenizer(Tokenizer.load(tokenizer))
        return data
    data_dir = Path(data_dir)
    if (data_dir / MANIFEST).is_file():
        return TokenData(data_dir)
    corpus = open_corpus(cfg)
    if tokenizer:
        tok = Tokenizer.load(tokenizer)
    else:
        tok, report = build_tokenizer(corpus, cfg, vocab_size, data_dir)
        for line in report.lines():
            log.info("tokenizer: %s", line)
    total = corpus.stats.bytes or None
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress, leave=False
    ) as bar:
        m = prepare_shards(
            corpus,
            tok,
            data_dir,
            sources=corpus.describe(),
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
            progress=bar,
        )
    log.info(
        "data: %d train tokens (%d docs), %d val tokens (%d docs) in %s",
        m.train_tokens,
        m.train_documents,
        m.val_tokens,
        m.val_documents,
        data_dir,
    )
    return TokenData(data_dir)
