from __future__ import annotations

import numpy as np
import pytest

from kititans.bench.quality import (
    chunk_logprobs,
    compare,
    log_softmax,
    make_chunks,
    measure,
    save_reference,
    scored_slice,
    targets,
)
from kititans.runtimes import load_runtime


def test_chunks_follow_llama_perplexity():
    chunks = make_chunks(list(range(100, 140)), n_ctx=8, bos_id=1)
    assert len(chunks) == 5 and all(c[0] == 1 and len(c) == 8 for c in chunks)
    assert chunks[1][1:] == list(range(109, 116))
    assert scored_slice(8) == slice(4, 7)
    assert targets(chunks[:1]).tolist() == [105, 106, 107]


def test_identical_distributions_have_zero_drift():
    rng = np.random.default_rng(0)
    lp = log_softmax(rng.normal(size=(50, 20)) * 3)
    y = rng.integers(0, 20, 50)
    q = compare(lp, lp, y)
    assert q.kld_mean == pytest.approx(0, abs=1e-9) and q.same_top == 1.0 and q.ppl_ratio == pytest.approx(1)
    noisy = compare(lp, log_softmax(lp + rng.normal(size=lp.shape)), y)
    assert noisy.kld_mean > 0.05 and noisy.same_top < 1.0 and abs(noisy.delta_p_rms) > 0


def test_kld_matches_the_definition():
    base = np.log(np.array([[0.7, 0.2, 0.1]], dtype=np.float64))
    quant = np.log(np.array([[0.5, 0.3, 0.2]], dtype=np.float64))
    q = compare(base.astype(np.float32), quant.astype(np.float32), np.array([1]))
    expected = float((np.exp(base) * (base - quant)).sum())
    assert q.kld_mean == pytest.approx(expected, rel=1e-5)
    assert q.delta_p_mean == pytest.approx(0.1, rel=1e-4)


def test_reference_file_round_trip_with_the_torch_runtime(debug_run, tmp_path):
    rt = load_runtime(debug_run)
    codec = rt.codec
    ids = codec.encode("Once upon a time, Lily went to the park with her dog. " * 30)
    chunks = make_chunks(ids, 32, codec.bos_id, max_chunks=3)
    ref = tmp_path / "ref.npz"
    save_reference(ref, chunks, chunk_logprobs(rt, chunks))
    q = measure(rt, ref)
    assert q.tokens == 3 * 15 and q.same_top == 1.0 and q.kld_mean < 1e-4  # float16 storage only
    assert 1.0 < q.ppl < 512
