"""Speed of one runtime, measured the way llama-bench does (research/gguf_llamacpp.md §7):

- prefill (ppN): N random token ids in one forward call, the first one BOS; tokens/s = N / seconds;
- time to first token at each prompt length: that forward plus picking the next token (argmax);
- decode (tgN): BOS, then N single-token forward calls, each on a random id: end-of-sequence can never stop
  it and sampling is not timed; tokens/s = N / seconds;
- one untimed warm-up of each test, then `trials` timed repetitions, each from an empty cache, with an
  optional pause (`delay_s`, llama-bench's --delay) before each timed one so a passively cooled board can cool;
- `prompts` (a bench pack's stored ids: {"prefill": {"N": ids}, "decode": ids}) replaces the random ids, so
  every device times the same tokens.
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
    delay_s: float = 0.0
    prompts: dict[str, Any] | None = None


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


def time_decode(
    rt: Any, n: int, rng: np.random.Generator, vocab: int, bos: int | None, ids: list[int] | None = None
) -> float:
    """Seconds for n single-token steps after BOS, each fed a random id or the next of `ids` (EOS cannot end
    it)."""
    rt.reset()
    rt.forward([bos if bos is not None and bos >= 0 else 0])
    ids = ids[:n] if ids else rng.integers(0, vocab, size=n).tolist()
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
    fixed = cfg.prompts or {}
    result: dict[str, Any] = {"prefill": {}, "ttft_ms": {}, "skipped": {}}
    result["prompt_ids"] = "stored" if fixed else f"random, seed {cfg.seed}"

    def prompt(n: int) -> list[int]:
        ids = (fixed.get("prefill") or {}).get(str(n))
        return list(ids) if ids and len(ids) == n else random_ids(rng, n, vocab, bos)

    for n in cfg.prompt_tokens:
        if n > ctx:
            result["skipped"][f"pp{n}"] = f"{n} tokens exceed the context of {ctx}"
            continue
        stage(f"prefill {n}")
        for _ in range(cfg.warmup):
            time_prefill(rt, prompt(n))
        fwd, first = [], []
        for _ in range(cfg.trials):
            pause(cfg.delay_s)
            a, b = time_prefill(rt, prompt(n))
            fwd.append(n / a)
            first.append(1000.0 * b)
        result["prefill"][str(n)] = summarize(fwd)
        result["ttft_ms"][str(n)] = summarize(first)
    gen = min(cfg.gen_tokens, ctx - 1)
    if gen < cfg.gen_tokens:
        result["skipped"][f"tg{cfg.gen_tokens}"] = f"decode shortened to {gen} tokens by the context of {ctx}"
    if gen > 0:
        stage(f"decode {gen}")
        ids = fixed.get("decode")
        ids = list(ids[:gen]) if ids and len(ids) >= gen else None
        for _ in range(cfg.warmup):
            time_decode(rt, min(gen, 16), rng, vocab, bos, ids)
        rates = []
        for _ in range(cfg.trials):
            pause(cfg.delay_s)
            rates.append(gen / time_decode(rt, gen, rng, vocab, bos, ids))
        result["decode"] = summarize(rates)
        result["gen_tokens"] = gen
    return result


def pause(seconds: float) -> None:
    """An untimed pause before a trial (--delay), so a throttling device starts each one cooler."""
    if seconds > 0:
        time.sleep(seconds)


def make_prompts(
    prompt_tokens: tuple[int, ...], gen_tokens: int, vocab: int, bos: int | None, seed: int = 0
) -> dict[str, Any]:
    """The ids a bench pack stores so every device times the same tokens: one prompt per length (BOS first)
    and the decode ids, drawn as measure_speed draws them."""
    rng = np.random.default_rng(seed)
    prefill = {str(n): random_ids(rng, n, vocab, bos) for n in prompt_tokens}
    return {"seed": seed, "prefill": prefill, "decode": rng.integers(0, vocab, size=gen_tokens).tolist()}
