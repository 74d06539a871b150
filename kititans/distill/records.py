"""Append-only JSONL that is valid up to its last whole record, whatever happens while writing.

Each record goes to the file in one os.write of "json\\n" (looped over short writes). A failed write (a full
disk, a file-size limit) cuts the file back to where the record began, so the file ends with the previous
whole record, and raises one line. A process killed mid-write can leave a partial last line: opening the file
again drops it. Nothing else in the file is ever rewritten, so a reader (or `kititans sft`) sees whole records.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kititans.errors import KititansError


def repair(path: Path) -> int:
    """Drop a partial last line (no newline after it); returns the bytes dropped."""
    if not path.is_file():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        back = min(size, 1 << 16)
        while True:
            f.seek(size - back)
            tail = f.read(back)
            cut = tail.rfind(b"\n")
            if cut >= 0 or back == size:
                keep = size - back + cut + 1 if cut >= 0 else 0
                break
            back = min(size, back * 4)
        if keep != size:
            f.truncate(keep)
    return size - keep


def json_lines(path: Path, hint: str = "") -> Iterator[tuple[int, Any]]:
    """(line number, value) for every non-blank line of a JSONL file; a line that is not JSON is one error
    naming the file and line, with `hint` after the parser's message."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise KititansError(f"{path}:{lineno}: not valid JSON ({e.msg}){hint}") from None
            yield lineno, value


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a JSONL file this module wrote (call repair() first); a bad line is one error."""
    if not path.is_file():
        return
    hint = "; is it a file `kititans distill` wrote? (use another --out)"
    for lineno, rec in json_lines(path, hint):
        if not isinstance(rec, dict):
            raise KititansError(f"{path}:{lineno}: a record must be a JSON object (use another --out)")
        yield rec


class Appender:
    """Whole-record appends to `path` (see the module docstring)."""

    def __init__(self, path: str | Path, what: str = "records"):
        self.path, self.what = Path(path), what
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair(self.path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        self.written = 0

    def write(self, rec: dict[str, Any]) -> None:
        data = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        start = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as e:
            with contextlib.suppress(OSError):  # if this fails too, a later open drops the partial line
                os.ftruncate(self.fd, start)
            raise KititansError(
                f"cannot write {self.path} ({e.strerror or e}): it ends with its last whole record "
                f"({self.written} {self.what} written by this run); free space and re-run to continue"
            ) from None
        self.written += 1

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
