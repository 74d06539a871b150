"""Quality of a quantized model against its reference, with llama.cpp's `llama-perplexity` definitions
(research/gguf_llamacpp.md §6): text is cut into chunks of n_ctx tokens whose first token is BOS, only the
second half of each chunk is scored, and per scored token t with next token y:

    KLD_t   = sum_i p_base,i (ln p_base,i - ln p_q,i)   over i with ln p_base,i > -16     (KL(base || q))
    dp_t    = p_q(y) - p_base(y)
    same_top = argmax p_base == argmax p_q
Means are reported with their standard error sqrt(var / (n - 1)); percentiles interpolate linearly.
The reference log-probs can be stored (float16) so each runtime is measured in its own process: as one .npz
file, or as a folder of .npy files (tokens, logprobs, target_logprobs) that is written row by row and read
memory-mapped, so a device running a bench pack never holds the whole reference in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
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


def save_reference(path: str | Path, chunks: list[list[int]], logprobs: Iterable[np.ndarray]) -> Quality:
    """Store the reference: tokens, log-prob rows (float16, clipped at ln p = -16 like llama-perplexity's
    base file, filled chunk by chunk) and the exact float32 log-prob of each next token. Returns the
    reference's own quality against what was stored (the float16 rounding only)."""
    y_all = targets(chunks)
    per = len(y_all) // len(chunks)
    path = Path(path)
    folder = path.suffix != ".npz"
    with atomic_path(path) as tmp:
        if folder:
            tmp.mkdir()
        store: np.ndarray | None = None
        exact = np.empty(len(y_all), dtype=np.float32)
        parts = []
        for i, lp in enumerate(logprobs):
            if store is None:
                shape = (len(y_all), lp.shape[1])
                store = (
                    np.lib.format.open_memmap(tmp / "logprobs.npy", "w+", np.float16, shape)
                    if folder
                    else np.empty(shape, dtype=np.float16)
                )
            rows, y = slice(i * per, (i + 1) * per), y_all[i * per : (i + 1) * per]
            stored = np.maximum(lp, LOGP_FLOOR).astype(np.float16)
            store[rows] = stored
            exact[rows] = lp[np.arange(len(y)), y]
            parts.append(token_stats(stored, lp, y))
        tokens = np.asarray(chunks, dtype=np.int64)
        if folder and store is not None:
            store.flush()
            del store
            np.save(tmp / "tokens.npy", tokens)
            np.save(tmp / "target_logprobs.npy", exact)
        else:
            with open(tmp, "wb") as f:
                np.savez(f, tokens=tokens, logprobs=store, target_logprobs=exact)
    return with_exact_base(summarize(concat(parts)), path)


def write_reference(path: str | Path, chunks: list[list[int]], rt: Any) -> Quality:
    """The reference of runtime `rt` on `chunks` (see save_reference)."""
    return save_reference(path, chunks, chunk_logprobs(rt, chunks))


def load_reference(path: str | Path) -> tuple[list[list[int]], np.ndarray]:
    """Chunks and reference log-probs (kept float16: a 32k vocabulary costs 64 KB per scored token; from a
    folder they stay memory-mapped)."""
    path = Path(path)
    if path.is_dir():
        tokens = np.load(path / "tokens.npy").tolist()
        return tokens, np.load(path / "logprobs.npy", mmap_mode="r")
    with np.load(path) as z:
        return z["tokens"].tolist(), z["logprobs"]


def reference_info(path: str | Path) -> dict[str, Any]:
    """Shape and bytes of a stored reference (what a device maps), without reading the rows."""
    path = Path(path)
    if path.is_dir():
        rows = np.load(path / "logprobs.npy", mmap_mode="r")
        shape, nbytes = rows.shape, int((path / "logprobs.npy").stat().st_size)
    else:
        with np.load(path) as z:
            shape, nbytes = z["logprobs"].shape, int(path.stat().st_size)
    return {"scored_tokens": int(shape[0]), "vocab": int(shape[1]), "bytes": nbytes}


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


def token_stats(base: np.ndarray, quant: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """Per scored token: KLD, delta-p, same-top, and both NLLs, from (n, vocab) log-probs and next tokens y."""
    if base.shape != quant.shape or len(y) != base.shape[0]:
        raise ValueError(f"shape mismatch: base {base.shape}, quant {quant.shape}, targets {len(y)}")
    b = base.astype(np.float64)
    q = np.maximum(quant.astype(np.float64), -1e30)
    kld = np.where(b > LOGP_FLOOR, np.exp(b) * (b - q), 0.0).sum(axis=1)
    rows = np.arange(len(y))
    return {
        "kld": kld,
        "dp": np.exp(q[rows, y]) - np.exp(b[rows, y]),
        "same": (b.argmax(axis=1) == q.argmax(axis=1)).astype(np.float64),
        "nll_base": -b[rows, y],
        "nll": -q[rows, y],
    }


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(np.sqrt(x.var() / max(len(x) - 1, 1)))


def summarize(st: dict[str, np.ndarray]) -> Quality:
    """The llama-perplexity statistics of per-token arrays (from one chunk or many concatenated)."""
    n = len(st["kld"])
    ppl_b, ppl_q = float(np.exp(st["nll_base"].mean())), float(np.exp(st["nll"].mean()))
    kld_m, kld_se = _mean_se(st["kld"])
    same = float(st["same"].mean())
    pct = lambda x: {f"p{p:g}": float(np.percentile(x, p)) for p in PERCENTILES}  # noqa: E731
    return Quality(
        tokens=n,
        ppl=ppl_q,
        ppl_base=ppl_b,
        ppl_ratio=ppl_q / ppl_b,
        ppl_drift_pct=100.0 * (ppl_q / ppl_b - 1.0),
        kld_mean=kld_m,
        kld_se=kld_se,
        kld_percentiles=pct(st["kld"]),
        kld_max=float(st["kld"].max()),
        same_top=same,
        same_top_se=float(np.sqrt(same * (1 - same) / max(n - 1, 1))),
        delta_p_mean=float(st["dp"].mean()),
        delta_p_rms=float(np.sqrt((st["dp"] ** 2).mean())),
        delta_p_percentiles=pct(st["dp"]),
    )


def compare(base: np.ndarray, quant: np.ndarray, y: np.ndarray) -> Quality:
    """Statistics of `quant` log-probs against `base` log-probs (both (n, vocab)) for next tokens y."""
    return summarize(token_stats(base, quant, y))


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def measure(rt: Any, reference: str | Path, progress: bool = False, desc: str = "quality") -> Quality:
    """Run `rt` on the reference's chunks and compare with the stored reference, one chunk at a time
    (memory stays at one chunk of float64 log-probs, whatever the vocabulary)."""
    chunks, base = load_reference(reference)
    rows: Iterable[np.ndarray] = chunk_logprobs(rt, chunks)
    if progress:  # tqdm only when asked: a device running a bench pack may not have it
        from tqdm import tqdm

        rows = tqdm(rows, total=len(chunks), desc=desc, leave=False)
    parts, offset = [], 0
    for chunk, lp in zip(chunks, rows):
        parts.append(token_stats(base[offset : offset + len(lp)], lp, targets([chunk])))
        offset += len(lp)
    return with_exact_base(summarize(concat(parts)), reference)


def with_exact_base(q: Quality, reference: str | Path) -> Quality:
    """`q` with the reference perplexity from the exact next-token log-probs, when the reference file has
    them. The stored rows are clipped at ln p = -16 (llama-perplexity's floor), which on out-of-domain text
    understates the reference's perplexity and so overstates every pair's drift."""
    if Path(reference).is_dir():
        exact = np.load(Path(reference) / "target_logprobs.npy").astype(np.float64)
    else:
        with np.load(reference) as z:
            if "target_logprobs" not in z.files:
                return q
            exact = z["target_logprobs"].astype(np.float64)
    ppl_b = float(np.exp(-exact.mean()))
    return replace(q, ppl_base=ppl_b, ppl_ratio=q.ppl / ppl_b, ppl_drift_pct=100.0 * (q.ppl / ppl_b - 1.0))
