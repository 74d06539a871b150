"""Speed of one runtime, measured the way llama-bench does (research/gguf_llamacpp.md §7):

- prefill (ppN): N random token ids in one forward call, the first one BOS; tokens/s = N / seconds;
- time to first token at each prompt length: that forward plus picking the next token (argmax);
- decode (tgN): BOS, then N single-token forward calls, each on a random id: end-of-sequence can never stop
  it and sampling is not timed; tokens/s = N / seconds;
- one untimed warm-up of each test, then `trials` timed repetitions, each from an empty cache.
Reported: median (the headline), min, max, quartiles, mean and standard deviation over the trials.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class SpeedConfig:
    prompt_tokens: tuple[int, ...] = (128, 512)
    gen_tokens: int = 128
    trials: int = 5
    warmup: int = 1
    seed: int = 0


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median and spread of a list of measurements (the samples are kept too)."""
    xs = sorted(samples)
    q1, q3 = (float(np.percentile(xs, p)) for p in (25, 75))
    return {
        "median": float(statistics.median(xs)),
        "min": xs[0],
        "max": xs[-1],
        "q1": q1,
        "q3": q3,
        "mean": float(statistics.fmean(xs)),
        "stdev": float(statistics.stdev(xs)) if len(xs) > 1 else 0.0,
        "n": len(xs),
        "samples": [float(x) for x in samples],
    }


def random_ids(rng: np.random.Generator, n: int, vocab: int, bos: int | None) -> list[int]:
    """n random token ids, the first one BOS (as llama-bench fills its prompts)."""
    ids = rng.integers(0, vocab, size=n).tolist()
    if bos is not None and bos >= 0 and n:
        ids[0] = bos
    return ids


def time_prefill(rt: Any, ids: list[int]) -> tuple[float, float]:
    """(seconds of the forward call, seconds until the first new token is chosen) from an empty cache."""
    rt.reset()
    t0 = time.perf_counter()
    logits = rt.forward(ids)
    t1 = time.perf_counter()
    int(np.argmax(logits))
    return t1 - t0, time.perf_counter() - t0


def time_decode(rt: Any, n: int, rng: np.random.Generator, vocab: int, bos: int | None) -> float:
    """Seconds for n single-token steps after BOS, each fed a random id (EOS cannot end it)."""
    rt.reset()
    rt.forward([bos if bos is not None and bos >= 0 else 0])
    ids = rng.integers(0, vocab, size=n).tolist()
    t0 = time.perf_counter()
    for tok in ids:
        rt.forward([tok])
    return time.perf_counter() - t0


def measure_speed(rt: Any, cfg: SpeedConfig, on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Prefill tokens/s and time to first token per prompt length, and decode tokens/s, of a runtime."""
    stage = on_stage or (lambda s: None)
    vocab = int(rt.vocab_size)
    bos = getattr(rt.codec, "bos_id", None)
    ctx = int(rt.context_length)
    rng = np.random.default_rng(cfg.seed)
    result: dict[str, Any] = {"prefill": {}, "ttft_ms": {}, "skipped": {}}
    for n in cfg.prompt_tokens:
        if n > ctx:
            result["skipped"][f"pp{n}"] = f"{n} tokens exceed the context of {ctx}"
            continue
        stage(f"prefill {n}")
        for _ in range(cfg.warmup):
            time_prefill(rt, random_ids(rng, n, vocab, bos))
        fwd, first = [], []
        for _ in range(cfg.trials):
            a, b = time_prefill(rt, random_ids(rng, n, vocab, bos))
            fwd.append(n / a)
            first.append(1000.0 * b)
        result["prefill"][str(n)] = summarize(fwd)
        result["ttft_ms"][str(n)] = summarize(first)
    gen = min(cfg.gen_tokens, ctx - 1)
    if gen < cfg.gen_tokens:
        result["skipped"][f"tg{cfg.gen_tokens}"] = f"decode shortened to {gen} tokens by the context of {ctx}"
    if gen > 0:
        stage(f"decode {gen}")
        for _ in range(cfg.warmup):
            time_decode(rt, min(gen, 16), rng, vocab, bos)
        result["decode"] = summarize([gen / time_decode(rt, gen, rng, vocab, bos) for _ in range(cfg.trials)])
        result["gen_tokens"] = gen
    return result
