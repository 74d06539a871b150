"""Sampling and streaming, written once for every runtime: token ids in, logits out.

A runtime (kititans.runtimes) keeps its own cache; this module only decides the next token and turns ids
into text. The same sampler drives the PyTorch, llama.cpp, ONNX Runtime and CoreML runtimes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kititans.errors import KititansError


class Runtime(Protocol):
    """What a runtime offers generation and benchmarks (see kititans/runtimes/base.py)."""

    name: str
    vocab_size: int
    context_length: int

    @property
    def n_past(self) -> int: ...

    def reset(self) -> None: ...

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray: ...


class Codec(Protocol):
    """Text <-> ids (our Tokenizer, or a runtime's own vocabulary)."""

    stop_ids: list[int]
    bos_id: int
    chat_template: str
    special_tokens: dict[str, int]  # strings a rendered template turns into ids (data/chat.py)

    def encode(self, text: str) -> list[int]: ...

    def encode_special(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class SamplingConfig:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1 = off
    min_p: float = 0.0  # 0 = off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # 1 = off; CTRL-style, divides positive logits of seen tokens
    seed: int | None = None
    max_tokens: int = 256

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def check(self) -> SamplingConfig:
        """Refuse values outside the sampler's ranges with one line naming the setting; returns self."""
        for name, value, ok, valid in (
            ("temperature", self.temperature, self.temperature >= 0, ">= 0 (0 = greedy)"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
            ("top_k", self.top_k, self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("min_p", self.min_p, 0 <= self.min_p < 1, "in [0, 1) (0 = off)"),
            ("repetition_penalty", self.repetition_penalty, self.repetition_penalty > 0, "> 0 (1 = off)"),
            ("max_tokens", self.max_tokens, self.max_tokens >= 1, "an integer >= 1"),
        ):
            if not ok or (isinstance(value, float) and not np.isfinite(value)):
                raise SamplingError(name, f"{name} must be {valid}, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise SamplingError("top_k", f"top_k must be an integer, got {self.top_k!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise SamplingError("max_tokens", f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0
        ):
            raise SamplingError("seed", f"seed must be an integer >= 0, got {self.seed!r}")
        return self


class SamplingError(KititansError):
    """A sampling setting out of range; `param` names it (the CLI flag is --param with dashes)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class Sampler:
    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        cfg = self.cfg
        logits = np.asarray(logits, dtype=np.float64)
        if cfg.repetition_penalty != 1.0 and len(history):
            logits = logits.copy()
            seen = np.unique(np.asarray(history, dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < logits.shape[0])]
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / cfg.repetition_penalty, vals * cfg.repetition_penalty)
        if cfg.greedy:
            return int(np.argmax(logits))
        candidates = np.arange(logits.shape[0])
        if 0 < cfg.top_k < logits.shape[0]:
            candidates = np.argpartition(-logits, cfg.top_k - 1)[: cfg.top_k]
        scaled = logits[candidates] / cfg.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if cfg.min_p > 0:
            probs = np.where(probs >= cfg.min_p * probs.max(), probs, 0.0)
        if cfg.top_p < 1.0:
            order = np.argsort(-probs)
            cum = np.cumsum(probs[order])
            cut = int(np.searchsorted(cum, cfg.top_p * cum[-1])) + 1  # smallest set reaching top_p
            keep = np.zeros_like(probs)
            keep[order[:cut]] = probs[order[:cut]]
            probs = keep
        probs /= probs.sum()
        return int(candidates[self.rng.choice(len(probs), p=probs)])


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0
    finish_reason: str = ""  # stop | length | context

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / max(self.prompt_seconds, 1e-9)

    @property
    def generation_tps(self) -> float:
        return self.generated_tokens / max(self.generate_seconds, 1e-9)


class Chooser:
    """One sequence's next-token rule, step by step (what `Generation` runs, and the server per request):
    `pick(logits)` samples the next token and says whether the sequence ends there. The rules are
    Generation's: a stop id ends it (and is not part of the reply); a cache holding `context_length` tokens ends it
    after that token ("context"); else max_tokens ends it after that token ("length")."""

    def __init__(
        self,
        prompt_ids: Sequence[int],
        sampling: SamplingConfig,
        stop_ids: Sequence[int],
        context_length: int,
    ):
        self.sampling, self.stop_ids = sampling, set(stop_ids)
        self.sampler = Sampler(sampling)
        self.context = list(prompt_ids)  # what the repetition penalty sees: prompt + fed tokens
        self.fed = len(self.context)  # tokens the model's cache holds
        self.context_length = context_length
        self.tokens: list[int] = []  # every sampled token, a final stop id included
        self.finish_reason = ""  # stop | length | context, once the sequence ended

    def pick(self, logits: np.ndarray) -> int:
        """The next token; `finish_reason` is set when the sequence ends with (or, a stop id, at) it."""
        tok = self.sampler(logits, self.context)
        self.tokens.append(tok)
        if tok in self.stop_ids:
            self.finish_reason = "stop"
        elif self.fed >= self.context_length:
            self.finish_reason = "context"
        elif len(self.tokens) >= self.sampling.max_tokens:
            self.finish_reason = "length"
        return tok

    def feed(self, tok: int) -> None:
        """`tok` goes into the model (its logits come next)."""
        self.context.append(tok)
        self.fed += 1


class Generation:
    """Iterate for token ids; `.stats` is complete once iteration ends. Continues the runtime's cache when
    the prompt extends what it already holds (multi-turn chat), otherwise starts over."""

    def __init__(
        self,
        rt: Runtime,
        prompt_ids: Sequence[int],
        sampling: SamplingConfig,
        stop_ids: Sequence[int] = (),
        history: list[int] | None = None,
    ):
        self.rt, self.prompt = rt, list(prompt_ids)
        self.sampling, self.stop_ids = sampling, set(stop_ids)
        self.history = history if history is not None else []  # ids the runtime's cache holds
        self.tokens: list[int] = []
        self.stats = GenerationStats()

    def __iter__(self) -> Iterator[int]:
        rt, hist = self.rt, self.history
        # the cache holds a strict prefix of the prompt: feed only the rest (an equal prompt starts over:
        # the logits after its last token are gone)
        if (
            len(hist) < len(self.prompt)
            and hist == self.prompt[: len(hist)]
            and hist
            and rt.n_past == len(hist)
        ):
            new = self.prompt[len(hist) :]
        else:
            rt.reset()
            hist.clear()
            new = self.prompt
        if len(self.prompt) + 1 > rt.context_length:
            raise ValueError(
                f"prompt of {len(self.prompt)} tokens does not fit the context of {rt.context_length}"
            )
        t0 = time.perf_counter()
        logits = rt.forward(new)
        hist.extend(new)
        self.stats.prompt_tokens, self.stats.prompt_seconds = len(new), time.perf_counter() - t0
        t0 = time.perf_counter()
        chooser = Chooser(self.prompt, self.sampling, self.stop_ids, rt.context_length)
        self.tokens = chooser.tokens
        while True:
            tok = chooser.pick(logits)
            self.stats.generated_tokens += 1
            if chooser.finish_reason == "stop":
                break
            yield tok
            if chooser.finish_reason == "context":
                break
            chooser.feed(tok)
            logits = rt.forward([tok])  # also after the last one: the cache holds the whole reply (chat)
            hist.append(tok)
            if chooser.finish_reason:
                break
        self.stats.finish_reason = chooser.finish_reason
        self.stats.generate_seconds = time.perf_counter() - t0


class TextStream:
    """Token ids -> text deltas, one token at a time; holds back an incomplete UTF-8 sequence (shown as
    U+FFFD) until the token that completes it."""

    def __init__(self, codec: Codec):
        self.codec = codec
        self.ids: list[int] = []
        self.emitted = ""

    def feed(self, tok: int) -> str:
        self.ids.append(tok)
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd") or len(text) <= len(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta

    def flush(self) -> str:
        """What was held back (an incomplete sequence at the end stays U+FFFD)."""
        text = self.codec.decode(self.ids)
        delta = text[len(self.emitted) :] if len(text) > len(self.emitted) else ""
        self.emitted = text if delta else self.emitted
        return delta


def stream_text(gen: Generation, codec: Codec) -> Iterator[str]:
    """Text deltas of a generation; holds back incomplete UTF-8 sequences (shown as U+FFFD)."""
    stream = TextStream(codec)
    for tok in gen:
        if delta := stream.feed(tok):
            yield delta
    if tail := stream.flush():
        yield tail


def generate_text(rt: Runtime, codec: Codec, prompt_ids: Sequence[int], sampling: SamplingConfig) -> str:
    gen = Generation(rt, prompt_ids, sampling, codec.stop_ids)
    return "".join(stream_text(gen, codec))
