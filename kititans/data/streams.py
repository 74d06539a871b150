"""Streaming file formats: compressed inputs and document readers that hold one document at a time.

A file is read as a byte stream through its decompressor (.gz .bz2 .xz from the standard library, .zst
through `zstandard`), counting the compressed bytes consumed so progress and ETA are real. Plain text is cut
at blank lines into documents of about DOC_CHARS characters; JSONL is read a line at a time; a JSON array is
parsed one record at a time; parquet a record batch at a time. Nothing reads a whole file into memory.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import json
import lzma
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from kititans.errors import KititansError, require

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".text"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
DOC_CHARS = 2000  # plain text is cut at blank lines into documents of about this size (for the val split)
MAX_PARAGRAPH = 1 << 20  # a "paragraph" with no blank line for 1M characters is cut at a newline
READ_BYTES = 1 << 20
_SEPARATOR = re.compile(r"\n\s*\n")


class BadInput(Exception):
    """A problem inside one file; the reader adds the file name (and skips it under --skip-invalid)."""


def formats(path: Path) -> tuple[str, str | None]:
    """`a.jsonl.zst` -> (".jsonl", "zstd"); `a.txt` -> (".txt", None)."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    inner = suffixes[-2] if comp and len(suffixes) > 1 else (suffixes[-1] if suffixes and not comp else "")
    return inner, comp


def supported(path: Path) -> bool:
    inner, comp = formats(path)
    return inner in SUFFIXES and not (comp and inner in PARQUET_SUFFIXES)


class CountingFile(io.RawIOBase):
    """A raw file that counts the bytes read from disk (the compressed position, for progress)."""

    def __init__(self, path: Path):
        self.f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b)
        self.consumed += n or 0
        return n or 0

    def close(self) -> None:
        self.f.close()
        super().close()


class _ZstdReader(io.RawIOBase):
    """Decompressed bytes of a .zst file (several frames allowed); a truncated last frame is an error
    (zstandard's stream_reader returns short data silently)."""

    def __init__(self, raw: BinaryIO):
        self.zstd = require("zstandard", "data", "reading .zst files")
        self.raw, self.dobj, self.out, self.done = (
            raw,
            self.zstd.ZstdDecompressor().decompressobj(),
            b"",
            False,
        )
        self.seen = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self.out and not self.done:
            chunk = self.raw.read(1 << 16)
            if not chunk:
                if self.seen and not self.dobj.eof:
                    raise EOFError("the last zstd frame is cut short")
                self.done = True
                break
            self.seen = True
            self.out = self.dobj.decompress(chunk)
            while self.dobj.eof and self.dobj.unused_data:  # the next frame of a multi-frame file
                rest = self.dobj.unused_data
                self.dobj = self.zstd.ZstdDecompressor().decompressobj()
                self.out += self.dobj.decompress(rest)
        n = min(len(b), len(self.out))
        b[:n], self.out = self.out[:n], self.out[n:]
        return n


def open_stream(path: Path) -> tuple[BinaryIO, CountingFile]:
    """(decompressed byte stream, the raw file whose .consumed counts compressed bytes)."""
    raw = CountingFile(path)
    _, comp = formats(path)
    if comp == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw  # type: ignore[return-value]
    if comp == "bz2":
        return bz2.BZ2File(raw, "rb"), raw  # type: ignore[return-value]
    if comp == "xz":
        return lzma.LZMAFile(raw, "rb"), raw  # type: ignore[return-value]
    if comp == "zstd":
        return io.BufferedReader(_ZstdReader(raw), READ_BYTES), raw  # type: ignore[return-value]
    return io.BufferedReader(raw, READ_BYTES), raw  # type: ignore[return-value]


def decode_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a decompressor raises on truncated or corrupt input."""
    errs: list[type[BaseException]] = [EOFError, OSError, zlib.error, lzma.LZMAError]
    try:
        import zstandard

        errs.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errs)


# ------------------------------------------------------------------------------------------ plain text
class _Paragraphs:
    """Paragraphs -> documents of about `target` characters (blank-line boundaries, as split_text)."""

    def __init__(self, target: int):
        self.target, self.cur, self.size = target, [], 0

    def add(self, para: str) -> str | None:
        if not para.strip():
            return None
        self.cur.append(para)
        self.size += len(para)
        return self.flush() if self.size >= self.target else None

    def flush(self) -> str | None:
        doc = "\n\n".join(self.cur).strip()
        self.cur, self.size = [], 0
        return doc or None


def split_text(text: str, target: int = DOC_CHARS) -> list[str]:
    """Cut text at blank lines into documents of roughly `target` characters."""
    paras = _Paragraphs(target)
    docs = [d for p in _SEPARATOR.split(text) if (d := paras.add(p))]
    return [*docs, *filter(None, [paras.flush()])]


def text_documents(stream: BinaryIO, target: int = DOC_CHARS) -> Iterator[str]:
    """Documents of a UTF-8 text stream, identical to split_text on the whole text, in bounded memory."""
    dec = codecs.getincrementaldecoder("utf-8")("strict")
    paras, carry, consumed, first = _Paragraphs(target), "", 0, True
    while True:
        chunk = stream.read(READ_BYTES)
        if first and b"\x00" in chunk[:8192]:
            raise BadInput("looks like a binary file, not text")
        first = False
        pending = len(dec.getstate()[0])
        try:
            text = dec.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            raise BadInput(f"invalid UTF-8 at byte offset {consumed - pending + e.start}") from None
        consumed += len(chunk)
        buf = carry + text
        # only separators followed by more text in this buffer are final (a greedy \s* may grow otherwise)
        limit = len(buf.rstrip()) if chunk else len(buf)  # just past the last non-space character
        start = 0
        for m in _SEPARATOR.finditer(buf, 0, limit):
            if (doc := paras.add(buf[start : m.start()])) is not None:
                yield doc
            start = m.end()
        carry = buf[start:]
        if len(carry) > MAX_PARAGRAPH:  # no blank line for a long time: cut at the last newline
            cut = carry.rfind("\n", 0, MAX_PARAGRAPH) + 1 or MAX_PARAGRAPH
            if (doc := paras.add(carry[:cut])) is not None:
                yield doc
            carry = carry[cut:]
        if not chunk:
            break
    for doc in (paras.add(carry), paras.flush()):
        if doc is not None:
            yield doc


# ------------------------------------------------------------------------------------------------ JSON
def _line_record(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise BadInput(f"{where}: invalid UTF-8 at byte {e.start} of the line") from None
    except json.JSONDecodeError as e:
        raise KititansError(f"{where}: not valid JSON ({e.msg})") from None


def json_records(stream: BinaryIO, path: Path) -> Iterator[tuple[Any, str]]:
    """(record, "file:line") from JSONL, or from a JSON array (parsed one element at a time)."""
    head = stream.peek(8192)[:8192] if hasattr(stream, "peek") else b""  # type: ignore[attr-defined]
    if b"\x00" in head:
        raise BadInput("looks like a binary file, not JSON")
    if head.lstrip()[:1] == b"[":
        yield from _json_array(stream, path)
        return
    for lineno, raw in enumerate(stream, 1):
        if raw.strip():
            where = f"{path}:{lineno}"
            yield _line_record(raw, where), where


class _JsonCursor:
    """A growing window over a text stream for parsing one JSON value at a time."""

    def __init__(self, text: io.TextIOBase, path: Path):
        self.text, self.path, self.dec = text, path, json.JSONDecoder()
        self.buf, self.i, self.lines, self.eof, self.want = "", 0, 0, False, 1 << 16

    def fill(self) -> None:
        try:
            got = self.text.read(self.want)
        except UnicodeDecodeError as e:
            raise BadInput(f"invalid UTF-8 (byte {e.start} of a read block)") from None
        self.eof = not got
        self.lines += self.buf.count("\n", 0, self.i)
        self.buf, self.i = self.buf[self.i :] + got, 0

    def peek(self) -> str:
        """The next non-whitespace character ("" at the end)."""
        while True:
            while self.i < len(self.buf) and self.buf[self.i] in " \t\r\n":
                self.i += 1
            if self.i < len(self.buf) or self.eof:
                return self.buf[self.i : self.i + 1]
            self.fill()

    def error(self, pos: int, msg: str) -> KititansError:
        return KititansError(
            f"{self.path}:{self.lines + self.buf.count(chr(10), 0, pos) + 1}: not valid JSON ({msg})"
        )

    def value(self) -> Any:
        while True:
            try:
                rec, self.i = self.dec.raw_decode(self.buf, self.i)
                return rec
            except json.JSONDecodeError as e:
                if self.eof:
                    raise self.error(e.pos, e.msg) from None
                if len(self.buf) - self.i >= self.want:  # one record longer than a block: read bigger blocks
                    self.want = min(self.want * 2, 1 << 26)
                self.fill()


def _json_array(stream: BinaryIO, path: Path) -> Iterator[tuple[Any, str]]:
    cur = _JsonCursor(io.TextIOWrapper(stream, encoding="utf-8", errors="strict"), path)  # type: ignore[arg-type]
    cur.peek()
    cur.i += 1  # the opening "["
    index = 0
    while (c := cur.peek()) != "]":
        if index:
            if c != ",":
                raise cur.error(cur.i, "expected ',' or ']' between records")
            cur.i += 1
            cur.peek()
        yield cur.value(), f"{path}: record {index}"
        index += 1


# --------------------------------------------------------------------------------------------- parquet
def parquet_values(path: Path, text_field: str) -> Iterator[tuple[Any, str, float]]:
    """(value, where, fraction of the file read) per row of the text column (or a chat `messages` column)."""
    pq = require("pyarrow.parquet", "data", "reading .parquet files")
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as e:  # pyarrow raises several types for bad files
        raise BadInput(f"not a readable parquet file ({str(e).splitlines()[0]})") from None
    column = text_field if text_field in names else "messages" if "messages" in names else None
    if column is None:
        raise KititansError(
            f"{path}: no column {text_field!r} (columns: {', '.join(names)}); choose one with --text-field"
        )
    total, row = max(pf.metadata.num_rows, 1), 0
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            yield ({"messages": value} if column == "messages" else value), f"{path}: row {row}", row / total
