"""Titans' multi-sequence decode step: one new token for each of B sequences, each at its own position with its
own state, in one pass through the layers (the server's continuous batching; models/lite_batch.py is Lite's).

- A token that closes a memory chunk (or a MAC segment) runs alone through the model's own stateful call: its
  memory update takes the whole chunk, which the other rows are in the middle of. So does a lone row. It still
  rides along in the stacked call (its writes undone), so that it keeps its place in the stacked state.
- The other tokens run together. Their states are stacked along the batch axis, `RowsCtx` gives every row its
  own position (its RoPE row, ring slot, attention mask and memory-buffer row), the layers run once over all
  rows (one op per step instead of one per sequence), and what the call wrote (ring rows, buffer rows, conv
  states; such a token never changes the memory's weights) goes back to each sequence's state.
- Batch-invariant, so a sequence decoded among others gets the very logits of its lone call (fp32 on CPU, bit
  for bit), and a seeded request answers what `kititans generate` answers: the matrix products run row by row
  (layers.row_gemms: per row the kernel of a lone call), attention is one SDPA call per row with the mask
  its lone call passes (the op of a lone step: a single-sequence decode keeps its speed; explicit per-row
  products in one call made the lone step 0.7-0.9x as fast), and RoPE, norms and the memory's reads are
  row-wise. A
  probe on the model itself checks this once (rows at different positions, 2 to 16 at a time, against their
  lone calls); where it fails (another BLAS, hyper-connections' folded products), the rows run one after the
  other through the model's own call: exact, without the batching gain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kititans.models.layers import apply_rope_rolled, row_gemms, signed_sin
from kititans.models.titans.state import StateIO, StepCtx, attend, pick_kind, rope_rows


@dataclass
class RowsCtx(StepCtx):
    """A one-token call of B rows, row b at position rows[b] (B,) int64; cos/sin are (B, hd). The call computes
    every row as a token inside its chunk; a row that closes its chunk rides along and is undone (`_together`)."""

    rows: Tensor | None = None

    def __post_init__(self) -> None:
        self._cls = None  # no cache across calls: the positions differ from call to call

    @property
    def ring_full(self) -> bool:
        return False  # always a mask, full ring or not: the same call for a row whatever its neighbours

    @property
    def chunk_slots(self) -> Tensor:
        """(B, 1): each row's memory-buffer row (a row that closes its chunk rides along in a stacked call with
        its writes undone, rows.py `_together`: it writes the buffer's last row, which its close has read)."""
        return self._memoized(
            ("chunk",), lambda: torch.remainder(self.rows, self.chunk).clamp(max=self.chunk - 2)[:, None]
        )

    def ring_slots(self, size: int, streams: int, last: int) -> Tensor:
        """(B, streams): each row's ring rows, one per stream."""
        if last != 1 or self.refresh_persistent:
            raise ValueError("RowsCtx calls take one token per row, over rings written once")

        def make() -> Tensor:
            slot = torch.remainder(self.rows, size)[:, None]  # (B, 1)
            return torch.cat([self.n_persistent + j * size + slot for j in range(streams)], dim=1)

        return self._memoized(("ring", size, streams, last), make)

    def _held_rows(self, size: int) -> Tensor:
        """(B, size): the position each ring slot holds once row b's token is written (< 0: none yet)."""
        last = self.rows[:, None]
        return last - torch.remainder(last - self._arange(size)[None, :], size)

    def _with_persistent(self, parts: list[Tensor]) -> Tensor:
        ones = torch.ones(parts[0].shape[0], self.n_persistent, dtype=torch.bool, device=parts[0].device)
        return torch.cat([ones, *parts], dim=-1)[:, None, None, :]  # (B, 1, 1, S): per row, all heads

    def sliding_mask(self, read_first: bool) -> Tensor:
        if read_first:
            raise ValueError("RowsCtx calls take one token per row")
        return self._memoized(
            ("sliding", False), lambda: self._with_persistent([self._held_rows(self.window) >= 0])
        )

    def segment_mask(self, streams: int) -> Tensor:
        def make() -> Tensor:
            held, q = self._held_rows(self.window), self.rows[:, None]
            see = (held >= q - torch.remainder(q, self.window)) & (held <= q)
            return self._with_persistent([see] * streams)

        return self._memoized(("segment", streams), make)

    def rope(self, x: Tensor, start: int = 0, heads: int | None = None) -> Tensor:
        """RoPE on x (B, 1, heads*hd), row b at its own position (the lone decode's rolled form)."""
        if start != 0 or x.shape[1] != 1:
            raise ValueError("RowsCtx calls take one token per row")
        B, T, D = x.shape
        heads = heads or self.n_heads
        key = ("rope", x.dtype)
        if key not in self._memo:  # (B, 1, 1, hd): one row per sequence, broadcast over the heads
            c, s = self.cos[:, None, None].to(x.dtype), self.sin[:, None, None].to(x.dtype)
            self._memo[key] = (c, signed_sin(s))
        c, s = self._memo[key]
        return apply_rope_rolled(x.view(B, T, heads, D // heads), c, s).reshape(B, T, D)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Each row its own SDPA call, with the mask its lone call passes (none once a sliding ring is full):
        SDPA's CPU kernel gives a row other bits when the batch around it changes."""
        sliding = mask is not None and mask is self._memo.get(("sliding", False))
        full = [sliding and p >= self.window - 1 for p in self.rows.tolist()]
        outs = []
        for b in range(q.shape[0]):
            m = None if mask is None or full[b] else mask[b, 0]
            outs.append(attend(q[b : b + 1], k[b : b + 1], v[b : b + 1], m, self.n_heads))
        return torch.cat(outs)


def rows_ctx(model: Any, positions: Tensor) -> RowsCtx:
    """The RowsCtx of a one-token call at `positions` (B,) for a TitansModel."""
    cfg = model.cfg
    if int(positions.max()) < model.rope_cos.shape[0]:
        cos, sin = model.rope_cos[positions], model.rope_sin[positions]
    else:  # past the table: computed as the table is (model._rope)
        cos, sin = rope_rows(positions, model.rope_inv_freq)
    return RowsCtx(
        1,
        0,
        cos,
        sin,
        cfg.n_heads,
        cfg.n_persistent,
        cfg.window,
        cfg.mem_chunk,
        stateful=True,
        rows=positions,
    )


def _together(model: Any, ids: Sequence[int], states: Sequence[Any], closing: Sequence[int] = ()) -> Tensor:
    """One stacked call for the rows: logits (B, V). The rows in `closing` (indices; they close a memory chunk)
    ride along: their writes are undone and each then runs alone on its rows of the stacked tensors, so every
    row keeps its place in them. Afterwards every row's state tensors are row views of the stacked ones, so the
    next step of the same rows finds them stacked already (no copy while the batch stays the same; a row that
    joined costs one copy)."""
    dev = model.embed.weight.device
    stacked: dict = model.__dict__.setdefault("_rows_stacked", {})  # (layer, name) -> (row pointers, tensor)
    layers = []
    for li in range(len(model.layers)):
        st = {}
        for name in states[0].layers[li]:
            rows = [s.layers[li][name] for s in states]
            ptrs = tuple(t.data_ptr() for t in rows)
            hit = stacked.get((li, name))
            st[name] = hit[1] if hit is not None and hit[0] == ptrs else torch.cat(rows)
        layers.append(st)
    written: list[set[str]] = model.__dict__.get("_rows_written") or []
    idx = torch.tensor(list(closing), dtype=torch.long, device=dev)
    undo = {(li, n): layers[li][n].index_select(0, idx) for li, names in enumerate(written) for n in names}
    positions = torch.tensor([s.pos for s in states], dtype=torch.long, device=dev)
    ios = [StateIO(st, in_place=True) for st in layers]
    x = torch.tensor([[int(t)] for t in ids], dtype=torch.long, device=dev)
    with row_gemms():
        logits = model._run(x, rows_ctx(model, positions), ios)[:, -1]
    model._rows_written = [set(io.written) for io in ios]
    for (li, name), rows in undo.items():
        ios[li].tensors[name].index_copy_(0, idx, rows)
    stacked.clear()
    for li, io in enumerate(ios):
        for name, t in io.tensors.items():
            views = t.split(1)
            for s, v in zip(states, views):
                s.layers[li][name] = v
            stacked[(li, name)] = (tuple(v.data_ptr() for v in views), t)
    for i, s in enumerate(states):
        if i not in closing:
            s.pos += 1
    for i in closing:  # alone, on its rows of the stacked tensors (what the call replaces is copied back)
        own = [dict(layer) for layer in states[i].layers]
        logits[i] = _alone(model, ids[i], states[i])
        for view, layer in zip(own, states[i].layers):
            for name, t in layer.items():
                if t is not view[name]:
                    view[name].copy_(t)
                    layer[name] = view[name]
    return logits


def _alone(model: Any, token: int, state: Any) -> Tensor:
    x = torch.tensor([[int(token)]], dtype=torch.long, device=model.embed.weight.device)
    return model(x, state=state)[0, -1]


def rows_are_independent(model: Any) -> bool:
    """Whether rows stepped together (2, 5 and 16 at a time, at different positions) get the same logits bit for
    bit as each row's lone call, on this model with the current threads."""
    import copy

    g = torch.Generator().manual_seed(0)
    vocab, chunk = model.cfg.vocab_size, model.cfg.mem_chunk
    dev = model.embed.weight.device
    lengths = [n for n in range(4 * chunk + 40) if (n + 1) % chunk]  # the next token does not close a chunk
    with torch.inference_mode():
        pool = []
        for i in range(16):
            st = model.new_state(1)
            n = lengths[(7 * i) % len(lengths)]
            if n:
                model(torch.randint(vocab, (1, n), generator=g).to(dev), state=st)
            pool.append(st)
        toks = torch.randint(vocab, (len(pool),), generator=g).tolist()
        alone = [_alone(model, t, copy.deepcopy(st)) for t, st in zip(toks, pool)]
        for m in (2, 5, 16):
            got = _together(model, toks[:m], [copy.deepcopy(st) for st in pool[:m]])
            if any(not torch.equal(got[i], alone[i]) for i in range(m)):
                return False
    return True


def decode_rows(model: Any, ids: Sequence[int], states: Sequence[Any], positions: Sequence[int]) -> Tensor:
    """ids[i] at position positions[i] of the sequence whose TitansState (batch 1) is states[i]; each state
    takes its token and advances by one. Returns logits (B, V)."""
    for st, pos in zip(states, positions, strict=True):
        if st.pos != pos:
            raise ValueError(f"a sequence at position {pos} cannot take a token (its state holds {st.pos})")
    kinds = model.kinds()
    closing = [i for i, p in enumerate(positions) if pick_kind(kinds, int(p), 1).closes_chunk]
    rest = [i for i in range(len(ids)) if i not in closing]
    if len(rest) > 1 and getattr(model, "_rows_independent", None) is None:
        model._rows_independent = rows_are_independent(model)
    if len(rest) < 2 or not model._rows_independent:
        return torch.stack([_alone(model, t, st) for t, st in zip(ids, states)])
    if closing and not getattr(model, "_rows_written", None):  # what a stacked call writes is not known yet
        logits = _together(model, [ids[i] for i in rest], [states[i] for i in rest])
        out = {i: logits[j] for j, i in enumerate(rest)} | {
            i: _alone(model, ids[i], states[i]) for i in closing
        }
        return torch.stack([out[i] for i in range(len(ids))])
    return _together(model, ids, states, closing)
