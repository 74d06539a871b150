"""What the llama.cpp runtime (llamacpp.py) and its several-sequence context (llamacpp_batch.py) share: the
library with its backend initialized once per process, its log level, and native stderr captured so a failure
can quote llama.cpp's own reason."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from kititans.errors import require

_BACKEND = threading.Lock()
_backend_ready = False


def library() -> Any:
    """The llama_cpp module, its backend initialized once per process."""
    global _backend_ready
    llama_cpp = require("llama_cpp", "llamacpp", "the llama.cpp runtime")
    with _BACKEND:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True
    return llama_cpp


def set_verbose(verbose: bool) -> None:
    """llama.cpp's log: everything (verbose) or errors only."""
    from llama_cpp._logger import set_verbose as _set

    _set(verbose)


@contextlib.contextmanager
def captured_stderr(enabled: bool = True) -> Iterator[list[str]]:
    """Collect what native code writes to fd 2 (llama.cpp's load log) instead of showing it; the lines are
    in the yielded list afterwards, so a failure can quote them."""
    lines: list[str] = []
    if not enabled:
        yield lines
        return
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            lines += f.read().decode("utf-8", errors="replace").splitlines()


def last_error(lines: list[str]) -> str:
    """The line of a captured llama.cpp log that says what failed (else its last line)."""
    errs = [ln.strip() for ln in lines if "error" in ln.lower() or "fail" in ln.lower()]
    return errs[-1] if errs else (lines[-1].strip() if lines else "no log")
