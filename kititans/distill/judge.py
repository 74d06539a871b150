"""A judge behind an OpenAI-compatible endpoint: a 1-10 score for a conversation (`distill gen --judge`), and
a pairwise verdict between two replies to one prompt (the win-rate measurement in benchmarks/).

The judge answers in text; the first integer 1-10 (score) or the first "A"/"B"/"tie" (verdict) of its reply is
taken, and an answer without one is kept as None (counted, never guessed). Greedy sampling (temperature 0).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kititans.distill.client import Endpoint

RUBRIC = (
    "Rate the assistant's replies in the conversation below for helpfulness, correctness, fluency and "
    "staying on topic, on a scale from 1 (useless) to 10 (excellent). Answer with the number only."
)
PAIRWISE = (
    "Two assistants answered the same user message. Which answer is better (more helpful, correct, fluent "
    "and on topic)? Answer with exactly one of: A, B, tie."
)
_SCORE = re.compile(r"(?<!\d)(10|[1-9])(?!\d)")
_VERDICT = re.compile(r"\b(A|B|tie)\b", re.IGNORECASE)


@dataclass
class Score:
    value: int | None
    raw: str


def transcript(messages: list[dict[str, str]]) -> str:
    return "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in messages)


def parse_score(text: str) -> int | None:
    m = _SCORE.search(text)
    return int(m.group(1)) if m else None


def parse_verdict(text: str) -> str | None:
    m = _VERDICT.search(text)
    return m.group(1).lower() if m else None


async def judge(endpoint: Endpoint, messages: list[dict[str, str]], max_tokens: int = 8) -> Score:
    prompt = f"{RUBRIC}\n\n{transcript(messages)}\n\nScore (1-10):"
    reply = await endpoint.chat(
        [{"role": "user", "content": prompt}], {"temperature": 0.0, "max_tokens": max_tokens}
    )
    return Score(parse_score(reply.text), reply.text)


async def compare(endpoint: Endpoint, prompt: str, a: str, b: str, max_tokens: int = 8) -> str | None:
    """'a', 'b', 'tie' or None (no verdict in the judge's answer)."""
    text = f"{PAIRWISE}\n\nUSER: {prompt}\n\nANSWER A: {a}\n\nANSWER B: {b}\n\nBetter answer (A, B or tie):"
    reply = await endpoint.chat(
        [{"role": "user", "content": text}], {"temperature": 0.0, "max_tokens": max_tokens}
    )
    return parse_verdict(reply.text)
