"""Corpus readers: .txt/.md, .jsonl/.json (a text field, or chat `messages`), .parquet, directories, globs,
and hub datasets through the optional `datasets` library. They yield documents (strings) and can be
iterated more than once (the tokenizer and the shard writer each read the corpus).
"""

from __future__ import annotations

import glob
import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kititans.errors import KititansError, require

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES
DOC_CHARS = 2000  # plain text is cut at blank lines into documents of about this size (for the val split)


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    skipped_files: list[str] = field(default_factory=list)


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
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not found:
                raise KititansError(f"{p}: no {', '.join(sorted(SUFFIXES))} files in this directory")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise KititansError(f"no such file or directory: {src}")
    for f in files:
        if f.suffix.lower() not in SUFFIXES:
            raise KititansError(f"{f}: unsupported file type (use {', '.join(sorted(SUFFIXES))})")
    return files


def split_text(text: str, target: int = DOC_CHARS) -> list[str]:
    """Cut text at blank lines into documents of roughly `target` characters."""
    docs, cur, size = [], [], 0
    for para in re.split(r"\n\s*\n", text):
        if not para.strip():
            continue
        cur.append(para)
        size += len(para)
        if size >= target:
            docs.append("\n\n".join(cur).strip())
            cur, size = [], 0
    if cur:
        docs.append("\n\n".join(cur).strip())
    return docs


def _read_text(path: Path, skip_invalid: bool, stats: ReadStats) -> str | None:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        return _bad(path, "looks like a binary file, not text", skip_invalid, stats)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        return _bad(path, f"invalid UTF-8 at byte offset {e.start}", skip_invalid, stats)


def _bad(path: Path, why: str, skip_invalid: bool, stats: ReadStats) -> None:
    if not skip_invalid:
        raise KititansError(f"{path}: {why} (fix it, or pass --skip-invalid to skip such files)")
    stats.skipped_files.append(f"{path}: {why}")
    return None


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


def _read_json(path: Path, text: str, text_field: str) -> Iterator[str]:
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise KititansError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, rec in enumerate(records):
            yield record_text(rec, text_field, f"{path}: record {i}")
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise KititansError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        yield record_text(rec, text_field, f"{path}:{lineno}")


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    pq = require("pyarrow.parquet", "data", "reading .parquet files")
    try:
        table = pq.read_table(path, columns=[text_field])
    except Exception as e:  # pyarrow raises several types for bad files and missing columns
        raise KititansError(f"{path}: cannot read column {text_field!r} ({str(e).splitlines()[0]})") from None
    for value in table.column(text_field).to_pylist():
        if isinstance(value, str):
            yield value


class Corpus:
    """Documents from files/dirs/globs, or from a hub dataset. Iterating again re-reads the sources."""

    def __init__(
        self,
        sources: list[str] | None = None,
        dataset: str | None = None,
        text_field: str = "text",
        skip_invalid: bool = False,
    ):
        self.files = expand_sources(sources or [])
        self.dataset = dataset
        self.text_field = text_field
        self.skip_invalid = skip_invalid
        self.stats = ReadStats()
        if not self.files and not dataset:
            raise KititansError("no data given: pass files, directories or globs, or --dataset NAME")

    def describe(self) -> list[str]:
        return [str(f) for f in self.files] + ([f"hub:{self.dataset}"] if self.dataset else [])

    def __iter__(self) -> Iterator[str]:
        self.stats = ReadStats()
        for path in self.files:
            yield from self._file_docs(path)
        if self.dataset:
            yield from self._dataset_docs()
        if self.stats.skipped_files:
            warnings.warn(
                f"skipped {len(self.stats.skipped_files)} invalid file(s), e.g. "
                f"{self.stats.skipped_files[0]}",
                stacklevel=2,
            )
        if self.stats.documents == 0:
            raise KititansError(
                f"the corpus is empty: no text in {', '.join(self.describe()) or 'the sources'}"
            )

    def _file_docs(self, path: Path) -> Iterator[str]:
        suffix = path.suffix.lower()
        if suffix in PARQUET_SUFFIXES:
            docs: Any = _read_parquet(path, self.text_field)
        else:
            text = _read_text(path, self.skip_invalid, self.stats)
            if text is None:
                return
            docs = _read_json(path, text, self.text_field) if suffix in JSON_SUFFIXES else split_text(text)
        self.stats.files += 1
        for doc in docs:
            if doc.strip():
                self.stats.documents += 1
                self.stats.bytes += len(doc.encode("utf-8"))
                yield doc

    def _dataset_docs(self) -> Iterator[str]:
        datasets = require("datasets", "data", f"--dataset {self.dataset}")
        name, _, config = self.dataset.partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split="train")
        except Exception as e:  # network, auth and not-found errors come in many types
            raise KititansError(
                f"could not load dataset {self.dataset!r} (loading from the Hugging Face hub needs network "
                f"access; a local dataset folder also works): {str(e).splitlines()[0]}"
            ) from None
        if self.text_field not in ds.column_names and "messages" not in ds.column_names:
            raise KititansError(
                f"dataset {self.dataset!r} has no {self.text_field!r} column (columns: {', '.join(ds.column_names)}); "
                "choose one with --text-field"
            )
        for i, rec in enumerate(ds):
            text = record_text(rec, self.text_field, f"{self.dataset} row {i}")
            if text.strip():
                self.stats.documents += 1
                self.stats.bytes += len(text.encode("utf-8"))
                yield text


class BuiltinCorpus:
    """The built-in corpus (kititans.data.builtin), generated in memory."""

    def __init__(self, seed: int = 0, target_bytes: int = 6_000_000):
        from kititans.data.builtin import BUILTIN_CORPUS_VERSION, generate_corpus

        self.docs = generate_corpus(seed=seed, target_bytes=target_bytes)
        self.version = BUILTIN_CORPUS_VERSION
        self.seed = seed
        self.stats = ReadStats(files=0, documents=len(self.docs), bytes=sum(len(d) for d in self.docs))

    def describe(self) -> list[str]:
        return [f"builtin:v{self.version}:seed{self.seed}:{self.stats.bytes}B"]

    def __iter__(self) -> Iterator[str]:
        return iter(self.docs)
