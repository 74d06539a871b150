"""Several sequences through one ONNX past/present graph (Lite): the batch dimension of the graph.

The sequences that step together sit in one batched cache (B, kv_heads, P, head_dim), each row left-padded
to the longest (`attention_mask` zero over the padding, `position_ids` each row's own position), so one
`session.run` decodes a token for all of them. A prompt goes in alone (batch 1, the call `kititans
generate` makes); a sequence that is not stepping (just added, kept for a client's next turn) waits
outside the batch with its own unpadded cache, and the batch is re-laid out only when its members change.
The common left padding is trimmed whenever a row leaves, so P never exceeds the longest member.

Not batch-invariant: a row's logits in a batch differ from a lone run's in the last bits (the graph's
MatMuls see B rows; the softmax runs over padded keys), so a sampled token can differ where two
candidates are nearly tied (measured in benchmarks/serve_speed.py --exactness). Recurrent graphs (Titans)
carry one position for the whole batch and go through `InTurn` instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kititans.runtimes.base import Handles


class OnnxBatch(Handles):
    batched = True

    def __init__(self, rt: Any, max_sequences: int = 16):
        super().__init__(max_sequences)
        self.rt = rt
        self.context_length = int(rt.context_length)
        self.names = [s.input for s in rt.states]
        self.outputs = ["logits", *(s.output for s in rt.states)]
        self.parked: dict[int, list[np.ndarray]] = {}  # handle -> its cache tensors (1, Hkv, n, hd)
        self.rows: list[int] = []  # the batch's members, in row order
        self.pads: list[int] = []  # left padding of each row
        self.past: list[np.ndarray] = []  # (B, Hkv, P, hd) each

    # -- one sequence alone, through the runtime's own forward

    def _alone(self, cache: list[np.ndarray] | None, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        import onnxruntime as ort

        rt = self.rt
        if cache is None:
            rt.reset()
        else:
            rt._past = [ort.OrtValue.ortvalue_from_numpy(a, rt.device, 0) for a in cache]
            rt._n = cache[0].shape[2]
        logits = rt.forward(list(ids), all_logits=all_logits)
        return logits

    def _take(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.rt._past]

    def add(self, ids: Sequence[int], all_logits: bool = False) -> tuple[int, np.ndarray]:
        h = self.new(0)
        try:
            logits = self._alone(None, ids, all_logits)
        except BaseException:
            del self.lengths[h]
            raise
        self.parked[h], self.lengths[h] = self._take(), len(ids)
        return h, logits

    def extend(self, seq: int, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        self._park(seq)
        logits = self._alone(self.parked[seq], ids, all_logits)
        self.parked[seq] = self._take()
        self.lengths[seq] += len(ids)
        return logits

    # -- the batch

    def _row_cache(self, r: int) -> list[np.ndarray]:
        return [np.ascontiguousarray(a[r : r + 1, :, self.pads[r] :]) for a in self.past]

    def _park(self, seq: int) -> None:
        """Move `seq` out of the batch (no-op when it is outside)."""
        self.check(seq)
        if seq in self.parked:
            return
        r = self.rows.index(seq)
        self.parked[seq] = self._row_cache(r)
        self._remove_row(r)

    def _remove_row(self, r: int) -> None:
        del self.rows[r], self.pads[r]
        if not self.rows:
            self.past = []
            return
        keep = [i for i in range(len(self.rows) + 1) if i != r]
        trim = min(self.pads)
        self.past = [np.ascontiguousarray(a[keep, :, trim:]) for a in self.past]
        self.pads = [p - trim for p in self.pads]

    def _layout(self, wanted: list[int]) -> None:
        """Make the batch's members exactly `wanted` (members that stay keep their rows)."""
        for s in [s for s in self.rows if s not in wanted]:
            self._park(s)
        joining = [s for s in wanted if s not in self.rows]
        if not joining:
            return
        caches = [self._row_cache(r) for r in range(len(self.rows))] + [self.parked.pop(s) for s in joining]
        self.rows += joining
        width = max(c[0].shape[2] for c in caches)
        self.pads = [width - c[0].shape[2] for c in caches]
        self.past = []
        for j in range(len(self.names)):
            first = caches[0][j]
            out = np.zeros((len(caches), first.shape[1], width, first.shape[3]), first.dtype)
            for r, c in enumerate(caches):
                out[r, :, self.pads[r] :] = c[j][0]
            self.past.append(out)

    def step(self, tokens: Mapping[int, int]) -> dict[int, np.ndarray]:
        for s in tokens:
            self.check(s)
        self._layout(list(tokens))
        B, P = len(self.rows), self.past[0].shape[2]
        mask = np.ones((B, P + 1), np.int64)
        for r, pad in enumerate(self.pads):
            mask[r, :pad] = 0
        feed = {
            "input_ids": np.array([[tokens[s]] for s in self.rows], np.int64),
            "attention_mask": mask,
            **dict(zip(self.names, self.past)),
        }
        if "position_ids" in self.rt.inputs:
            feed["position_ids"] = np.array([[self.lengths[s]] for s in self.rows], np.int64)
        outs = self.rt.session.run(self.outputs, feed)
        self.past = list(outs[1:])
        for s in self.rows:
            self.lengths[s] += 1
        logits = outs[0][:, -1].astype(np.float32)
        return {s: logits[r] for r, s in enumerate(self.rows)}

    def fork(self, seq: int) -> int:
        self.check(seq)
        cache = self.parked[seq] if seq in self.parked else self._row_cache(self.rows.index(seq))
        h = self.new(self.lengths[seq])
        self.parked[h] = [a.copy() for a in cache]
        return h

    def drop(self, seq: int) -> None:
        if seq not in self.lengths:
            return
        if seq in self.rows:
            self._remove_row(self.rows.index(seq))
        self.parked.pop(seq, None)
        del self.lengths[seq]

    def truncate(self, seq: int, n: int) -> bool:
        self.check(seq)
        if not 0 < n <= self.lengths[seq]:
            return False
        self._park(seq)
        self.parked[seq] = [np.ascontiguousarray(a[:, :, :n]) for a in self.parked[seq]]
        self.lengths[seq] = n
        return True

    def length(self, seq: int) -> int:
        return self.lengths[seq]
