"""Quality of a quantized model against its reference, with llama.cpp's `llama-perplexity` definitions
(research/gguf_llamacpp.md §6): text is cut into chunks of n_ctx tokens whose first token is BOS, only the
second half of each chunk is scored, and per scored token t with next token y:

    KLD_t   = sum_i p_base,i (ln p_base,i - ln p_q,i)   over i with ln p_base,i > -16     (KL(base || q))
    dp_t    = p_q(y) - p_base(y)
    same_top = argmax p_base == argmax p_q
Means are reported with their standard error sqrt(var / (n - 1)); percentiles interpolate linearly.
The reference log-probs can be stored (float16) so each runtime is measured in its own process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kititans.errors import KititansError
from kititans.files import atomic_path

LOGP_FLOOR = -16.0
PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)


def make_chunks(
    ids: Sequence[int], n_ctx: int, bos_id: int, max_chunks: int | None = None
) -> list[list[int]]:
    """Consecutive chunks of n_ctx tokens with the first token replaced by BOS (llama-perplexity)."""
    if n_ctx < 4:
        raise KititansError("n_ctx must be >= 4 for perplexity")
    n = len(ids) // n_ctx
    if max_chunks:
        n = min(n, max_chunks)
    if n == 0:
        raise KititansError(f"the evaluation text has {len(ids)} tokens, fewer than one chunk of {n_ctx}")
    return [[bos_id, *ids[i * n_ctx + 1 : (i + 1) * n_ctx]] for i in range(n)]


def scored_slice(n_ctx: int) -> slice:
    """Positions whose next-token prediction is scored: the second half, n_ctx/2 .. n_ctx-2."""
    return slice(n_ctx // 2, n_ctx - 1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


def chunk_logprobs(rt: Any, chunks: list[list[int]]) -> Iterator[np.ndarray]:
    """Per chunk, the log-probs (n_scored, vocab) of the scored positions, from a fresh cache each time."""
    for chunk in chunks:
        rt.reset()
        logits = rt.forward(chunk, all_logits=True)
        yield log_softmax(logits[scored_slice(len(chunk))])


def targets(chunks: list[list[int]]) -> np.ndarray:
    return np.concatenate([np.asarray(c[scored_slice(len(c)).start + 1 :], dtype=np.int64) for c in chunks])


def save_reference(path: str | Path, chunks: list[list[int]], logprobs: Iterator[np.ndarray]) -> Path:
    """Store reference tokens and log-probs (float16, clipped at the floor) for later comparisons."""
    lp = np.concatenate([np.maximum(x, LOGP_FLOOR) for x in logprobs]).astype(np.float16)
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, tokens=np.asarray(chunks, dtype=np.int64), logprobs=lp)
    return path


def load_reference(path: str | Path) -> tuple[list[list[int]], np.ndarray]:
    with np.load(path) as z:
        return z["tokens"].tolist(), z["logprobs"].astype(np.float32)


@dataclass
class Quality:
    tokens: int
    ppl: float
    ppl_base: float
    ppl_ratio: float  # PPL(q) / PPL(base)
    ppl_drift_pct: float  # 100 * (ratio - 1)
    kld_mean: float
    kld_se: float
    kld_percentiles: dict[str, float]
    kld_max: float
    same_top: float  # fraction
    same_top_se: float
    delta_p_mean: float
    delta_p_rms: float
    delta_p_percentiles: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    n = len(x)
    return float(x.mean()), float(np.sqrt(x.var() / max(n - 1, 1)))


def perplexity(logprobs: np.ndarray, y: np.ndarray) -> float:
    nll = -logprobs[np.arange(len(y)), y].astype(np.float64)
    return float(np.exp(nll.mean()))


def compare(base: np.ndarray, quant: np.ndarray, y: np.ndarray) -> Quality:
    """Statistics of `quant` log-probs against `base` log-probs (both (n, vocab)) for next tokens y."""
    if base.shape != quant.shape or len(y) != base.shape[0]:
        raise ValueError(f"shape mismatch: base {base.shape}, quant {quant.shape}, targets {len(y)}")
    b = base.astype(np.float64)
    q = np.maximum(quant.astype(np.float64), -1e30)
    keep = b > LOGP_FLOOR
    kld = np.where(keep, np.exp(b) * (b - q), 0.0).sum(axis=1)
    rows = np.arange(len(y))
    dp = np.exp(q[rows, y]) - np.exp(b[rows, y])
    same = (b.argmax(axis=1) == q.argmax(axis=1)).astype(np.float64)
    ppl_b, ppl_q = perplexity(base, y), perplexity(quant, y)
    kld_m, kld_se = _mean_se(kld)
    same_m = float(same.mean())
    pct = lambda x: {f"p{p:g}": float(np.percentile(x, p)) for p in PERCENTILES}  # noqa: E731
    return Quality(
        tokens=len(y),
        ppl=ppl_q,
        ppl_base=ppl_b,
        ppl_ratio=ppl_q / ppl_b,
        ppl_drift_pct=100.0 * (ppl_q / ppl_b - 1.0),
        kld_mean=kld_m,
        kld_se=kld_se,
        kld_percentiles=pct(kld),
        kld_max=float(kld.max()),
        same_top=same_m,
        same_top_se=float(np.sqrt(same_m * (1 - same_m) / max(len(y) - 1, 1))),
        delta_p_mean=float(dp.mean()),
        delta_p_rms=float(np.sqrt((dp**2).mean())),
        delta_p_percentiles=pct(dp),
    )


def measure(rt: Any, reference: str | Path) -> Quality:
    """Run `rt` on the reference's chunks and compare with the stored reference log-probs."""
    chunks, base = load_reference(reference)
    quant = np.concatenate(list(chunk_logprobs(rt, chunks)))
    return compare(base, quant, targets(chunks))
