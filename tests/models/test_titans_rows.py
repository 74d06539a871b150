"""Titans' multi-sequence decode step (models/titans/rows.py): rows at their own positions in one pass give
each row the logits of the model's own one-token call (to fp32 rounding) and, batched, exactly the logits of
the same function with that row alone; chunk-closing rows run alone; a failed batch-invariance probe falls
back to one row at a time. Random-weight `titans-debug` models (window 32, chunk 8), a few seconds."""

from __future__ import annotations

import copy

import pytest
import torch

from kititans.models.titans import rows as rows_mod
from kititans.models.titans.model import SPEC as TITANS

LENGTHS = [3, 6, 16, 21, 1, 33, 9, 12, 40]  # after these prompts the next 30 tokens cross chunks and segments


def model(block: str, **over):
    torch.manual_seed(0)
    return TITANS.build(TITANS.make_config("titans-debug", {"block": block, **over})).eval()


def states(m, g):
    out = []
    for n in LENGTHS:
        st = m.new_state(1)
        m(torch.randint(0, m.cfg.vocab_size, (1, n), generator=g), state=st)
        out.append(st)
    return out


@pytest.mark.parametrize(
    "block,over",
    [
        ("mac", {}),
        ("mal", {}),
        ("mag", {}),
        ("mac", {"mem_conv": 4}),  # conv histories: written by every token, undone for a row that closes
        ("mal", {"global_layers": [1]}),  # a full-context layer beside the windowed one
        ("mag", {"hyper_streams": 2}),  # hyper-connections
    ],
    ids=["mac", "mal", "mag", "mac-conv", "mal-global", "mag-hyper"],
)
def test_rows_decode_together_as_alone_and_as_the_model_call(block, over):
    m = model(block, **over)
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        base = states(m, g)
        toks = torch.randint(0, m.cfg.vocab_size, (30, len(LENGTHS)), generator=g).tolist()
        together, alone, plain = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
        for step in toks:
            got = m.decode_rows(step, together, [st.pos for st in together])
            for i, (tok, a, p) in enumerate(zip(step, alone, plain)):
                one = m.decode_rows([tok], [a], [a.pos])[0]
                ref = m(torch.tensor([[tok]]), state=p)[0, -1]  # the in-place one-sequence call
                assert torch.equal(got[i], one), (block, over, i, a.pos)
                torch.testing.assert_close(one, ref, rtol=0, atol=1e-5)
    if "hyper_streams" not in over:  # their mixing products fold the batch into one GEMM: may run one by one
        assert m._rows_independent
    for a, b in zip(together, plain):  # the states moved the same way (positions, memory, rings)
        assert a.pos == b.pos
        for la, lb in zip(a.layers, b.layers):
            for name in la:
                torch.testing.assert_close(la[name], lb[name], rtol=0, atol=1e-5)


def test_a_failed_probe_runs_the_rows_one_at_a_time(monkeypatch):
    """A kernel that gives a row other bits when other rows run beside it (SDPA over the whole batch does on
    this CPU at 2 threads; here made certain: one ulp-sized change whenever more than one row runs): the probe
    must fail, and decode_rows must then answer with the model's own call for every row."""
    per_row = rows_mod.RowsCtx.attend

    def batch_dependent(self, q, k, v, mask):
        y = per_row(self, q, k, v, mask)
        return y * (1 + 1e-6) if q.shape[0] > 1 else y

    monkeypatch.setattr(rows_mod.RowsCtx, "attend", batch_dependent)
    m = model("mal")
    assert not rows_mod.rows_are_independent(m)
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        base = states(m, g)
        a, b = copy.deepcopy(base), copy.deepcopy(base)
        step = [5] * len(LENGTHS)
        got = m.decode_rows(step, a, [st.pos for st in a])
        want = torch.stack([m(torch.tensor([[t]]), state=st)[0, -1] for t, st in zip(step, b)])
    assert m._rows_independent is False and torch.equal(got, want)


def test_a_row_at_the_wrong_position_is_refused():
    m = model("mac")
    st = m.new_state(1)
    with pytest.raises(ValueError, match="cannot take a token"):
        m.decode_rows([5], [st], [3])
