"""Filters for teacher-written conversations, each with a count of what it rejected.

Checked in order; the first that fires names the rejection (`reason`):
  empty        an assistant (or user) turn with no text
  truncated    an assistant reply cut by max tokens (finish_reason "length"); --keep-truncated keeps them
  length       an assistant reply shorter than --min-chars or longer than --max-chars
  language     the assistant replies are not mostly in --language (by Unicode script: ja = kana and kanji,
               zh = Han, ko = Hangul, ru/uk/... = Cyrillic, en and other Latin-script languages = Latin)
  repetition   an assistant reply that repeats itself: over --max-repeat of its 10-character windows already
               appeared earlier in it (a language-neutral test: no word splitting)
  refusal      an assistant reply that refuses ("I'm sorry, but I can't", "As an AI", "申し訳ありませんが、...")
  duplicate    the same conversation (case, spacing and punctuation ignored) was already kept
  near_duplicate  MinHash (64 hashes of character 5-grams, 16 bands of 4) Jaccard >= --near-dup with a kept one

Duplicate state holds 8 bytes per kept conversation (exact) plus its 64 MinHash values (near); both are
rebuilt from the output file when a run resumes.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

from kititans.data.dedup import HashSet, doc_hash

# script of a character -> the languages written in it
_SCRIPTS = {"ja": ("kana", "han"), "zh": ("han",), "ko": ("hangul",), "cyrillic": ("cyrillic",)}
CYRILLIC_LANGS = {"ru", "uk", "bg", "sr", "be", "kk", "mk"}
REFUSAL = re.compile(
    r"(i'?m sorry,? but i (can'?t|cannot|am unable|won'?t)|i (can'?t|cannot|am unable to|won'?t) "
    r"(help|assist|provide|comply|do that)|as an ai( language model)?,? i|i'?m not able to (help|assist)"
    r"|申し訳(ありませんが|ございませんが)|お答えできません|お手伝いできません|できかねます|AIとして"
    r"|很抱歉，?我(不能|无法)|作为(一个)?(AI|人工智能))",
    re.IGNORECASE,
)


def script(ch: str) -> str | None:
    """The script of a letter: latin, kana, han, hangul, cyrillic, other; None for non-letters."""
    o = ord(ch)
    if 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9D:
        return "kana"
    if 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF:
        return "han"
    if 0xAC00 <= o <= 0xD7AF or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F:
        return "hangul"
    if not unicodedata.category(ch).startswith("L"):
        return None
    if 0x0400 <= o <= 0x04FF:
        return "cyrillic"
    if o < 0x250 or 0x1E00 <= o <= 0x1EFF or 0xFF21 <= o <= 0xFF5A:
        return "latin"
    return "other"


def language_share(text: str, language: str) -> float:
    """The share of the letters of `text` written in `language`'s script(s) (1.0 for text with no letters)."""
    counts = Counter(s for s in map(script, text) if s is not None)
    total = sum(counts.values())
    if not total:
        return 1.0
    lang = language.lower().split("-")[0]
    if lang in _SCRIPTS:
        want = _SCRIPTS[lang]
    elif lang in CYRILLIC_LANGS:
        want = _SCRIPTS["cyrillic"]
    else:
        want = ("latin",)
    share = sum(counts[s] for s in want) / total
    if lang == "ja" and counts["han"] and not counts["kana"] and total > 20:
        share = 0.0  # long Han-only text is Chinese, not Japanese
    return share


def repeat_share(text: str, n: int = 10) -> float:
    """The share of the n-character windows of `text` that already appeared earlier in it."""
    s = " ".join(text.split())
    if len(s) < 4 * n:
        return 0.0
    seen: set[str] = set()
    dup = 0
    for i in range(len(s) - n + 1):
        w = s[i : i + n]
        if w in seen:
            dup += 1
        else:
            seen.add(w)
    return dup / (len(s) - n + 1)


def normalize(text: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).lower() if ch.isalnum())


class MinHashIndex:
    """Near-duplicate detection: MinHash signatures of character 5-grams, banded LSH buckets."""

    BANDS, ROWS, SHINGLE = 16, 4, 5
    PRIME = (1 << 61) - 1

    def __init__(self, threshold: float = 0.8, seed: int = 1):
        self.threshold = threshold
        rng = np.random.default_rng(seed)
        k = self.BANDS * self.ROWS
        # a, b < p: a*h wraps modulo 2^64 (numpy uint64), which scrambles small h as it must (without the
        # wrap a small shingle hash is the minimum of every permutation); as datasketch does
        self.a = rng.integers(1, self.PRIME, k, dtype=np.uint64)
        self.b = rng.integers(0, self.PRIME, k, dtype=np.uint64)
        self.buckets: dict[tuple[int, bytes], int] = {}
        self.signatures: list[np.ndarray] = []

    def signature(self, text: str) -> np.ndarray:
        s = normalize(text)
        n = self.SHINGLE
        grams = {s[i : i + n] for i in range(max(1, len(s) - n + 1))}
        h = np.array([zlib.crc32(g.encode("utf-8")) for g in grams], dtype=np.uint64)  # (G,)
        mixed = h[:, None] * self.a[None, :] + self.b[None, :]  # (G, k)
        return ((mixed % np.uint64(self.PRIME)) & np.uint64(0xFFFFFFFF)).min(axis=0)  # (k,)

    def query(self, sig: np.ndarray) -> bool:
        """True when a stored signature agrees on >= threshold of its hashes (estimated Jaccard)."""
        seen: set[int] = set()
        for band in range(self.BANDS):
            key = (band, sig[band * self.ROWS : (band + 1) * self.ROWS].tobytes())
            j = self.buckets.get(key)
            if j is not None and j not in seen:
                seen.add(j)
                if float((self.signatures[j] == sig).mean()) >= self.threshold:
                    return True
        return False

    def add(self, sig: np.ndarray) -> None:
        j = len(self.signatures)
        self.signatures.append(sig)
        for band in range(self.BANDS):
            self.buckets.setdefault((band, sig[band * self.ROWS : (band + 1) * self.ROWS].tobytes()), j)


@dataclass
class FilterConfig:
    language: str | None = None  # e.g. "ja", "en"; None: no language filter
    min_language_share: float = 0.6
    min_chars: int = 2
    max_chars: int = 20_000
    max_repeat: float = 0.5
    refusals: bool = True
    keep_truncated: bool = False
    near_dup: float = 0.85  # 0: off


REASONS = ("empty", "truncated", "length", "language", "repetition", "refusal", "duplicate", "near_duplicate")


class Filters:
    """Checks a finished conversation; `counts` holds every reason's rejections and `kept`."""

    def __init__(self, cfg: FilterConfig):
        self.cfg = cfg
        self.exact = HashSet()
        self.near = MinHashIndex(cfg.near_dup) if cfg.near_dup > 0 else None
        self.counts: Counter[str] = Counter()

    def applied(self) -> list[str]:
        c = self.cfg
        out = ["empty", "length", "repetition"]
        out += [] if c.keep_truncated else ["truncated"]
        out += [f"language:{c.language}"] if c.language else []
        out += ["refusal"] if c.refusals else []
        out += ["duplicate"] + ([f"near_duplicate:{c.near_dup}"] if self.near else [])
        return out

    def content_check(self, messages: list[dict[str, str]], finish: list[str | None]) -> str | None:
        """The first content filter that fires (duplicates aside), or None."""
        c = self.cfg
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        if any(not m["content"].strip() for m in messages):
            return "empty"
        if not c.keep_truncated and "length" in finish:
            return "truncated"
        if any(len(r) < c.min_chars or len(r) > c.max_chars for r in replies):
            return "length"
        if c.language and language_share(" ".join(replies), c.language) < c.min_language_share:
            return "language"
        if any(repeat_share(r) > c.max_repeat for r in replies):
            return "repetition"
        if c.refusals and any(REFUSAL.search(r) for r in replies):
            return "refusal"
        return None

    def check(self, messages: list[dict[str, str]], finish: list[str | None]) -> str | None:
        """None (and the conversation is remembered as kept) or the reason it is rejected."""
        reason = self.content_check(messages, finish)
        if reason is None:
            reason = self.dedup(messages)
        self.counts[reason or "kept"] += 1
        return reason

    def dedup(self, messages: list[dict[str, str]]) -> str | None:
        """None (and the conversation is remembered) or "duplicate" / "near_duplicate"."""
        text = "\n".join(f"{m['role']}:{normalize(m['content'])}" for m in messages)
        if not self.exact.add(doc_hash(text.encode("utf-8"))):
            return "duplicate"
        if self.near is not None:
            sig = self.near.signature(" ".join(m["content"] for m in messages if m["role"] == "assistant"))
            if self.near.query(sig):
                return "near_duplicate"
            self.near.add(sig)
        return None
