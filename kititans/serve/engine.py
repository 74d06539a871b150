"""The engine behind `kititans serve`: one thread owns the runtime and runs continuous batching over its
multi-sequence interface (kititans.runtimes.base.Sequences).

Each turn of the loop: drop the sequences of requests whose client went away or whose deadline passed;
start waiting prompts while there is room (`parallel` sequences at most; a prompt goes in alone, the call
`kititans generate` makes, and while others are decoding at most `prefill_budget` prompt tokens start per
turn so a long prompt never stalls them for long); then step every active sequence together, one token
each, and give every choice its logits: its own sampler, seed, stop ids, stop strings and token limit pick
its token (serve/sequence.py). Finished choices leave the batch at once, and the next turn can take new
ones in. A request's events (text deltas, its end, or an error) go to its client in one hand-over per turn.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from kititans.errors import KititansError
from kititans.generate import SamplingConfig
from kititans.serve.api import ApiError, EmbeddingRequest, Request, busy
from kititans.serve.cache import PromptCache
from kititans.serve.metrics import Metrics
from kititans.serve.sequence import Choice, TokenText, prompt_logprobs

log = logging.getLogger("kititans.serve")


@dataclass
class EngineConfig:
    parallel: int = 16  # sequences decoded together at most
    cache_slots: int = 8  # finished conversations kept for their client's next turn
    max_queue: int = 64  # requests waiting to start; more get 503
    request_timeout: float = 600.0  # seconds from arrival to the last token
    prefill_budget: int = 512  # prompt tokens started per turn while others decode


@dataclass
class Call:
    """Work that must run where the runtime lives (the engine thread): e.g. a /v1/search, which embeds its
    query with the served encoder. `fn()`'s value becomes the job's `result`; a KititansError it raises,
    a 400."""

    fn: Any


class Job:
    """One request in the engine. Events: ("delta", index, text, records) while streaming, then ("end",
    None) or ("error", ApiError). They reach `sink(list_of_events)` (called in the engine thread) or,
    without a sink, the `events` list the caller polls."""

    def __init__(
        self, req: Request | EmbeddingRequest | Call, tenant: str | None = None, timeout: float = 600.0
    ):
        self.req, self.tenant = req, tenant
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout
        self.cancelled = threading.Event()
        self.sink: Any = None  # (loop, callback): the app's event loop and its dispatcher
        self.events: list[tuple] = []
        self.done = threading.Event()
        self.choices: list[Choice] = []
        self.next_prompt = 0
        self.finished = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.first_token_at: float | None = None
        self.vectors: np.ndarray | None = None  # embeddings
        self.result: Any = None  # a Call's value
        self.session: Any = None  # serve/sessions.py Ticket: the saved state this request continues

    @property
    def embed(self) -> bool:
        return isinstance(self.req, EmbeddingRequest)

    @property
    def call(self) -> bool:
        return isinstance(self.req, Call)


def _sampling(base: SamplingConfig, index: int) -> SamplingConfig:
    """Choice `index` of a request: seed + index, so each choice answers `kititans generate --seed`."""
    if base.seed is None or index == 0:
        return base
    return SamplingConfig(**{**base.__dict__, "seed": base.seed + index})


def _internal(where: str) -> ApiError:
    ref = uuid.uuid4().hex[:12]
    log.exception("%s failed (error %s)", where, ref)
    return ApiError(500, f"{where} failed (internal error {ref}; see the server log)", type="server_error")


class Engine:
    def __init__(
        self, rt: Any, cfg: EngineConfig | None = None, metrics: Metrics | None = None, sessions: Any = None
    ):
        self.rt, self.codec = rt, rt.codec
        self.sessions = sessions  # serve/sessions.py SessionStore (--sessions), or None
        self.cfg = cfg or EngineConfig()
        self.metrics = metrics or Metrics()
        self.task = getattr(rt, "task", "lm")
        self.seqs = rt.sequences(self.cfg.parallel + self.cfg.cache_slots) if self.task == "lm" else None
        self.cache = PromptCache(self.cfg.cache_slots)
        self.token_text = TokenText(self.codec)
        self._cond = threading.Condition()
        self.waiting: deque[Job] = deque()
        self.active: list[Choice] = []
        self._owner: dict[int, Job] = {}  # id(choice) -> job
        self._outbox: dict[Job, list[tuple]] = {}
        self.stopping = False
        self.hard_stop = float("inf")  # monotonic time after which active requests are cut
        self.served = 0
        self.cancelled = 0
        self._thread = threading.Thread(target=self._loop, name="kititans-serve-engine", daemon=True)
        self._thread.start()

    # -- the event loop's side

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self.stopping:
                raise busy("The server is shutting down: retry on another instance", 5, "shutting_down")
            if isinstance(job.req, Request) and job.req.n > self.cfg.parallel:
                raise ApiError(400, f"`n` must be at most {self.cfg.parallel} on this server", param="n")
            if len(self.waiting) >= self.cfg.max_queue:
                raise busy(f"The server is busy ({self.cfg.max_queue} requests are waiting): retry later")
            self.waiting.append(job)
            self._cond.notify()
        return job

    def shutdown(self, grace: float) -> None:
        """Refuse new requests, answer the waiting ones 503, let active ones finish within `grace` s."""
        with self._cond:
            self.stopping = True
            self.hard_stop = time.monotonic() + grace
            self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        self.shutdown(0.0)
        self._thread.join(timeout)

    def gauges(self) -> dict[str, tuple[float, str]]:
        return {
            "kititans_queue_length": (len(self.waiting), "requests waiting to start"),
            "kititans_active_sequences": (len(self.active), "sequences being decoded"),
            "kititans_cached_conversations": (len(self.cache), "conversations kept for prompt caching"),
        }

    # -- the engine thread

    def _post(self, job: Job, event: tuple) -> None:
        self._outbox.setdefault(job, []).append(event)
        if event[0] in ("end", "error"):
            self.served += 1

    def _flush(self) -> None:
        out, self._outbox = self._outbox, {}
        by_loop: dict[Any, list] = {}
        for job, events in out.items():
            if job.sink is None:
                job.events += events
                if any(e[0] in ("end", "error") for e in events):
                    job.done.set()
            else:
                by_loop.setdefault(job.sink[0], []).append((job.sink[1], events))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(_dispatch, items)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self.waiting and not self.active and not self.stopping:
                    self._cond.wait()
                if self.stopping and not self.active and not self.waiting:
                    return
            try:
                self._turn()
            except Exception:  # never let one turn stop the engine: fail what was running
                err = _internal("the engine")
                for c in list(self.active):
                    self._fail(self._owner[id(c)], err)
            self._flush()

    def _turn(self) -> None:
        self._reap()
        self._admit()
        if self.active:
            self._step()

    def _reap(self) -> None:
        now = time.monotonic()
        with self._cond:
            waiting = list(self.waiting)
        for job in waiting:
            gone, late = job.cancelled.is_set(), now > job.deadline
            if gone or late or self.stopping:
                self.cancelled += gone
                self._fail(job, None if gone else self._why_cut(late))
        for job in {self._owner[id(c)] for c in self.active}:
            gone, late = job.cancelled.is_set(), now > job.deadline
            if gone or late or now > self.hard_stop:
                self.cancelled += gone
                self._fail(job, None if gone else self._why_cut(late))

    def _why_cut(self, late: bool) -> ApiError:
        if late:
            return ApiError(
                504, f"The request ran past the server's limit of {self.cfg.request_timeout:g} s",
                type="server_error", code="timeout",
            )  # fmt: skip
        return busy("The server is shutting down: retry on another instance", 5, "shutting_down")

    def _fail(self, job: Job, err: ApiError | None) -> None:
        """Drop all of the job's sequences and end it (err None: its client is gone, nothing to send)."""
        for c in job.choices:
            if c in self.active:
                self.active.remove(c)
            self._release(c, keep=False)
        with self._cond:
            if job in self.waiting:
                self.waiting.remove(job)
        job.next_prompt = len(getattr(job.req, "prompts", [])) or 1
        if job.session is not None:  # the session file stays as it was: the client may resend the turn
            job.session.release()
        if err is not None:
            self._post(job, ("error", err))
        else:
            self.served += 1

    def _release(self, c: Choice, keep: bool) -> None:
        seq, c.seq = c.seq, None
        if seq is None:
            return
        job = self._owner.pop(id(c), None)
        if keep and job is not None and job.tenant and job.req.choices == 1 and not job.req.prompt_logprobs:
            for old in self.cache.put(job.tenant, seq, c.chooser.context):
                self.seqs.drop(old)
        else:
            self.seqs.drop(seq)

    def _admit(self) -> None:
        budget = self.cfg.prefill_budget if self.active else 1 << 62
        while budget > 0:
            with self._cond:
                job = self.waiting[0] if self.waiting else None
            if job is None:
                return
            if job.embed:
                self._embed()
                continue
            if job.call:
                self._call(job)
                continue
            req = job.req
            if len(self.active) + req.n > self.cfg.parallel or not self._room(req.n):
                return
            try:
                budget -= self._start(job, job.next_prompt)
            except Exception:
                self._fail(job, _internal("the prompt"))
                continue
            job.next_prompt += 1
            if job.next_prompt >= len(req.prompts):
                with self._cond:
                    if self.waiting and self.waiting[0] is job:
                        self.waiting.popleft()

    def _room(self, n: int) -> bool:
        """Make room for n more sequences in the runtime, evicting cached conversations if needed."""
        while len(self.seqs) + n > self.seqs.max_sequences:
            seq = self.cache.evict()
            if seq is None:
                return False
            self.seqs.drop(seq)
        return True

    def _start(self, job: Job, p: int) -> int:
        """Prefill prompt p of the job and give each of its n choices its first token; the tokens fed."""
        req, prompt = job.req, job.req.prompts[p]
        seq, shared = None, 0
        if job.session is not None:  # its saved state, or the empty state for a new session
            seq = self.sessions.resume(job.session, self.rt, self.seqs)
            shared = len(job.session.tokens) if seq is not None else 0
        elif job.tenant and req.choices == 1 and not req.prompt_logprobs:
            entry, shared = self.cache.take(job.tenant, prompt)
            if entry is not None and shared and self.seqs.truncate(entry.seq, shared):
                seq = entry.seq
                self.cache.hits += 1
            elif entry is not None:
                self.seqs.drop(entry.seq)
        if seq is not None:
            try:
                logits = self.seqs.extend(seq, prompt[shared:])
            except BaseException:  # no choice holds the sequence yet: it would never be dropped
                self.seqs.drop(seq)
                raise
            fed = len(prompt) - shared
            job.cached_tokens += shared
        else:
            seq, logits = self.seqs.add(prompt, all_logits=req.prompt_logprobs)
            fed = len(prompt)
        job.prompt_tokens += len(prompt)
        self.metrics.prompt(len(prompt), len(prompt) - fed)
        records = []
        if req.prompt_logprobs:
            records = prompt_logprobs(logits, prompt, req.logprobs or 0, req.skip_first[p])
            logits = logits[-1]
        stop_ids = () if req.ignore_eos else self.codec.stop_ids
        for k in range(req.n):
            c = Choice(p * req.n + k, prompt, _sampling(req.sampling, k), stop_ids, req.stops,
                       self.seqs.context_length, self.codec, req.logprobs)  # fmt: skip
            c.seq = seq if k == 0 else self.seqs.fork(seq)
            c.prompt_records = records
            c.keep_stop_record = req.prompt_logprobs
            job.choices.append(c)
            self._owner[id(c)] = job
            if req.sampling.max_tokens == 0:  # echo only: the prompt's log-probs, nothing generated
                c.end("length")
                self._finish(job, c)
                continue
            self._advance(job, c, logits)
            self.metrics.tokens(1)
        return fed

    def _step(self) -> None:
        tokens = {c.seq: c.pending for c in self.active}
        try:
            out = self.seqs.step(tokens)
        except Exception:
            err = _internal("the decode step")
            for job in {self._owner[id(c)] for c in self.active}:
                self._fail(job, err)
            return
        self.metrics.step(len(tokens))
        for c in list(self.active):
            self._advance(self._owner[id(c)], c, out[c.seq], stepping=True)

    def _advance(self, job: Job, c: Choice, logits: np.ndarray, stepping: bool = False) -> None:
        text, ended = c.take(logits)
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
            self.metrics.first_token(job.first_token_at - job.submitted)
        if job.req.stream and (text or ended):
            records = c.records[c.sent_records :] if c.logprobs is not None else []
            c.sent_records = len(c.records)
            self._post(job, ("delta", c.index, text, records, c.finish_reason))
        if ended:
            if stepping:
                self.active.remove(c)
            self._finish(job, c)
        elif not stepping:
            self.active.append(c)

    def _finish(self, job: Job, c: Choice) -> None:
        err = self._save(job, c) if job.session is not None else None
        self._release(c, keep=True)
        job.finished += 1
        if err is not None:
            self._post(job, ("error", err))
        elif job.finished == job.req.choices:
            self._post(job, ("end", None))

    def _save(self, job: Job, c: Choice) -> ApiError | None:
        """A finished session request: its state (prompt + the reply tokens fed back) over the file, before
        the client hears the end, so its next turn finds it."""
        try:
            self.sessions.save(job.session, self.rt, self.seqs, c.seq, c.chooser.context)
        except Exception:
            return _internal("saving the session")
        finally:
            job.session.release()
        return None

    def _embed(self) -> None:
        """Every waiting embedding request in one batched call of the encoder."""
        from kititans.embedding import embed_rows

        with self._cond:
            jobs = [j for j in self.waiting if j.embed]
            for j in jobs:
                self.waiting.remove(j)
        rows = [r for j in jobs for r in j.req.rows]
        try:
            vecs = embed_rows(self.rt, rows)
        except Exception:
            err = _internal("the embedding")
            for j in jobs:
                self._post(j, ("error", err))
            return
        at = 0
        for j in jobs:
            j.vectors, at = vecs[at : at + len(j.req.rows)], at + len(j.req.rows)
            self.metrics.prompt(j.req.prompt_tokens, 0)
            self._post(j, ("end", None))

    def _call(self, job: Job) -> None:
        with self._cond:
            self.waiting.remove(job)
        try:
            job.result = job.req.fn()
        except KititansError as e:
            self._post(job, ("error", ApiError(400, str(e))))
            return
        except Exception:
            self._post(job, ("error", _internal("the request")))
            return
        self._post(job, ("end", None))


def _dispatch(items: list) -> None:
    for callback, events in items:
        callback(events)
