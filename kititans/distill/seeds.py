"""What conversations start from (seeds) and who takes part (system prompts, user personas).

Seeds, each with a stable `seed_id` (a hash of its content, so re-ordering or extending the file keeps ids):
  topics.txt / prompts.txt   one per line (blank lines and lines starting with # skipped); `--seeds-as topics`
                             (default): the user model opens the chat about it; `--seeds-as prompts`: the line
                             is the user's first message, verbatim
  openings.jsonl             {"messages": [{"role": "system"|"user", ...}, ...]} (the opening, ending with a
                             user message), or {"prompt": "..."} / {"topic": "..."}; an optional "id"
  --corpus FILES             passages of a corpus (any format `kititans data` reads) become topics: the
                             first ~400 characters of each document, every --corpus-every-th document

Personas (YAML):
  system_prompts:            the assistant's system prompt, one drawn per conversation (kept in the record)
    - "You are a friendly assistant."
  personas:                  who the simulated user is (the user model plays them)
    - name: student
      description: "A curious high-school student who asks short questions."
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kititans.distill.records import json_lines
from kititans.errors import KititansError

TOPIC_CHARS = 400


@dataclass
class Seed:
    id: str
    kind: str  # "topic" | "prompt" | "messages"
    text: str = ""  # the topic or the prompt
    messages: list[dict[str, str]] = field(default_factory=list)  # kind "messages": the opening


@dataclass
class Persona:
    name: str
    description: str


@dataclass
class Cast:
    system_prompts: list[str] = field(default_factory=list)
    personas: list[Persona] = field(default_factory=list)


def content_id(*parts: str) -> str:
    return hashlib.sha1("\0".join(parts).encode("utf-8")).hexdigest()[:16]


def _text_seeds(path: Path, kind: str) -> Iterator[Seed]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = line.strip()
            if text and not text.startswith("#"):
                yield Seed(content_id(kind, text), kind, text)


def _opening(rec: Any, where: str) -> Seed:
    if not isinstance(rec, dict):
        raise KititansError(f"{where}: a seed record must be a JSON object")
    given = rec.get("id")
    for key, kind in (("prompt", "prompt"), ("topic", "topic")):
        if isinstance(rec.get(key), str) and rec[key].strip():
            text = rec[key].strip()
            return Seed(str(given) if given is not None else content_id(kind, text), kind, text)
    msgs = rec.get("messages")
    ok = isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs)
    roles = [m.get("role") for m in msgs] if ok else []
    body = roles[1:] if roles[:1] == ["system"] else roles
    alternating = all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(body))
    if not ok or not body or body[-1] != "user" or not alternating:
        raise KititansError(
            f"{where}: a seed needs 'prompt', 'topic', or 'messages' ([system], user, assistant, ..., user)"
        )
    clean = [{"role": m["role"], "content": str(m.get("content") or "").strip()} for m in msgs]
    if not all(m["content"] for m in clean):
        raise KititansError(f"{where}: a seed message has empty content")
    key = json.dumps(clean, ensure_ascii=False, sort_keys=True)
    return Seed(str(given) if given is not None else content_id("messages", key), "messages", "", clean)


def _jsonl_seeds(path: Path) -> Iterator[Seed]:
    for lineno, rec in json_lines(path):
        yield _opening(rec, f"{path}:{lineno}")


def _corpus_seeds(sources: list[str], every: int) -> Iterator[Seed]:
    from kititans.data.readers import Corpus

    for i, doc in enumerate(Corpus(sources)):
        if i % every:
            continue
        text = " ".join(doc.split())
        if len(text) > TOPIC_CHARS:  # cut at a sentence or word boundary
            cut = max(text.rfind(". ", 0, TOPIC_CHARS), text.rfind("。", 0, TOPIC_CHARS))
            text = text[: cut + 1] if cut > TOPIC_CHARS // 3 else text[:TOPIC_CHARS].rsplit(" ", 1)[0]
        if text:
            yield Seed(content_id("topic", text), "topic", text)


class Seeds:
    """The seeds of a run, read once into a list (ids and short texts: small) and checked for emptiness."""

    def __init__(
        self,
        path: str | Path | None = None,
        kind: str = "topics",
        corpus: list[str] | None = None,
        corpus_every: int = 1,
    ):
        if path is None and not corpus:
            raise KititansError("no seeds: pass --seeds FILE (topics, prompts or JSONL openings) or --corpus")
        if kind not in ("topics", "prompts"):
            raise KititansError(f"--seeds-as must be topics or prompts, got {kind!r}")
        if corpus_every < 1:
            raise KititansError(f"--corpus-every must be >= 1, got {corpus_every}")
        items: list[Seed] = []
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise KititansError(f"seeds file not found: {p}")
            jsonl = p.suffix.lower() in (".jsonl", ".json")
            items += list(_jsonl_seeds(p) if jsonl else _text_seeds(p, kind[:-1]))
            if not items:
                raise KititansError(f"{p}: the seeds file is empty (no topics, prompts or openings in it)")
        if corpus:
            items += list(_corpus_seeds(corpus, corpus_every))
        seen: set[str] = set()
        self.items = [s for s in items if not (s.id in seen or seen.add(s.id))]  # type: ignore[func-returns-value]
        self.source = str(path) if path is not None else f"corpus:{','.join(corpus or [])}"

    def __len__(self) -> int:
        return len(self.items)


def load_cast(path: str | Path | None, system: list[str] | None = None) -> Cast:
    """System prompts and personas from YAML (see the module docstring), plus --system prompts."""
    cast = Cast(system_prompts=[s for s in (system or []) if s.strip()])
    if path is None:
        return cast
    import yaml

    p = Path(path)
    if not p.is_file():
        raise KititansError(f"personas file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise KititansError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or set(data) - {"system_prompts", "personas"}:
        raise KititansError(f"{p}: expected a mapping with 'system_prompts' and/or 'personas'")
    for s in data.get("system_prompts") or []:
        if not isinstance(s, str) or not s.strip():
            raise KititansError(f"{p}: each system prompt must be non-empty text")
        cast.system_prompts.append(s.strip())
    for i, entry in enumerate(data.get("personas") or [], 1):
        if isinstance(entry, str):
            entry = {"name": f"persona{i}", "description": entry}
        if not isinstance(entry, dict) or not str(entry.get("description") or "").strip():
            raise KititansError(f"{p}: persona {i} needs a 'description' (and optionally a 'name')")
        cast.personas.append(
            Persona(str(entry.get("name") or f"persona{i}"), str(entry["description"]).strip())
        )
    return cast
