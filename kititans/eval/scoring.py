"""Log-probabilities of continuations on any runtime: token ids in, per-token log-probs out.

A request is an input window (context + continuation minus its last token, already cut to the model's
length) and the continuation; its score is the sum of the continuation tokens' log-probs at the window's
last len(continuation) positions, and "greedy" says whether each of them was the argmax.

Prefix sharing: logits at a position depend only on the tokens before it (every family here is causal), so
a window that is a prefix of another (the choices of a one-token multiple-choice question, a continuation
that extends another) is read from the longer one's logits; only the longest windows are computed.

Where the runtime can batch, several windows go through one call, right-padded (padding after the last
real token is never seen by a causal model): the torch runtime's model takes (B, T) ids, and an ONNX KV-cache
graph takes a batch with an attention mask (OnnxRuntime.step). Other runtimes (llama.cpp, a recurrent ONNX
graph, CoreML) run one window per call from an empty cache (reset + forward(ids, all_logits=True)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

TOKEN_BUDGET = 8192  # tokens per batched call: bounds the (B, T, vocab) logits (128 MiB at a 4k vocabulary)


@dataclass
class Request:
    window: list[int]  # the model's input: (context + continuation)[-(max_len + 1):][:-1]
    continuation: list[int]  # the tokens scored, predicted at the window's last len(continuation) positions


@dataclass
class Scored:
    logprob: float  # sum of the continuation's token log-probs
    greedy: bool  # every continuation token was the argmax
    token_logprobs: np.ndarray  # (n,) float64


# (request index, window, first scored position, log-prob rows (n, vocab) float32): sees every scored row
RowHook = Callable[[int, list[int], int, np.ndarray], None]


class LogitSource(Protocol):
    """Logits (T, vocab) of whole token sequences, each from an empty cache."""

    def logits(self, seqs: Sequence[list[int]]) -> Iterator[tuple[int, np.ndarray]]: ...


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class OneByOne:
    """Any runtime: one sequence per call (reset, forward with all logits)."""

    def __init__(self, rt: Any):
        self.rt = rt

    def logits(self, seqs: Sequence[list[int]]) -> Iterator[tuple[int, np.ndarray]]:
        for i, seq in enumerate(seqs):
            self.rt.reset()
            yield i, np.asarray(self.rt.forward(seq, all_logits=True), dtype=np.float32).reshape(len(seq), -1)


def _batches(seqs: Sequence[list[int]], max_rows: int) -> Iterator[list[int]]:
    """Indices of seqs, longest first, in groups of at most max_rows rows and TOKEN_BUDGET padded tokens."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    group: list[int] = []
    for i in order:
        width = len(seqs[group[0]]) if group else len(seqs[i])
        if group and (len(group) >= max_rows or (len(group) + 1) * width > TOKEN_BUDGET):
            yield group
            group = []
        group.append(i)
    if group:
        yield group


class TorchBatches:
    """The torch runtime's model on right-padded (B, T) batches, without a cache."""

    def __init__(self, rt: Any, batch_size: int):
        self.rt, self.batch_size = rt, max(1, batch_size)

    def logits(self, seqs: Sequence[list[int]]) -> Iterator[tuple[int, np.ndarray]]:
        import torch

        model, device = self.rt.model, self.rt.device
        for group in _batches(seqs, self.batch_size):
            width = len(seqs[group[0]])
            ids = torch.zeros((len(group), width), dtype=torch.long)
            for row, i in enumerate(group):
                ids[row, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
            with torch.inference_mode():
                out = model(ids.to(device)).float().cpu().numpy()  # (B, T, V)
            for row, i in enumerate(group):
                yield i, out[row, : len(seqs[i])]


class OnnxBatches:
    """An ONNX KV-cache graph on right-padded batches with an attention mask (OnnxRuntime.step)."""

    def __init__(self, rt: Any, batch_size: int):
        self.rt, self.batch_size = rt, max(1, batch_size)

    def logits(self, seqs: Sequence[list[int]]) -> Iterator[tuple[int, np.ndarray]]:
        for group in _batches(seqs, self.batch_size):
            width = len(seqs[group[0]])
            ids = np.zeros((len(group), width), np.int64)
            mask = np.zeros_like(ids)
            for row, i in enumerate(group):
                ids[row, : len(seqs[i])], mask[row, : len(seqs[i])] = seqs[i], 1
            pos = np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape)
            out, _ = self.rt.step(ids, mask, np.ascontiguousarray(pos))
            for row, i in enumerate(group):
                yield i, np.asarray(out[row, : len(seqs[i])], dtype=np.float32)


def logit_source(rt: Any, batch_size: int = 8) -> LogitSource:
    """The fastest way this runtime scores whole sequences (batched where it can batch)."""
    if batch_size > 1 and rt.name == "torch" and hasattr(rt, "model"):
        return TorchBatches(rt, batch_size)
    if batch_size > 1 and rt.name == "onnx" and not getattr(rt, "recurrent", True):
        return OnnxBatches(rt, batch_size)
    return OneByOne(rt)


def longest_windows(windows: Sequence[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The windows no other window extends, and for each input window the index of one that extends it.

    Sorted lexicographically, a window that is a prefix of any other is a prefix of its successor, so one
    pass from the end assigns every window to the longest sequence it starts."""
    uniq = sorted({tuple(w) for w in windows})
    owner = list(range(len(uniq)))
    for j in range(len(uniq) - 2, -1, -1):
        a, b = uniq[j], uniq[j + 1]
        if len(a) <= len(b) and b[: len(a)] == a:
            owner[j] = owner[j + 1]
    keep = sorted(set(owner))
    slot = {u: n for n, u in enumerate(keep)}
    where = {uniq[j]: slot[owner[j]] for j in range(len(uniq))}
    return [list(uniq[u]) for u in keep], [where[tuple(w)] for w in windows]


def score(
    source: LogitSource,
    requests: Sequence[Request],
    hook: RowHook | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Scored]:
    """Score every request, computing each longest window once; `hook` sees each request's rows."""
    seqs, owner = longest_windows([r.window for r in requests])
    users: dict[int, list[int]] = {}
    for i, o in enumerate(owner):
        users.setdefault(o, []).append(i)
    out: list[Scored | None] = [None] * len(requests)
    for s, logits in source.logits(seqs):
        for i in users[s]:
            req = requests[i]
            n, end = len(req.continuation), len(req.window)
            rows = log_softmax(logits[end - n : end])  # (n, V)
            cont = np.asarray(req.continuation, dtype=np.int64)
            lp = rows[np.arange(n), cont]
            out[i] = Scored(float(lp.sum()), bool((rows.argmax(axis=1) == cont).all()), lp)
            if hook is not None:
                hook(i, req.window, end - n, rows.astype(np.float32))
        if progress is not None:
            progress(len(users[s]))
    assert all(o is not None for o in out)
    return out  # type: ignore[return-value]
