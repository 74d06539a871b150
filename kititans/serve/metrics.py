"""`/metrics` in the Prometheus text exposition format (version 0.0.4), written by hand: counters, gauges
and histograms with fixed buckets. Updated from the engine thread and the event loop; one lock."""

from __future__ import annotations

import math
import threading
import time
from collections import deque

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.sum += value
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip((*self.buckets, math.inf), self.counts):
            acc += c
            le = "+Inf" if b == math.inf else repr(float(b))
            out.append(f'{name}_bucket{{le="{le}"}} {acc}')
        return [*out, f"{name}_sum {self.sum:.6f}", f"{name}_count {acc}"]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}  # (method, route, status) -> count
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.cached_tokens = 0
        self.decode_steps = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.batch = Histogram(BATCH_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last 10 s of steps
        self.connections = 0

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        with self.lock:
            key = (method, route, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.duration.observe(seconds)

    def step(self, batch: int) -> None:
        """A decode step that ran `batch` sequences together (one token each)."""
        with self.lock:
            self.decode_steps += 1
            self.batch.observe(batch)
        self.tokens(batch)

    def tokens(self, n: int) -> None:
        """n tokens generated (a step's, or the first tokens right after the prompts)."""
        now = time.monotonic()
        with self.lock:
            self.generated_tokens += n
            self.recent.append((now, n))
            while self.recent and self.recent[0][0] < now - 10:
                self.recent.popleft()

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def prompt(self, tokens: int, cached: int) -> None:
        with self.lock:
            self.prompt_tokens += tokens
            self.cached_tokens += cached

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.lock:
            recent = [(t, n) for t, n in self.recent if t >= now - 10]
        return sum(n for _, n in recent) / 10.0

    def render(self, gauges: dict[str, tuple[float, str]]) -> str:
        """The exposition text; `gauges` adds name -> (value, help) read at scrape time."""
        tps = self.tokens_per_second()
        with self.lock:
            lines = ["# HELP kititans_requests_total HTTP requests answered, by method, route and status",
                     "# TYPE kititans_requests_total counter"]  # fmt: skip
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(
                    f'kititans_requests_total{{method="{_label(method)}",route="{_label(route)}",'
                    f'status="{status}"}} {n}'
                )
            counters = {
                "kititans_prompt_tokens_total": (self.prompt_tokens, "prompt tokens received"),
                "kititans_prompt_tokens_cached_total": (
                    self.cached_tokens,
                    "prompt tokens reused from a cache",
                ),
                "kititans_generated_tokens_total": (self.generated_tokens, "tokens generated"),
                "kititans_decode_steps_total": (self.decode_steps, "batched decode steps"),
            }
            for name, (value, text) in counters.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {value}"]
            all_gauges = {"kititans_tokens_per_second": (tps, "tokens generated per second, last 10 s"),
                          **gauges}  # fmt: skip
            for name, (value, text) in all_gauges.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {float(value):g}"]
            for name, hist, text in (
                ("kititans_time_to_first_token_seconds", self.ttft, "time from arrival to the first token"),
                ("kititans_batch_size", self.batch, "sequences stepped together per decode step"),
                ("kititans_request_duration_seconds", self.duration, "time from arrival to the last byte"),
            ):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(lines) + "\n"
