"""The chat template, rendered in one place: `render_conversation` gives token ids and the loss mask for
training, `render_prompt` the ids that `kititans chat` feeds the model, and the same Jinja template is
embedded in GGUF files for llama.cpp. Rendering uses a sandboxed Jinja environment.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kititans.data.tokenizer import BOS, EOS, Tokenizer
from kititans.errors import KititansError

ROLES = ("system", "user", "assistant")
Message = dict[str, str]


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


def render_conversation(tok: Tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 on assistant content and its <|end|>) for a whole conversation.

    Each message is rendered as the difference between the template rendered up to it and up to the
    message before, so any template whose renders are prefixes of each other works; each piece starts at a
    special token, so tokenizing pieces separately equals tokenizing the whole text (as llama.cpp does).
    """
    check_messages(messages)
    prev = render_text(tok.chat_template, [])
    ids = tok.encode_special(prev)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        text = render_text(tok.chat_template, messages[: i + 1])
        if not text.startswith(prev):
            raise KititansError(
                "chat template renders are not prefixes of each other; cannot build a loss mask"
            )
        piece = tok.encode_special(text[len(prev) :])
        piece_mask = [0] * len(piece)
        if m["role"] == "assistant":
            # train on everything after the role tag up to and including the end-of-turn token
            end = max((j for j, t in enumerate(piece) if t in tok.stop_ids), default=len(piece) - 1)
            for j in range(1, end + 1):
                piece_mask[j] = 1
        ids += piece
        mask += piece_mask
        prev = text
    return ids, mask


def render_prompt(tok: Tokenizer, messages: Sequence[Message]) -> list[int]:
    """Ids of the conversation so far plus the assistant header: what generation continues from."""
    check_messages(messages)
    return tok.encode_special(render_text(tok.chat_template, messages, add_generation_prompt=True))


def trim_history(tok: Tokenizer, messages: list[Message], budget: int) -> tuple[list[Message], list[int]]:
    """Drop the oldest turns (keeping a system message) until the prompt fits in `budget` tokens."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system) :]
    while True:
        ids = render_prompt(tok, system + rest)
        if len(ids) <= budget or len(rest) <= 1:
            return system + rest, ids[-budget:] if len(ids) > budget else ids
        # drop the oldest user turn and the assistant reply that followed it
        rest = rest[2:] if len(rest) > 2 and rest[1]["role"] == "assistant" else rest[1:]
