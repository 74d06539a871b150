"""The runtimes' multi-sequence interface (add a sequence, step all, fork, truncate, drop) that the server's
engine drives: torch Lite and Titans decode 8 sequences in one pass bit for bit as each alone; Titans ONNX
steps them in turn exactly; llama.cpp puts them in one llama_batch and ONNX Lite in the graph's batch
dimension, close to alone (not batch-invariant: measured in benchmarks/serve_speed.py). About 10 s."""

from __future__ import annotations

import numpy as np
import pytest

from kititans.export import ExportOptions, export_model
from kititans.runtimes import load_runtime
from kititans.runtimes.base import SequenceLimit

LENGTHS = (5, 9, 17, 3, 30, 12, 7, 21)


def prompts(rt) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[rt.codec.bos_id, *rng.integers(5, rt.vocab_size - 1, size=n).tolist()] for n in LENGTHS]


def alone(rt, ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits of each call, one sequence through the runtime's own forward."""
    rt.reset()
    logits = [rt.forward(ids)]
    toks = [int(np.argmax(logits[-1]))]
    for _ in range(steps):
        logits.append(rt.forward([toks[-1]]))
        toks.append(int(np.argmax(logits[-1])))
    return toks, logits


def together(seqs, rows: list[list[int]], steps: int) -> tuple[list[list[int]], list[list[np.ndarray]]]:
    """The same, all rows added to one Sequences object and stepped together."""
    handles, toks, logits = [], [], []
    for ids in rows:
        h, lg = seqs.add(ids)
        handles.append(h)
        toks.append([int(np.argmax(lg))])
        logits.append([lg])
    for _ in range(steps):
        out = seqs.step({h: t[-1] for h, t in zip(handles, toks)})
        for i, h in enumerate(handles):
            logits[i].append(out[h])
            toks[i].append(int(np.argmax(out[h])))
    return toks, logits


def compare(rt, seqs, steps: int = 12) -> tuple[float, float]:
    """(max |logit difference| batched vs alone, share of greedy tokens that differ)."""
    rows = prompts(rt)
    want = [alone(rt, ids, steps) for ids in rows]
    got_toks, got_logits = together(seqs, rows, steps)
    diff = max(float(np.abs(g - w).max()) for (_, wl), gl in zip(want, got_logits) for g, w in zip(gl, wl))
    differ = sum(a != b for (wt, _), gt in zip(want, got_toks) for a, b in zip(wt, gt))
    return diff, differ / (len(rows) * (steps + 1))


def test_torch_lite_batched_decode_is_bit_exact(debug_run):
    rt = load_runtime(debug_run)
    seqs = rt.sequences(12)
    assert seqs.batched and type(seqs).__name__ == "TorchSequences"
    assert compare(rt, seqs) == (0.0, 0.0)  # batch-invariant: every logit equal, bit for bit
    a, _ = seqs.add([rt.codec.bos_id, 7, 8, 9])
    b = seqs.fork(a)
    out = seqs.step({a: 11, b: 11})
    assert np.array_equal(out[a], out[b]) and seqs.length(b) == 5
    assert seqs.truncate(a, 4) and seqs.length(a) == 4
    assert np.array_equal(seqs.step({a: 11})[a], out[b])  # cut back, the same token again: the same logits
    seqs.drop(b)
    assert b not in seqs.lengths
    while len(seqs) < seqs.max_sequences:
        seqs.add([1, 2])
    with pytest.raises(SequenceLimit):
        seqs.add([1, 2])


def test_torch_titans_batched_decode_is_bit_exact(titans_run):
    """Sequences at different positions (the LENGTHS cross memory chunks of 8 and segments of 32 while they
    decode) in one pass, each bit for bit what it gets alone through `forward` (kititans generate's call)."""
    rt = load_runtime(titans_run)
    seqs = rt.sequences(10)
    assert seqs.batched and type(seqs).__name__ == "TorchSequences"
    assert compare(rt, seqs, steps=20) == (0.0, 0.0)
    assert rt.model._rows_independent  # the probe passed: the rows really ran together
    a, _ = seqs.add([1, 5, 6])
    assert not seqs.truncate(a, 2) and seqs.truncate(a, 3)  # a recurrent state only moves forward
    b = seqs.fork(a)
    out = seqs.step({a: 9, b: 9})
    assert np.array_equal(out[a], out[b])


def test_llamacpp_sequences_share_one_decode(debug_run):
    pytest.importorskip("llama_cpp")
    path = export_model(debug_run, "gguf", "f32", options=ExportOptions(progress=False)).path
    rt = load_runtime(path)
    seqs = rt.sequences(10)
    calls = []
    decode = seqs.lib.llama_decode
    seqs.lib = type("Lib", (), {"__getattr__": lambda self, n: getattr(rt._lib, n)})()
    seqs.lib.llama_decode = lambda ctx, batch: (calls.append(batch.n_tokens), decode(ctx, batch))[1]
    diff, differ = compare(rt, seqs)
    assert calls[-1] == len(LENGTHS)  # a decode step: one token of each of the 8 sequences, one call
    assert diff < 1e-3 and differ <= 0.05, (diff, differ)
    a, _ = seqs.add([rt.codec.bos_id, 7, 8, 9])
    b = seqs.fork(a)
    out = seqs.step({a: 11, b: 11})
    assert np.abs(out[a] - out[b]).max() < 1e-4
    assert seqs.truncate(a, 4) and np.abs(seqs.step({a: 11})[a] - out[b]).max() < 1e-4


@pytest.mark.slow
def test_onnx_lite_batches_and_titans_steps_in_turn(debug_run, titans_run):
    pytest.importorskip("onnxruntime")
    opts = ExportOptions(progress=False)
    rt = load_runtime(export_model(debug_run, "onnx", "fp32", options=opts).path)
    seqs = rt.sequences(10)
    assert type(seqs).__name__ == "OnnxBatch"
    diff, differ = compare(rt, seqs)
    assert diff < 1e-3 and differ <= 0.05, (diff, differ)
    a, _ = seqs.add([rt.codec.bos_id, 7, 8, 9])
    b = seqs.fork(a)
    out = seqs.step({a: 11, b: 11})
    assert np.abs(out[a] - out[b]).max() < 1e-5
    assert seqs.truncate(a, 4) and np.abs(seqs.step({a: 11})[a] - out[b]).max() < 1e-5
    titans = load_runtime(export_model(titans_run, "onnx", "fp32", options=opts).path)
    tseqs = titans.sequences(8)
    assert not tseqs.batched and compare(titans, tseqs, steps=10) == (0.0, 0.0)
