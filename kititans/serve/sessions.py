"""Sessions in `kititans serve --sessions DIR`: a Titans conversation's fixed-size state kept in a file between
requests and between server processes (the file format of kititans/runtimes/session.py), one folder per tenant.

A request names its session (`"session": "me"`). The file holds the tokens the state has consumed; a state
cannot go back, so the request's prompt must begin with them, and only the rest is fed. After the reply the
state (prompt + the reply tokens fed back) replaces the file atomically. Only a request that finishes saves:
one that is cancelled (its client went away), cut by a deadline or fails leaves the file as it was, so the
client can resend the same turn. See docs/serve.md "Sessions".

Tenancy: DIR/<16 hex of sha256 of the request's API key, or "public" without one>/<name>.state. A request
only ever opens a file in its own tenant's folder, so another key's session of the same name is invisible:
the answers are those of a new session. One request at a time per session: a second one gets 409 until the
first has saved (never two writers on one state). One server process per DIR.

Threads: `open` (the name, the lock) runs in the event loop, `read` (the file, the prefix check) in the
request-preparation pool, `resume` / `save` in the engine thread, which owns the runtime.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kititans.errors import KititansError
from kititans.runtimes.session import read_session, save_session, session_path
from kititans.serve.api import ApiError


def tenant_folder(api_token: str) -> str:
    """The folder of a client's sessions: a short hash of its API key (never the key), or "public"."""
    if not api_token:
        return "public"
    return hashlib.sha256(f"kititans-session\0{api_token}".encode()).hexdigest()[:16]


@dataclass
class Ticket:
    """One request's hold on one session: the file, what it holds (read before the request is queued) and
    the lock, released exactly once (after the save, or without saving)."""

    store: SessionStore
    name: str
    path: Path
    tokens: list[int] = field(default_factory=list)  # what the saved state has consumed ([]: a new session)
    tensors: dict[str, np.ndarray] | None = None  # the saved state; None: start from the empty state
    released: bool = False

    def release(self) -> None:
        self.store._release(self)


class SessionStore:
    def __init__(self, root: str | Path, rt: Any):
        """Refuses (one line) a model or runtime that cannot save a session: Titans only."""
        if getattr(rt, "task", "lm") != "lm":
            raise KititansError("--sessions needs a Titans language model, not an encoder")
        try:
            if not all(hasattr(rt, m) for m in ("session_identity", "get_state", "set_state")):
                raise KititansError(f"the {getattr(rt, 'name', '?')} runtime has no session state")
            self.ident = rt.session_identity()
        except KititansError as e:
            raise KititansError(f"--sessions needs a Titans model: {e}") from None
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KititansError(f"--sessions {root}: cannot create the folder ({e.strerror or e})") from None
        self._held: set[Path] = set()
        self._lock = threading.Lock()

    def check_sequences(self, seqs: Any) -> None:
        if not all(hasattr(seqs, m) for m in ("adopt", "select")):
            raise KititansError(
                f"--sessions: the {self.ident.get('runtime')} runtime's sequences cannot load a saved state"
            )

    # -- the event loop: the name and the lock

    def open(self, api_token: str, name: Any) -> Ticket:
        try:
            path = session_path(self.root / tenant_folder(api_token), name)
        except KititansError as e:
            raise ApiError(400, str(e), param="session", code="invalid_session_name") from None
        with self._lock:
            if path in self._held:
                raise ApiError(
                    409,
                    f"Session {name!r} is answering another request: send the next turn when that one has "
                    "finished",
                    param="session",
                    code="session_busy",
                )
            self._held.add(path)
        return Ticket(self, name, path)

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if not ticket.released:
                ticket.released = True
                self._held.discard(ticket.path)

    # -- the preparation pool: the file and the prefix check (the lock is released on any refusal)

    def read(self, ticket: Ticket, prompt: list[int]) -> None:
        try:
            if ticket.path.is_file():
                ticket.tensors, ticket.tokens = self._load(ticket)
            _check_prefix(ticket, prompt)
        except BaseException:
            ticket.release()
            raise

    def _load(self, ticket: Ticket) -> tuple[dict[str, np.ndarray], list[int]]:
        path = ticket.path
        try:
            tensors, tokens, _ = read_session(path, self.ident)
        except KititansError as e:  # the client sees its session's name, never the server's paths
            message = str(e).replace(str(path), f"Session {ticket.name!r}").replace("session file", "session")
            raise ApiError(409, message, param="session", code="session_unusable") from None
        return tensors, tokens

    # -- the engine thread

    def resume(self, ticket: Ticket, rt: Any, seqs: Any) -> int | None:
        """A sequence holding the saved state (None for a new session: the caller adds the prompt from the
        empty state)."""
        if ticket.tensors is None:
            return None
        tensors, ticket.tensors = ticket.tensors, None
        rt.set_state(tensors)
        return seqs.adopt(ticket.tokens)

    def save(self, ticket: Ticket, rt: Any, seqs: Any, seq: int, tokens: list[int]) -> None:
        """Write the sequence's state and the tokens it has consumed over the session file (atomic)."""
        ticket.path.parent.mkdir(mode=0o700, exist_ok=True)
        seqs.select(seq)
        save_session(rt, ticket.path, tokens)


def _check_prefix(ticket: Ticket, prompt: list[int]) -> None:
    held = ticket.tokens
    if len(prompt) > len(held) and prompt[: len(held)] == held:
        return
    at = next((i for i, (a, b) in enumerate(zip(held, prompt)) if a != b), min(len(held), len(prompt)))
    why = (
        "adds nothing to them"
        if prompt == held
        else f"differs from them at token {at}"
        if at < len(prompt)
        else f"is shorter ({len(prompt)} tokens)"
    )
    raise ApiError(
        409,
        f"Your prompt does not continue session {ticket.name!r}: the session holds the {len(held)} tokens of "
        f"the conversation so far (a Titans state cannot go back) and your prompt {why}; send the whole "
        "conversation so far with the reply as it was given, or start a new session name",
        param="session",
        code="session_mismatch",
    )
