"""Several sequences in one llama.cpp context: each sequence is a llama.cpp sequence id, and a decode step
puts one token of every stepping sequence into one `llama_batch` (one `llama_decode`), as llama-server
does with its slots.

The context is its own (the runtime's one-sequence context stays as it is): `n_seq_max` sequences, each
with the model's whole context (`kv_unified` off: every sequence has its own cache stream, so attention
reads only its own cells), the runtime's threads, batch size and KV type. A prompt is decoded for its
sequence alone, in chunks of `n_batch`; fork() copies a sequence's cells (`llama_memory_seq_cp`).

Not batch-invariant: llama.cpp's matmuls see all the batch's tokens at once, so a token decoded among
others can differ in the last bits from one decoded alone (measured in benchmarks/serve_speed.py).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kititans.errors import KititansError
from kititans.runtimes.base import Handles
from kititans.runtimes.llamacpp_lib import captured_stderr, last_error


def _free(lib: Any, batch: Any, ctx: Any) -> None:
    if batch is not None:
        lib.llama_batch_free(batch)
    if ctx is not None:
        lib.llama_free(ctx)


class LlamaCppSequences(Handles):
    batched = True

    def __init__(self, rt: Any, max_sequences: int = 16):
        lib = rt._lib
        limit = int(lib.llama_max_parallel_sequences())
        if not 1 <= max_sequences <= limit:
            raise KititansError(f"llama.cpp takes 1 to {limit} sequences per context, not {max_sequences}")
        super().__init__(max_sequences)
        self.rt, self.lib = rt, lib
        self.context_length = int(rt.context_length)
        self.vocab_size = int(rt.vocab_size)
        cp = lib.llama_context_default_params()
        cp.n_seq_max = max_sequences
        cp.kv_unified = False
        cp.n_ctx = self.context_length * max_sequences
        cp.n_batch = cp.n_ubatch = max(int(rt.n_batch), max_sequences)
        cp.n_threads = cp.n_threads_batch = int(rt.settings["threads"])
        cp.no_perf = True
        kv = {"f16": lib.GGML_TYPE_F16, "f32": lib.GGML_TYPE_F32, "q8_0": lib.GGML_TYPE_Q8_0}
        cp.type_k = cp.type_v = kv[rt.settings["type_k"]]
        if rt.settings["flash_attn"] is not None:
            on = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
            cp.flash_attn_type = on if rt.settings["flash_attn"] else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        with captured_stderr(True) as log:
            ctx = lib.llama_init_from_model(rt._model, cp)
        if not ctx:
            raise KititansError(
                f"llama.cpp could not create a context for {max_sequences} sequences: {last_error(log)}"
            )
        self.n_batch = int(cp.n_batch)
        batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self._ctx, self._batch, self._mem = ctx, batch, lib.llama_get_memory(ctx)
        self._finalizer = weakref.finalize(self, _free, lib, batch, ctx)
        self.slots: dict[int, int] = {}  # handle -> llama.cpp sequence id
        self.free = list(range(max_sequences))

    def close(self) -> None:
        self._finalizer()

    def _logits(self, i: int) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self._ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).copy()

    def _decode(self, n: int) -> None:
        self._batch.n_tokens = n
        rc = self.lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _feed(self, seq: int, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        """ids after what `seq` holds, in chunks of n_batch; logits of the last (or all) positions."""
        ids = [int(t) for t in ids]
        start, slot, b = self.lengths[seq], self.slots[seq], self._batch
        if not ids:
            raise ValueError("a sequence needs at least one token")
        if start + len(ids) > self.context_length:
            raise ValueError(f"{start + len(ids)} tokens exceed the context of {self.context_length}")
        rows = []
        for at in range(0, len(ids), self.n_batch):
            part = ids[at : at + self.n_batch]
            last = at + len(part) == len(ids)
            for j, tok in enumerate(part):
                b.token[j], b.pos[j], b.n_seq_id[j] = tok, start + at + j, 1
                b.seq_id[j][0] = slot
                b.logits[j] = all_logits or (last and j == len(part) - 1)
            self._decode(len(part))
            if all_logits:
                rows += [self._logits(j) for j in range(len(part))]
        self.lengths[seq] = start + len(ids)
        return np.stack(rows) if all_logits else self._logits(len(part) - 1)

    def _claim(self, n: int) -> int:
        h = self.new(n)
        self.slots[h] = self.free.pop(0)
        self.lib.llama_memory_seq_rm(self._mem, self.slots[h], -1, -1)
        return h

    def add(self, ids: Sequence[int], all_logits: bool = False) -> tuple[int, np.ndarray]:
        h = self._claim(0)
        try:
            return h, self._feed(h, ids, all_logits)
        except BaseException:
            self.drop(h)
            raise

    def extend(self, seq: int, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        self.check(seq)
        return self._feed(seq, ids, all_logits)

    def step(self, tokens: Mapping[int, int]) -> dict[int, np.ndarray]:
        seqs, b = list(tokens), self._batch
        for j, s in enumerate(seqs):
            self.check(s)
            if self.lengths[s] + 1 > self.context_length:
                raise ValueError(f"sequence {s} is at the context limit of {self.context_length}")
            b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = int(tokens[s]), self.lengths[s], 1, True
            b.seq_id[j][0] = self.slots[s]
        self._decode(len(seqs))
        out = {}
        for j, s in enumerate(seqs):
            out[s] = self._logits(j)
            self.lengths[s] += 1
        return out

    def fork(self, seq: int) -> int:
        self.check(seq)
        h = self._claim(self.lengths[seq])
        self.lib.llama_memory_seq_cp(self._mem, self.slots[seq], self.slots[h], -1, -1)
        return h

    def drop(self, seq: int) -> None:
        if seq not in self.lengths:
            return
        slot = self.slots.pop(seq)
        self.lib.llama_memory_seq_rm(self._mem, slot, -1, -1)
        self.free.append(slot)
        del self.lengths[seq]

    def truncate(self, seq: int, n: int) -> bool:
        self.check(seq)
        if not 0 < n <= self.lengths[seq]:
            return False
        if not self.lib.llama_memory_seq_rm(self._mem, self.slots[seq], n, -1):
            return False
        self.lengths[seq] = n
        return True

    def length(self, seq: int) -> int:
        return self.lengths[seq]
