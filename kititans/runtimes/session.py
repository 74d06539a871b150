"""Sessions that outlive a process: the recurrent state of a conversation saved to a file and loaded later.

A Titans model's state has a fixed size (memory weights, momentum, the open chunk's buffer, the attention
rings, the position), so a whole conversation fits in one file of constant size, however long it ran; a KV
cache grows with the text instead. The file is a safetensors file (no pickle):
    tensors     the state in the torch layout (`TitansModel.state_spec` names: "pos", "layers.{i}.{key}"),
                memory state fp32, rings as the runtime holds them (bf16 saved as fp32), and "__tokens__"
                (int64): every token the state has consumed, in order (what a caller needs to continue)
    metadata    {"kititans.session": JSON header}: format, version, the model's identity (family, the
                run's weights sha256, which the exports record as source.weights_sha256), the runtime and
                quantization that wrote it, the state layout (names and shapes), and the caller's `extra`
                (kititans chat: the messages)
Every runtime that runs Titans reads and writes the same layout (torch directly; ONNX: past_<name>; CoreML:
its fp16 states, memory weights as their change from W_0), so a session saved by one runtime loads in another
export of the same run. A file from another model, another state layout or a newer format is refused in one
line, before the runtime's state is touched. Writes are atomic (a temp name, then a rename).

A runtime takes part through three methods: `session_identity() -> dict` (family, weights_sha256, runtime,
quant, layout: {name: shape}), `get_state() -> dict[str, np.ndarray]` (arrays that may share the runtime's
memory, read before its next call) and `set_state(dict)` (the layout above, "pos" included).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kititans.errors import KititansError
from kititans.files import atomic_path

FORMAT = "kititans-session"
VERSION = 1
META_KEY = "kititans.session"
TOKENS = "__tokens__"


@dataclass
class Session:
    """What a loaded session gives back to its caller (the state is already in the runtime)."""

    tokens: list[int]
    extra: dict[str, Any] = field(default_factory=dict)
    header: dict[str, Any] = field(default_factory=dict)


def _identity(rt: Any) -> dict[str, Any]:
    if not all(hasattr(rt, m) for m in ("session_identity", "get_state", "set_state")):
        raise KititansError(f"the {getattr(rt, 'name', '?')} runtime cannot save or load a session")
    return rt.session_identity()


def save_session(
    rt: Any, path: str | Path, tokens: list[int], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the runtime's state, the `tokens` it has consumed and `extra` (JSON) to `path`; the header."""
    from safetensors.numpy import save_file

    ident = dict(_identity(rt))
    state = rt.get_state()
    layout = ident.pop("layout")
    pos = int(np.asarray(state["pos"]).reshape(-1)[0])
    if pos != len(tokens):
        raise KititansError(f"the runtime holds {pos} tokens but the session lists {len(tokens)}")
    tensors = {n: np.ascontiguousarray(a) for n, a in state.items()}
    tensors[TOKENS] = np.asarray(tokens, dtype=np.int64).reshape(-1)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **ident,
        "tokens": len(tokens),
        "layout": layout,
        "extra": extra or {},
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(header)})
    return header


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a session file (one-line errors for anything else)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise KititansError(f"no session file at {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise KititansError(f"{path}: not a kititans session file ({str(e).splitlines()[0]})") from None
    try:
        header = json.loads(meta[META_KEY])
    except (KeyError, ValueError):
        raise KititansError(f"{path}: not a kititans session file (no {META_KEY} header)") from None
    if header.get("format") != FORMAT:
        raise KititansError(f"{path}: not a kititans session file (format {header.get('format')!r})")
    if not isinstance(header.get("version"), int) or header["version"] > VERSION:
        raise KititansError(
            f"{path}: session format version {header.get('version')} is newer than this kititans reads "
            f"({VERSION}): upgrade kititans"
        )
    return header


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def session_path(directory: str | Path, name: str) -> Path:
    """The file of session `name` in `directory` (a server's session store: `kititans serve`'s `session`
    field); a name that is not 1-128 letters, digits, `_ . -` (no leading dot or dash, no path) is refused."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise KititansError(
            f"bad session name {str(name)[:40]!r}: use 1-128 letters, digits, '_', '.', '-' (starting with a "
            "letter or digit)"
        )
    return Path(directory) / f"{name}.state"


def check_compatible(
    header: dict[str, Any], ident: dict[str, Any], layout: dict[str, list[int]], path: Path
) -> None:
    """One-line refusals: another family, other weights, another state layout."""
    if header.get("family") != ident.get("family"):
        raise KititansError(
            f"{path}: this session belongs to a {header.get('family')} model, not this {ident.get('family')} "
            "model: start a new session file"
        )
    mine, theirs = ident.get("weights_sha256"), header.get("weights_sha256")
    if not mine or mine != theirs:
        raise KititansError(
            f"{path}: this session belongs to another model (weights sha256 {str(theirs)[:12]}, this model "
            f"{str(mine)[:12]}): load it with the run it was saved from, or start a new session file"
        )
    saved = header.get("layout") or {}
    if saved.keys() != layout.keys() or any(list(saved[n]) != list(layout[n]) for n in layout):
        diff = next((n for n in layout if list(saved.get(n, [])) != list(layout[n])), None)
        diff = diff or next(n for n in saved if n not in layout)
        raise KititansError(
            f"{path}: the session's state layout differs from this model's (first at {diff}): it was saved by "
            "an export of another kititans version; start a new session file"
        )


def read_session(
    path: str | Path, ident: dict[str, Any]
) -> tuple[dict[str, np.ndarray], list[int], dict[str, Any]]:
    """A session file checked against a runtime's `session_identity()`: its state tensors (the layout's names),
    the tokens it has consumed and its header; nothing is loaded into a runtime (`kititans serve` reads in one
    thread and loads in another)."""
    from safetensors.numpy import load_file

    path = Path(path)
    header = read_header(path)
    check_compatible(header, ident, ident["layout"], path)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise KititansError(f"{path}: the session file is damaged ({str(e).splitlines()[0]})") from None
    tokens = tensors.pop(TOKENS, np.zeros(0, np.int64)).astype(np.int64).tolist()
    if set(tensors) != set(ident["layout"]) or int(tensors["pos"].reshape(-1)[0]) != len(tokens):
        raise KititansError(f"{path}: the session file is damaged (its tensors do not match its header)")
    return tensors, tokens, header


def load_session(rt: Any, path: str | Path) -> Session:
    """Check the file belongs to this runtime's model, then load its state into `rt`; its tokens and extra."""
    tensors, tokens, header = read_session(path, _identity(rt))
    rt.set_state(tensors)
    return Session(tokens=tokens, extra=dict(header.get("extra") or {}), header=header)
