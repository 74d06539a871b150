"""Titans attention without dense (T, T) masks (kititans/models/titans/windowed.py): the blocked path and
FlexAttention's mask_mods compute what the masked reference computes (fp32, 1e-5), forward and backward, for
the attention alone and for whole models of every block."""

from __future__ import annotations

import pytest
import torch

from kititans.models.titans import TitansConfig, TitansModel
from kititans.models.titans import windowed as w

pytestmark = pytest.mark.usefixtures("one_thread")
H, D = 2, 32


def rows(B: int, T: int, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, T, D)] * 3 + [(B, n, D)] * 2
    return [torch.randn(s, generator=g, requires_grad=True) for s in shapes]


def grads_of(fn, inputs: list[torch.Tensor], seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    y = fn(*inputs)
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1))
    gs = torch.autograd.grad(y, inputs, cot)
    return y.detach(), list(gs)


CASES = [  # (kind, T, window, n_persistent): sequences shorter than a block, ragged ends, several blocks
    ("sliding", 45, 12, 2),
    ("sliding", 7, 12, 2),
    ("sliding", 130, 64, 4),
    ("sliding", 64, 16, 0),
    ("sliding", 40, 40, 2),  # a window as long as the sequence (a global layer): the causal kernel
    ("segment", 45, 12, 2),
    ("segment", 64, 16, 0),
    ("segment", 10, 16, 3),
    ("causal", 45, 12, 2),
    ("causal", 33, 12, 0),
]


@pytest.mark.parametrize(("kind", "T", "window", "n"), CASES)
def test_blocked_equals_masked_forward_and_backward(kind, T, window, n):
    inputs = rows(2, T, n, seed=T + window)
    ref, ref_g = grads_of(lambda *a: w.masked_attention(*a, H, window, kind), inputs, T)
    with w.attention_impl("blocked"):
        out, out_g = grads_of(lambda *a: w.local_attention(*a, H, window, kind), inputs, T)
    assert (out - ref).abs().max() < 1e-5
    for a, b in zip(out_g, ref_g):
        assert a.numel() == 0 or (a - b).abs().max() < 1e-5


UNCOMPILED = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@UNCOMPILED
@pytest.mark.parametrize(("kind", "T", "window", "n"), [c for c in CASES if c[3]])
def test_flex_mask_mods_equal_masked(kind, T, window, n):
    """FlexAttention's mask_mods, run forward on the CPU without compiling (what CUDA compiles)."""
    q, k, v, pk, pv = (t.detach() for t in rows(1, T, n, seed=3))
    ref = w.masked_attention(q, k, v, pk, pv, H, window, kind)
    kk, vv = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
    out = w.flex_rows(q, kk, vv, H, kind, window, n, compiled=False)
    assert (out - ref).abs().max() < 1e-5


@UNCOMPILED
def test_segment_h_mask_mod_equals_the_per_segment_mask():
    L, n = 24, 3
    q, k, v, pk, pv = (t.detach() for t in rows(1, L, n, seed=5))
    hk, hv = torch.randn(1, L, D), torch.randn(1, L, D)
    ref = w.segment_h_attention(q, k, v, hk, hv, pk, pv, H)
    keys, values = torch.cat([pk, hk, k], 1), torch.cat([pv, hv, v], 1)
    out = w.flex_rows(q, keys, values, H, "segment_h", L, n, L, compiled=False)
    assert (out - ref).abs().max() < 1e-5


def test_cpu_never_uses_flex_and_says_so_once(caplog):
    """auto is the blocked path on the CPU; an explicit flex falls back with one line."""
    w._flex.pop("told", None)
    assert w.resolve_impl(torch.device("cpu")) in ("blocked", "masked")
    with w.attention_impl("flex"), caplog.at_level("WARNING", logger="kititans"):
        assert w.resolve_impl(torch.device("cpu")) == "blocked"
        assert w.resolve_impl(torch.device("cpu")) == "blocked"
    lines = [r for r in caplog.records if "FlexAttention" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0].getMessage()
    with pytest.raises(ValueError, match="valid: auto, masked, blocked, flex"), w.attention_impl("dense"):
        pass


def test_a_window_as_long_as_the_sequence_takes_the_causal_kernel(monkeypatch):
    """A global layer (window = context_length) is full causal attention: no band mask, no key blocks."""
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k, v, pk, pv = (t.detach() for t in rows(1, 64, 2, seed=9))
    with w.attention_impl("blocked"):
        w.local_attention(q, k, v, pk, pv, H, 64, "sliding")
        w.local_attention(q, k, v, pk, pv, H, 32, "sliding")
    assert calls == [(True, True), (False, False)]


def model(block: str, window: int) -> TitansModel:
    torch.manual_seed(0)
    cfg = TitansConfig(
        vocab_size=97, dim=64, n_layers=2, n_heads=2, ffn_dim=128, context_length=128, window=window,
        n_persistent=2, mem_chunk=4, mem_max_lr=1.0, block=block,
    )  # fmt: skip
    return TitansModel(cfg).train()


@pytest.mark.parametrize("block", ["mal", "mac", "mag"])
def test_every_block_trains_the_same_through_blocked_attention(block):
    """Loss and every parameter's gradient, masked reference vs blocked, on a sequence of several windows."""
    x = torch.randint(0, 97, (2, 71), generator=torch.Generator().manual_seed(1))
    results = {}
    for impl in ("masked", "blocked"):
        m = model(block, 16)
        with w.attention_impl(impl):
            loss = m.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        results[impl] = (
            loss.item(),
            {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None},
        )
    (l0, g0), (l1, g1) = results["masked"], results["blocked"]
    assert abs(l0 - l1) < 1e-5
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        assert (g0[name] - g1[name]).abs().max() < 1e-5, name


def test_no_dense_mask_is_built_for_a_long_sequence(monkeypatch):
    """The blocked path never makes a (T, T) tensor: every tensor SDPA sees is O(T * window)."""
    T, window, seen = 512, 32, []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(max(t.numel() for t in (q, k, v, attn_mask) if t is not None))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    m = model("mal", window)
    with torch.no_grad(), w.attention_impl("blocked"):
        m(torch.zeros(1, T, dtype=torch.long))
    assert seen and max(seen) < T * T


@pytest.mark.parametrize("block", ["mal", "mac"])
def test_the_memory_scan_trains_the_same_with_one_unbind_as_with_per_chunk_selects(block, monkeypatch):
    """The scan's per-chunk views under autograd (one unbind, an O(n) backward) give the loss and gradients of
    the previous per-chunk selects."""
    from kititans.models.titans import memory

    x = torch.randint(0, 97, (2, 65), generator=torch.Generator().manual_seed(2))
    results = []
    for views in (memory._chunk_columns, lambda n: lambda t: [t[:, :, j] for j in range(n)]):
        monkeypatch.setattr(memory, "_chunk_columns", views)
        m = model(block, 32)
        loss = m.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert l0 == l1 and g0.keys() == g1.keys()
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
