"""Corpus readers: .txt/.md, .jsonl/.json (a text field, or chat `messages`), .parquet, each optionally
.gz/.bz2/.xz/.zst compressed; directories, globs, and hub datasets streamed through the optional `datasets`
library. They yield documents (strings) one at a time, in a deterministic order, and can be iterated more than
once (the tokenizer sample and the shard writer each read the corpus). File formats live in data/streams.py.
"""

from __future__ import annotations

import glob
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kititans.data.streams import (
    COMPRESSIONS,
    DOC_CHARS,
    SUFFIXES,
    BadInput,
    decode_errors,
    formats,
    json_records,
    open_stream,
    parquet_values,
    split_text,
    supported,
    text_documents,
)
from kititans.errors import KititansError, require

__all__ = ["DOC_CHARS", "BuiltinCorpus", "Corpus", "ReadStats", "expand_sources", "record_text", "split_text"]


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    skipped_files: list[str] = field(default_factory=list)
    per_source: dict[str, list[int]] = field(default_factory=dict)  # source -> [documents, bytes]


def _kinds() -> str:
    return f"{', '.join(sorted(SUFFIXES))} (optionally {', '.join(sorted(COMPRESSIONS))} compressed)"


def expand_sources(sources: list[str]) -> list[Path]:
    """Files, directories (searched recursively for known suffixes) and glob patterns -> sorted files."""
    files: list[Path] = []
    for src in sources:
        p = Path(src).expanduser()
        if any(c in src for c in "*?["):
            matched = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
            if not matched:
                raise KititansError(f"no files match {src!r}")
            files += [m for m in matched if m.is_file()]
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and supported(f))
            if not found:
                raise KititansError(f"{p}: no {_kinds()} files in this directory")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise KititansError(f"no such file or directory: {src}")
    for f in files:
        if not supported(f):
            raise KititansError(f"{f}: unsupported file type (use {_kinds()})")
    return files


def record_text(rec: Any, text_field: str, where: str) -> str:
    """A JSON record -> document text: its text field, or its chat messages rendered with the chat template."""
    if isinstance(rec, dict) and isinstance(rec.get(text_field), str):
        return rec[text_field]
    if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
        from kititans.data.chat import check_messages, render_text
        from kititans.data.tokenizer import BOS, CHAT_TEMPLATE

        check_messages(rec["messages"], where)
        return render_text(CHAT_TEMPLATE, rec["messages"]).removeprefix(BOS)
    raise KititansError(f"{where}: no {text_field!r} text field or 'messages' list in this record")


class Corpus:
    """Documents from files/dirs/globs, or streamed from a hub dataset; one document in memory at a time.

    Iterating again re-reads the sources. While iterating, `raw_read` is the number of input bytes consumed
    (compressed bytes for compressed files) out of `raw_total`, and `source` names the current source.
    `max_docs` stops after that many documents.
    """

    def __init__(
        self,
        sources: list[str] | None = None,
        dataset: str | None = None,
        text_field: str = "text",
        skip_invalid: bool = False,
        split: str = "train",
        max_docs: int = 0,
    ):
        self.files = expand_sources(sources or [])
        self.dataset, self.split = dataset, split
        self.text_field = text_field
        self.skip_invalid = skip_invalid
        self.max_docs = max_docs
        self.stats = ReadStats()
        self.raw_total = sum(f.stat().st_size for f in self.files)
        self.raw_read, self.source = 0, ""
        if not self.files and not dataset:
            raise KititansError("no data given: pass files, directories or globs, or --dataset NAME")

    def describe(self) -> list[str]:
        hub = [f"hub:{self.dataset}" + (f"[{self.split}]" if self.split != "train" else "")]
        return [str(f) for f in self.files] + (hub if self.dataset else [])

    def __iter__(self) -> Iterator[str]:
        self.stats, self.raw_read = ReadStats(), 0
        for doc in self._all_docs():
            self.stats.documents += 1
            nbytes = len(doc.encode("utf-8"))
            self.stats.bytes += nbytes
            counts = self.stats.per_source.setdefault(self.source, [0, 0])
            counts[0] += 1
            counts[1] += nbytes
            yield doc
            if self.max_docs and self.stats.documents >= self.max_docs:
                break
        if self.stats.skipped_files:
            warnings.warn(
                f"skipped {len(self.stats.skipped_files)} invalid file(s), e.g. {self.stats.skipped_files[0]}",
                stacklevel=2,
            )
        if self.stats.documents == 0:
            raise KititansError(
                f"the corpus is empty: no text in {', '.join(self.describe()) or 'the sources'}"
            )

    def _all_docs(self) -> Iterator[str]:
        done = 0
        for path in self.files:
            self.source = str(path)
            yield from self._file_docs(path, done)
            done += path.stat().st_size
            self.raw_read = done
        if self.dataset:
            self.source = f"hub:{self.dataset}"
            yield from self._dataset_docs()

    def _file_docs(self, path: Path, offset: int) -> Iterator[str]:
        inner, comp = formats(path)
        self.stats.files += 1
        raw = None
        try:
            if inner in (".parquet",):
                size = path.stat().st_size
                for value, where, frac in parquet_values(path, self.text_field):
                    self.raw_read = offset + int(frac * size)
                    doc = value if isinstance(value, str) else record_text(value, self.text_field, where)
                    if doc.strip():
                        yield doc
                return
            stream, raw = open_stream(path)
            with stream:
                if inner in (".jsonl", ".json"):
                    for rec, where in json_records(stream, path):
                        self.raw_read = offset + raw.consumed
                        doc = record_text(rec, self.text_field, where)
                        if doc.strip():
                            yield doc
                else:
                    for doc in text_documents(stream):
                        self.raw_read = offset + raw.consumed
                        yield doc
        except BadInput as e:
            self._bad(path, str(e))
        except decode_errors() as e:
            if isinstance(e, KititansError) or not comp:
                raise
            at = f" (at compressed byte {raw.consumed:,} of {path.stat().st_size:,})" if raw else ""
            self._bad(path, f"truncated or corrupt {comp} data{at}: {e}")

    def _bad(self, path: Path, why: str) -> None:
        if not self.skip_invalid:
            raise KititansError(f"{path}: {why} (fix it, or pass --skip-invalid to skip such files)")
        self.stats.skipped_files.append(f"{path}: {why}")

    def _dataset_docs(self) -> Iterator[str]:
        datasets = require("datasets", "data", f"--dataset {self.dataset}")
        name, _, config = str(self.dataset).partition(":")
        if Path(self.dataset).exists():  # a local dataset folder (its name may contain ':' on no system)
            name, config = str(self.dataset), ""
        try:
            ds = datasets.load_dataset(name, config or None, split=self.split, streaming=True)
            first = next(iter(ds), None)
        except Exception as e:  # network, auth, not-found and bad-split errors come in many types
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise KititansError(
                f"could not stream dataset {self.dataset!r} split {self.split!r} (the Hugging Face hub needs "
                f"network access; a local dataset folder also works): {msg}"
            ) from None
        if first is None:
            return
        columns = list(first)
        if self.text_field not in columns and "messages" not in columns:
            raise KititansError(
                f"dataset {self.dataset!r} has no {self.text_field!r} column (columns: {', '.join(columns)}); "
                "choose one with --text-field"
            )
        for i, rec in enumerate(ds):
            text = record_text(rec, self.text_field, f"{self.dataset} row {i}")
            if text.strip():
                yield text


class BuiltinCorpus:
    """The built-in corpus (kititans.data.builtin), generated in memory (a few MB)."""

    def __init__(self, seed: int = 0, target_bytes: int = 6_000_000, max_docs: int = 0):
        from kititans.data.builtin import BUILTIN_CORPUS_VERSION, generate_corpus

        self.docs = generate_corpus(seed=seed, target_bytes=target_bytes)
        if max_docs:
            self.docs = self.docs[:max_docs]
        self.version = BUILTIN_CORPUS_VERSION
        self.seed = seed
        nbytes = sum(len(d.encode("utf-8")) for d in self.docs)
        self.stats = ReadStats(files=0, documents=len(self.docs), bytes=nbytes)
        self.stats.per_source[self.describe()[0]] = [len(self.docs), nbytes]
        self.raw_total, self.raw_read, self.source = nbytes, 0, self.describe()[0]

    def describe(self) -> list[str]:
        return [f"builtin:v{self.version}:seed{self.seed}:{self.stats.bytes}B"]

    def __iter__(self) -> Iterator[str]:
        self.raw_read = 0
        for doc in self.docs:
            self.raw_read += len(doc.encode("utf-8"))
            yield doc
