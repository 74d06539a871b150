"""Atomic, durable file writes: every artifact is written under a temporary name in the same folder, flushed to
disk (fsync of the file, or of every file and folder under a folder), renamed into place, and the parent
folder is fsynced after the rename. A crash never leaves a half-written file under a final name, and a power
loss after a write returns never leaves an empty one (rename alone orders nothing on ext4/XFS)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kititans.errors import KititansError

_UMASK: int | None = None


def process_umask() -> int:
    """The process umask, read without changing it (os.umask would set it, racing any thread that creates a
    file meanwhile): `Umask:` in /proc/self/status (Linux >= 4.7), else the mode a fresh file gets."""
    global _UMASK
    if _UMASK is None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("Umask:"):
                    _UMASK = int(line.split()[1], 8)
                    break
        except (OSError, ValueError, IndexError):
            pass
        if _UMASK is None:
            fd, name = tempfile.mkstemp()
            try:
                os.close(fd)
                os.unlink(name)
                fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # the umask applies here
                os.close(fd)
                _UMASK = 0o666 & ~(os.stat(name).st_mode & 0o777) & 0o777
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(name)
    return _UMASK


def _make_readable(path: Path) -> None:
    """Give a finished artifact (a file, or every file and folder under a folder) the umask's default mode:
    shipped files get what a plain open() gives (0644 under umask 022), not the 0600 of temp-file writers."""
    umask = process_umask()
    if path.is_dir() and not path.is_symlink():
        for p in [path, *path.rglob("*")]:
            if not p.is_symlink():
                p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
    elif not path.is_symlink():
        path.chmod(0o666 & ~umask)


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename into it, a new file) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(path: str | Path) -> None:
    """fsync a file, or every file and folder under a folder (folders after their contents)."""
    path = Path(path)
    if path.is_symlink():
        return
    if not path.is_dir():
        fsync_file(path)
        return
    for root, _dirs, files in os.walk(path, topdown=False):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                fsync_file(p)
        fsync_dir(root)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_durably(src: str | Path, dst: str | Path) -> None:
    """Rename src over dst (same folder) and flush the folder: the rename survives a power loss."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is flushed to disk and replaces `path` (file or
    directory), and the folder is flushed after the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to {tmp}")
        _make_readable(tmp)
        fsync_tree(tmp)
        if tmp.is_dir():
            # os.replace cannot replace a non-empty directory: move the old one aside first.
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            if path.exists():
                os.replace(path, old)
            replace_durably(tmp, path)
            _remove(old)
        else:
            replace_durably(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise KititansError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KititansError(f"{path}: not valid JSON ({e})") from None


def sha256_file(path: str | Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        read = 0
        while chunk := f.read(1 << 20):
            h.update(chunk)
            read += len(chunk)
            if limit is not None and read >= limit:
                break
    return h.hexdigest()


def dir_size(path: str | Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
