"""The chat template, rendered in one place: `render_conversation` gives token ids and the loss mask for
training, `render_prompt` the ids that `kititans chat` / `serve` feed the model, and the same Jinja template is
embedded in GGUF files for llama.cpp. Rendering uses a sandboxed Jinja environment.

Message content is text from a user: it is tokenized as plain text (`codec.encode`), so a message that says
"<|assistant|>" stays characters instead of becoming a role token. The template's own text is tokenized like
llama.cpp tokenizes a rendered prompt (special=True), and text that runs across the boundary between the
template and a message (the newline after a role tag, then the message) is tokenized as one piece, as
llama.cpp does: so for content without special-token strings the ids equal llama.cpp's, with and without
--jinja.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kititans.data.tokenizer import BOS, EOS, Tokenizer
from kititans.errors import KititansError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]
# content stand-ins while the template renders: private-use characters no text or template contains
_MARK = "\ue000{}\ue001"
_MARK_RE = re.compile("\ue000(\\d+)\ue001")


@lru_cache(maxsize=8)
def _compile(template: str) -> Template:
    # the same flags HF transformers and llama-cpp-python use
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg: str) -> None:
        raise TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_text(template: str, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    try:
        return _compile(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=BOS, eos_token=EOS
        )
    except TemplateError as e:
        raise KititansError(f"chat template failed to render: {e}") from None


def check_messages(messages: Sequence[Message], where: str = "conversation") -> None:
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise KititansError(
                f"{where}: unknown role {m.get('role') if isinstance(m, dict) else m!r} "
                f"(valid: {', '.join(ROLES)})"
            )
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise KititansError(f"{where}: empty content in a {m['role']} message")


def special_tokens(codec: Any) -> dict[str, int]:
    """Strings a template's text turns into token ids: our Tokenizer's, or a runtime codec's."""
    table = getattr(codec, "special_tokens", None)
    if table is None:
        raise KititansError(f"{type(codec).__name__} lists no special tokens: it cannot render a chat")
    return table


def segments(
    template: str, messages: Sequence[Message], add_generation_prompt: bool = False
) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_content) pieces, in order; the template's text has is_content
    False. A template that copies a message's content more than once, or transforms it, gives one
    template piece of the whole render (special-token strings in content are then parsed like llama.cpp)."""
    marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
    text = render_text(template, marked, add_generation_prompt)
    found = [int(m.group(1)) for m in _MARK_RE.finditer(text)]
    if sorted(found) != list(range(len(messages))):
        return [(render_text(template, messages, add_generation_prompt), False)]
    out: list[tuple[str, bool]] = []
    pos = 0
    for m in _MARK_RE.finditer(text):
        out += [(text[pos : m.start()], False), (messages[int(m.group(1))]["content"], True)]
        pos = m.end()
    return [*out, (text[pos:], False)]


def encode_segments(codec: Any, parts: Sequence[tuple[str, bool]]) -> list[int]:
    """Ids of rendered pieces: special tokens are parsed in the template's text only; plain text between two
    special tokens (template and content alike) is encoded as one piece."""
    table = special_tokens(codec)
    names = sorted(table, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(s) for s in names)) if names else None
    ids: list[int] = []
    buf = ""
    for text, is_content in parts:
        if is_content or pattern is None:
            buf += text
            continue
        pos = 0
        for m in pattern.finditer(text):
            buf += text[pos : m.start()]
            if buf:
                ids += codec.encode(buf)
                buf = ""
            ids.append(table[m.group()])
            pos = m.end()
        buf += text[pos:]
    if buf:
        ids += codec.encode(buf)
    return ids


def conversation_ids(
    codec: Any, messages: Sequence[Message], add_generation_prompt: bool = False
) -> list[int]:
    """Ids of `messages` rendered with the codec's chat template (content tokenized as plain text)."""
    return encode_segments(codec, segments(codec.chat_template, messages, add_generation_prompt))


def render_conversation(tok: Tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 on assistant content and its <|end|>) for a whole conversation.

    Each message's ids are the difference between the conversation's ids up to it and up to the message
    before, so any template whose renders are prefixes of each other works (each message starts at a special
    token). The mask of an assistant message starts after its header (the generation prompt, e.g.
    "<|assistant|>\\n"): the model learns the reply and the end of turn, never the template.
    """
    check_messages(messages)
    ids = conversation_ids(tok, [])
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        upto = conversation_ids(tok, messages[: i + 1])
        if upto[: len(ids)] != ids:
            raise KititansError(
                "chat template renders are not prefixes of each other; cannot build a loss mask"
            )
        piece = upto[len(ids) :]
        piece_mask = [0] * len(piece)
        if m["role"] == "assistant":
            header = conversation_ids(tok, messages[:i], add_generation_prompt=True)[len(ids) :]
            start = next((j for j, (a, b) in enumerate(zip(piece, header)) if a != b), len(header))
            # train on everything after the header up to and including the end-of-turn token
            end = max((j for j, t in enumerate(piece) if t in tok.stop_ids), default=len(piece) - 1)
            for j in range(max(start, 1), end + 1):
                piece_mask[j] = 1
        ids, mask = upto, mask + piece_mask
    return ids, mask


def render_prompt(tok: Any, messages: Sequence[Message]) -> list[int]:
    """Ids of the conversation so far plus the assistant header: what generation continues from."""
    check_messages(messages)
    return conversation_ids(tok, messages, add_generation_prompt=True)


def trim_history(tok: Any, messages: list[Message], budget: int) -> tuple[list[Message], list[int]]:
    """Drop the oldest turns (keeping a system message) until the prompt fits in `budget` tokens."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system) :]
    while True:
        ids = render_prompt(tok, system + rest)
        if len(ids) <= budget or len(rest) <= 1:
            return system + rest, ids[-budget:] if len(ids) > budget else ids
        # drop the oldest user turn and the assistant reply that followed it
        rest = rest[2:] if len(rest) > 2 and rest[1]["role"] == "assistant" else rest[1:]
