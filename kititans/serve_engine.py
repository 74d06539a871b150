"""The worker behind `kititans serve`: one thread owns the runtime and runs requests one at a time, in the
order they came (a FIFO queue), so concurrent clients never share or corrupt its cache. Each request gets a
`Job` whose event queue carries its text deltas and then its result; a client that goes away sets
`cancelled`, and generation stops at the next token (a queued job that was cancelled is skipped).

The sampler and the text streaming are kititans.generate's, the same as `kititans generate` and `chat`, so a
request with a seed answers exactly what the CLI answers with that seed. When a prompt extends what the
runtime's cache already holds (the next turn of the same chat), only the new tokens are fed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kititans.generate import Generation, stream_text
from kititans.serve_api import ApiError, Request

FINISH = {"stop": "stop", "length": "length", "context": "length"}


@dataclass
class Result:
    text: str
    finish_reason: str  # stop | length
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)


class Job:
    def __init__(self, req: Request):
        self.req = req
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()  # ("delta", str) ... ("done", Result)
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()


class StopFilter:
    """Cuts streamed text at the first stop sequence, holding back a tail that could be the start of one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop sequence was reached)."""
        self.pending += delta
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = max(
            (k for s in self.stops for k in range(len(s) - 1, 0, -1) if self.pending.endswith(s[:k])),
            default=0,
        )
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Engine:
    def __init__(self, rt: Any, max_queue: int = 64):
        self.rt, self.codec = rt, rt.codec
        self.max_queue = max_queue
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._history: list[int] = []  # ids the runtime's cache holds
        self.busy = False
        self.served = 0  # requests taken off the queue
        self.cancelled = 0  # of those, stopped or skipped because their client went away
        self._thread = threading.Thread(target=self._loop, name="kititans-serve-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def submit(self, req: Request) -> Job:
        job = Job(req)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise ApiError(
                503,
                f"The server is busy ({self.max_queue} requests are waiting): retry later",
                type="server_error",
                code="server_busy",
            ) from None
        return job

    def close(self, timeout: float = 5.0) -> None:
        while True:
            try:
                self._queue.get_nowait().cancelled.set()  # type: ignore[union-attr]
            except (queue.Empty, AttributeError):
                break
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self.served += 1
                self.cancelled += 1
                continue
            self.busy = True
            try:
                result = self._run(job)
                self.cancelled += result.finish_reason == "cancelled"
                job.events.put(("done", result))
            except Exception as e:  # a runtime failure answers this request with a 500, the server goes on
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                job.events.put(("error", ApiError(500, f"generation failed: {first}", type="server_error")))
                self._history.clear()
                self.rt.reset()
            finally:
                self.busy = False
                self.served += 1

    def _run(self, job: Job) -> Result:
        req, started = job.req, time.perf_counter()
        stop_ids = () if req.ignore_eos else self.codec.stop_ids
        gen = Generation(self.rt, req.prompt_ids, req.sampling, stop_ids, history=self._history)
        stop = StopFilter(req.stops)
        text, finish = "", None
        for delta in stream_text(gen, self.codec):
            if job.cancelled.is_set():
                finish = "cancelled"
                break
            out, hit = stop.feed(delta)
            if out:
                text += out
                job.events.put(("delta", out))
            if hit:
                finish = "stop"
                break
        if finish is None:
            if tail := stop.flush():
                text += tail
                job.events.put(("delta", tail))
            finish = FINISH.get(gen.stats.finish_reason, "length")
        s = gen.stats
        decode_s = time.perf_counter() - started - s.prompt_seconds
        timings = {
            "queue_ms": round(1000 * (started - job.submitted), 3),
            "prompt_n": s.prompt_tokens,
            "prompt_ms": round(1000 * s.prompt_seconds, 3),
            "predicted_n": s.generated_tokens,
            "predicted_ms": round(1000 * decode_s, 3),
        }
        return Result(text, finish, len(req.prompt_ids), s.generated_tokens, timings)
