"""One choice of one request inside the engine: its next-token rule (kititans.generate.Chooser: the sampler,
seed, stop ids and limits of `kititans generate`), its text stream, its stop strings and its log-probs.

`Choice.take(logits)` consumes the logits after the last fed token and returns what to send: a text
delta (possibly empty) and whether the choice has ended; `pending` is then the token to feed next.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kititans.generate import Chooser, SamplingConfig, TextStream

FINISH = {"stop": "stop", "length": "length", "context": "length"}
_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class StopFilter:
    """Cuts streamed text at the first stop sequence, holding back a tail that could be the start of one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop sequence was reached)."""
        self.pending += delta
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = max(
            (k for s in self.stops for k in range(len(s) - 1, 0, -1) if self.pending.endswith(s[:k])),
            default=0,
        )
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TokenText:
    """A token's bytes and text as the log-probs report them: SentencePiece byte pieces (<0xE3>) are their
    byte, every other token what the codec decodes it to alone. Cached per id."""

    def __init__(self, codec: Any):
        self.codec = codec
        self._bytes: dict[int, bytes] = {}

    def bytes(self, tok: int) -> bytes:
        b = self._bytes.get(tok)
        if b is None:
            piece = self.codec.id_to_piece(tok) if hasattr(self.codec, "id_to_piece") else ""
            m = _BYTE.fullmatch(piece)
            b = bytes([int(m.group(1), 16)]) if m else self.codec.decode([tok]).encode("utf-8")
            self._bytes[tok] = b
        return b

    def text(self, tok: int) -> str:
        return self.bytes(tok).decode("utf-8", errors="replace")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities in float64 (V,) or (T, V)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


@dataclass
class TokenLogprob:
    """A token, its log-probability, and the top alternatives (id, logprob), best first."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprob(logp: np.ndarray, tok: int, k: int) -> TokenLogprob:
    """`tok` under the log-probabilities `logp` (V,), with the k best tokens."""
    top: list[tuple[int, float]] = []
    if k > 0:
        best = np.argpartition(-logp, min(k, len(logp) - 1))[:k]
        best = best[np.argsort(-logp[best], kind="stable")]
        top = [(int(i), float(logp[i])) for i in best]
    return TokenLogprob(int(tok), float(logp[tok]), top)


def prompt_logprobs(logits: np.ndarray, ids: Sequence[int], k: int, skip_first: bool) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the ones before it, from the prompt's logits (T, V). The
    first token has none (None), unless it is the BOS the server added, which is left out: then every token
    of the prompt's text has one."""
    out = [] if skip_first else [TokenLogprob(int(ids[0]), None)]
    for j in range(0, len(ids) - 1, 256):  # rows in blocks: (256, V) float64 at a time
        logp = log_softmax(logits[j : min(j + 256, len(ids) - 1)])
        out += [token_logprob(logp[r], ids[j + r + 1], k) for r in range(len(logp))]
    return out


class Choice:
    def __init__(
        self, index: int, prompt: list[int], sampling: SamplingConfig, stop_ids: Sequence[int],
        stops: Sequence[str], context_length: int, codec: Any, logprobs: int | None,
    ):  # fmt: skip
        self.index = index
        self.chooser = Chooser(prompt, sampling, stop_ids, context_length)
        self.stream, self.stop = TextStream(codec), StopFilter(stops)
        self.logprobs = logprobs  # None: not asked
        self.seq: int | None = None
        self.pending: int | None = None  # the token to feed at the next step
        self.text = ""  # sent so far
        self.records: list[TokenLogprob] = []  # generated tokens (with log-probs when asked)
        self.prompt_records: list[TokenLogprob] = []  # echo + logprobs
        self.finish_reason: str | None = None
        self.first_token_at: float | None = None
        self.sent_records = 0  # records already sent in stream chunks
        self.cut = False  # a stop string cut the text
        # echo + logprobs (scoring): the generated token's log-prob is reported even when it is an end-of-turn
        # id, so a client always gets prompt + max_tokens rows (lm-eval reads token_logprobs[ctxlen:-1])
        self.keep_stop_record = False

    @property
    def completion_tokens(self) -> int:
        return len(self.chooser.tokens)

    def take(self, logits: np.ndarray) -> tuple[str, bool]:
        """Pick the next token from `logits`; (text to send, whether the choice ended)."""
        ch = self.chooser
        tok = ch.pick(logits)
        if self.logprobs is not None:
            self.records.append(token_logprob(log_softmax(logits), tok, self.logprobs))
        else:
            self.records.append(TokenLogprob(tok, None))
        if ch.finish_reason == "stop":  # an end-of-turn id: not part of the reply
            if not self.keep_stop_record:
                self.records.pop()
            return self._end("stop", self.stream.flush())
        out, hit = self.stop.feed(self.stream.feed(tok))
        if not hit and ch.finish_reason:
            more, hit = self.stop.feed(self.stream.flush())
            out += more
        if hit:
            self.cut = True
            return self._end("stop", out, flush=False)
        if ch.finish_reason:
            return self._end(FINISH[ch.finish_reason], out)
        ch.feed(tok)
        self.pending = tok
        self.text += out
        return out, False

    def _end(self, reason: str, out: str, flush: bool = True) -> tuple[str, bool]:
        if flush:
            out += self.stop.flush()
        self.text += out
        self.finish_reason = reason
        self.pending = None
        return out, True

    def end(self, reason: str) -> None:
        """Ended from outside (a prompt-only request, the deadline)."""
        self.finish_reason, self.pending = reason, None

    def visible_records(self, token_text: TokenText) -> list[TokenLogprob]:
        """The generated tokens whose text starts inside the reply (a stop string cut the rest)."""
        if not self.cut:
            return list(self.records)
        limit, at, out = len(self.text.encode("utf-8")), 0, []
        for r in self.records:
            if at >= limit:
                break
            out.append(r)
            at += len(token_text.bytes(r.token))
        return out


def text_offsets(records: Sequence[TokenLogprob], token_text: TokenText, start: int = 0) -> list[int]:
    """Character offset of each token in the text the tokens decode to (from `start`)."""
    dec, at, out = codecs.getincrementaldecoder("utf-8")(errors="ignore"), start, []
    for r in records:
        out.append(at)
        at += len(dec.decode(token_text.bytes(r.token)))
    return out
