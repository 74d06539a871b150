"""Chat data for fine-tuning: readers for JSONL / JSON / Parquet records and plain text, with format detection.

Formats (`--format`, or detected from the first record of each file):
  messages  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  alpaca    {"instruction": ..., "input": ... (optional), "output": ..., "system": ... (optional),
             "history": [[user, assistant], ...] (optional, earlier turns)}
  sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}
  guanaco   {"text": "### Human: ...### Assistant: ...### Human: ..."}
  text      plain text (.txt/.md): a line starting with <system>, <user> or <assistant> opens a turn, the
            following lines continue it; a blank line (or a `---` line) before <user>/<system> starts a new
            conversation, so replies may contain blank lines of their own.

Every conversation is checked: known roles, non-empty content, an optional system message first, then user
and assistant alternating, ending with the assistant. A record that does not fit is a one-line error that
names file:line (JSON arrays: the line where the record starts).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kititans.data.chat import ROLES, Message
from kititans.data.readers import expand_sources
from kititans.data.streams import JSON_SUFFIXES, PARQUET_SUFFIXES, decode_errors, formats, open_stream
from kititans.errors import KititansError, require

FORMATS = ("auto", "messages", "alpaca", "sharegpt", "guanaco", "text")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
_GUANACO_RE = re.compile(r"###\s*(Human|Assistant)\s*:", re.IGNORECASE)
_TEXT_TURN_RE = re.compile(r"^<(system|user|assistant)>[ \t]?(.*)$")


@dataclass
class Conversation:
    messages: list[Message]
    where: str  # "file:line" or "builtin:<index>", for messages about this conversation

    def key(self) -> str:
        return json.dumps(self.messages, ensure_ascii=False, sort_keys=True)


def validate(messages: Any, where: str) -> list[Message]:
    """Checked, whitespace-trimmed messages: [system], user, assistant, user, ..., assistant."""
    if not isinstance(messages, list) or not messages:
        raise KititansError(f"{where}: a conversation needs a non-empty list of messages")
    out: list[Message] = []
    for i, m in enumerate(messages, 1):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            shown = role if isinstance(m, dict) else m
            raise KititansError(f"{where}: unknown role {shown!r} in message {i} (valid: {', '.join(ROLES)})")
        content = m.get("content")
        if not isinstance(content, str) or not content.strip():
            raise KititansError(f"{where}: empty content in message {i} ({role})")
        body = [x for x in out if x["role"] != "system"]
        expected = "user" if not body or body[-1]["role"] == "assistant" else "assistant"
        if role == "system" and out:
            raise KititansError(
                f"{where}: message {i} is a system message; only the first message may be one"
            )
        if role != "system" and role != expected:
            raise KititansError(
                f"{where}: message {i} has role {role!r} where {expected!r} was expected "
                "(after an optional system message, user and assistant turns alternate)"
            )
        out.append({"role": role, "content": content.strip()})
    if out[-1]["role"] != "assistant":
        raise KititansError(
            f"{where}: the conversation ends with a {out[-1]['role']} message; it must end with an assistant reply"
        )
    return out


def detect_format(rec: Any) -> str | None:
    """The record format of one JSON record, or None."""
    if not isinstance(rec, dict):
        return None
    if "messages" in rec:
        return "messages"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if isinstance(rec.get("text"), str) and _GUANACO_RE.search(rec["text"]):
        return "guanaco"
    return None


def _field(rec: dict[str, Any], name: str, where: str, fmt: str, optional: bool = False) -> str:
    value = rec.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise KititansError(f"{where}: the {fmt} record has no {name!r} text (got {type(value).__name__})")
    return value


def _alpaca(rec: dict[str, Any], where: str) -> list[Message]:
    instruction = _field(rec, "instruction", where, "alpaca")
    extra = _field(rec, "input", where, "alpaca", optional=True)
    msgs: list[Message] = []
    if _field(rec, "system", where, "alpaca", optional=True).strip():
        msgs.append({"role": "system", "content": rec["system"]})
    history = rec.get("history") or []
    if not isinstance(history, list) or not all(
        isinstance(h, (list, tuple)) and len(h) == 2 for h in history
    ):
        raise KititansError(f"{where}: alpaca 'history' must be a list of [user, assistant] pairs")
    for q, a in history:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    prompt = instruction.strip() + (f"\n\n{extra.strip()}" if extra.strip() else "")
    msgs += [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": _field(rec, "output", where, "alpaca")},
    ]
    return msgs


def _sharegpt(rec: dict[str, Any], where: str) -> list[Message]:
    turns = rec.get("conversations")
    if not isinstance(turns, list):
        raise KititansError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
    msgs: list[Message] = []
    for i, t in enumerate(turns, 1):
        who = t.get("from") if isinstance(t, dict) else None
        if who not in SHAREGPT_ROLES:
            raise KititansError(
                f"{where}: unknown role {who!r} in turn {i} (valid: {', '.join(SHAREGPT_ROLES)})"
            )
        msgs.append({"role": SHAREGPT_ROLES[who], "content": t.get("value")})
    return msgs


def _guanaco(rec: dict[str, Any], where: str) -> list[Message]:
    text = _field(rec, "text", where, "guanaco")
    parts = _GUANACO_RE.split(text)  # [before, role, content, role, content, ...]
    if parts[0].strip():
        raise KititansError(f"{where}: text before the first '### Human:' marker")
    if len(parts) < 3:
        raise KititansError(f"{where}: no '### Human:' / '### Assistant:' turns in the text")
    roles = {"human": "user", "assistant": "assistant"}
    return [{"role": roles[r.lower()], "content": c} for r, c in zip(parts[1::2], parts[2::2])]


def record_messages(rec: Any, fmt: str, where: str) -> list[Message]:
    """One JSON record of format `fmt` -> validated messages."""
    if not isinstance(rec, dict):
        raise KititansError(f"{where}: a chat record must be a JSON object, got {type(rec).__name__}")
    if fmt == "messages":
        msgs = rec.get("messages")
    elif fmt == "alpaca":
        msgs = _alpaca(rec, where)
    elif fmt == "sharegpt":
        msgs = _sharegpt(rec, where)
    elif fmt == "guanaco":
        msgs = _guanaco(rec, where)
    else:
        raise KititansError(f"{where}: format {fmt!r} is not a JSON record format")
    return validate(msgs, where)


def _json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line, record) for each element of a JSON array, so errors can point at the record's line."""
    dec, n = json.JSONDecoder(), len(text)
    i, line, counted = text.index("[") + 1, 1, 0

    def skip(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip(i)
    if i < n and text[i] == "]":
        return
    while True:
        line += text.count("\n", counted, i)
        counted = i
        try:
            rec, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise KititansError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        yield line, rec
        i = skip(i)
        if i < n and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < n and text[i] == "]" and not text[i + 1 :].strip():
            return
        bad = text.count("\n", 0, i) + 1
        raise KititansError(f"{path}:{bad}: not valid JSON (expected ',' or ']' between records)")


def _json_records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    head = text.lstrip()
    if head.startswith("["):
        for line, rec in _json_array(path, text):
            yield f"{path}:{line}", rec
        return
    if formats(path)[0] == ".json" and head.startswith("{"):
        try:  # one record in a .json file (else: JSON Lines with a .json suffix)
            yield f"{path}:1", json.loads(text)
            return
        except json.JSONDecodeError:
            pass
    for lineno, ln in enumerate(text.splitlines(), 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as e:
            raise KititansError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        yield f"{path}:{lineno}", rec


def _parquet_records(path: Path) -> Iterator[tuple[str, Any]]:
    pq = require("pyarrow.parquet", "data", "reading .parquet files")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for bad files
        raise KititansError(f"{path}: cannot read this parquet file ({str(e).splitlines()[0]})") from None
    for i, rec in enumerate(rows):
        yield f"{path}: row {i}", rec


def parse_text(path: Path | str, text: str) -> list[Conversation]:
    """The plain-text format: <system>/<user>/<assistant> lines open turns (see the module docstring)."""
    convs: list[Conversation] = []
    msgs: list[dict[str, Any]] = []
    start, blank = 0, True

    def close() -> None:
        if msgs:
            for m in msgs:
                m["content"] = "\n".join(m["content"])
            convs.append(Conversation(validate(list(msgs), f"{path}:{start}"), f"{path}:{start}"))
            msgs.clear()

    for lineno, ln in enumerate(text.splitlines(), 1):
        m = _TEXT_TURN_RE.match(ln)
        if ln.strip() == "---":
            close()
            blank = True
            continue
        if m:
            role, rest = m.groups()
            if msgs and blank and role in ("user", "system"):
                close()
            if not msgs:
                start = lineno
            msgs.append({"role": role, "content": [rest]})
        elif msgs:
            msgs[-1]["content"].append(ln)
        elif ln.strip():
            raise KititansError(
                f"{path}:{lineno}: text outside a turn; chat text files mark turns with lines that start "
                "with <user> or <assistant> (and optionally <system>)"
            )
        blank = not ln.strip()
    close()
    return convs


def read_chat_file(path: str | Path, fmt: str = "auto") -> list[Conversation]:
    """All conversations in one file; `fmt` "auto" detects the format from the file type and first record."""
    path = Path(path)
    if fmt not in FORMATS:
        raise KititansError(f"unknown chat format {fmt!r} (valid: {', '.join(FORMATS)})")
    suffix, comp = formats(path)
    if suffix in PARQUET_SUFFIXES:
        records: Iterator[tuple[str, Any]] = _parquet_records(path)
    else:
        try:  # chat sets are small: read whole (decompressed) files
            stream, _ = open_stream(path)
            with stream:
                text = stream.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise KititansError(f"{path}: invalid UTF-8 at byte offset {e.start}") from None
        except decode_errors() as e:
            raise KititansError(f"{path}: truncated or corrupt {comp} data ({e})") from None
        if fmt == "text" or (fmt == "auto" and suffix not in JSON_SUFFIXES):
            return parse_text(path, text)
        records = _json_records(path, text)
    out: list[Conversation] = []
    detected = fmt if fmt != "auto" else None
    for where, rec in records:
        if detected is None:
            detected = detect_format(rec)
            if detected is None:
                keys = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
                raise KititansError(
                    f"{where}: cannot tell the chat format of this record (keys: {keys}); expected 'messages', "
                    "'conversations', 'instruction'+'output', or a 'text' with ### Human:/### Assistant: "
                    "(or name it with --format)"
                )
        out.append(Conversation(record_messages(rec, detected, where), where))
    return out


def read_chat_data(sources: Sequence[str], fmt: str = "auto") -> list[Conversation]:
    """Conversations from files, directories and globs (in sorted file order)."""
    convs: list[Conversation] = []
    for path in expand_sources(list(sources)):
        convs += read_chat_file(path, fmt)
    if not convs:
        raise KititansError(f"no conversations in {', '.join(sources)}")
    return convs


def builtin_conversations(seed: int = 0, n: int = 5000) -> list[Conversation]:
    """The built-in chat examples (kititans.data.builtin), in the same world as the built-in corpus."""
    from kititans.data.builtin import generate_chat_examples

    return [
        Conversation(validate(c, f"builtin:{i}"), f"builtin:{i}")
        for i, c in enumerate(generate_chat_examples(seed, n))
    ]


def split_conversations(
    convs: Sequence[Conversation], val_fraction: float, seed: int = 0
) -> tuple[list[Conversation], list[Conversation]]:
    """Deterministic train/val split by a hash of each conversation's content: duplicates land on the same
    side, and the split does not depend on file order. At least one conversation goes to each side."""
    if len(convs) < 2:
        raise KititansError(f"need at least 2 conversations for a train/val split, got {len(convs)}")

    def score(c: Conversation) -> float:
        h = hashlib.sha1(f"{seed}\0{c.key()}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    scores = [score(c) for c in convs]
    cut = val_fraction
    if not any(s < cut for s in scores):
        cut = min(scores) + 1e-12
    if all(s < cut for s in scores):
        cut = max(scores)
    train = [c for c, s in zip(convs, scores) if s >= cut]
    val = [c for c, s in zip(convs, scores) if s < cut]
    return train, val
