"""The torch runtime's --compile: Titans decodes through torch.compile'd steps with the same numbers; a family
without a compiled step says so in one line and decodes eagerly."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from kititans.runtimes.pytorch import TorchRuntime


def _logits(rt: TorchRuntime, ids: list[int]) -> np.ndarray:
    rt.reset()
    rows = [rt.forward(ids[:1])]
    rows += [rt.forward([t]) for t in ids[1:]]
    return np.stack(rows)


def test_compile_on_a_family_without_a_compiled_step_warns_and_runs(debug_run, caplog):
    with caplog.at_level(logging.WARNING, logger="kititans"):
        rt = TorchRuntime(debug_run, compile=True)
    assert not rt.compiled and "no compiled decode step" in caplog.text
    ids = [5, 9, 14, 3]
    np.testing.assert_allclose(_logits(rt, ids), _logits(TorchRuntime(debug_run), ids), atol=1e-5)


@pytest.mark.slow
def test_compiled_titans_runtime_gives_the_eager_logits(titans_run):
    """A minute or two of compiling (one graph per kind of call met)."""
    ids = list(range(3, 3 + 20))  # past a memory chunk (8): the mid-chunk and the chunk-closing steps
    eager = _logits(TorchRuntime(titans_run), ids)
    rt = TorchRuntime(titans_run, compile=True)
    assert rt.compiled
    np.testing.assert_allclose(_logits(rt, ids), eager, atol=1e-4)
