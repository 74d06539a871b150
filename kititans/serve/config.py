"""`ServeConfig`: every setting and limit of `kititans serve` in one place (light: the CLI reads its defaults
to build --help without importing the server)."""

from __future__ import annotations

from dataclasses import dataclass

from kititans.errors import KititansError


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = any free port
    api_key: str | None = None
    model_name: str | None = None
    parallel: int = 16  # sequences decoded together
    cache_slots: int = 8  # conversations kept for prompt caching (per client key + conversation id)
    max_queue: int = 64  # requests waiting to start; more get 503 + Retry-After
    max_body_bytes: int = 8 << 20
    max_header_bytes: int = 16384  # request line + headers
    max_connections: int = 1024  # open connections; more get 503 and are closed
    header_timeout: float = 10.0  # s for a request's line and headers to arrive
    body_timeout: float = 30.0  # s for its body to arrive
    keep_alive: float = 5.0  # s an idle kept-alive connection stays open
    request_timeout: float = 600.0  # s from arrival to the last token (per-request deadline)
    shutdown_grace: float = 10.0  # s in-flight requests get to finish after SIGTERM
    prefill_budget: int = 512  # prompt tokens started per engine turn while others decode
    index: str | None = None  # an encoder's `kititans index` folder: POST /v1/search
    sessions: str | None = None  # a folder of Titans sessions: the `session` field (serve/sessions.py)

    def check(self) -> ServeConfig:
        for name in ("parallel", "max_queue", "max_body_bytes", "max_header_bytes", "max_connections",
                     "prefill_budget"):  # fmt: skip
            if getattr(self, name) < 1:
                raise KititansError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        for name in ("header_timeout", "body_timeout", "keep_alive", "request_timeout"):
            if not getattr(self, name) > 0:
                raise KititansError(f"--{name.replace('_', '-')} must be above 0, got {getattr(self, name)}")
        if self.cache_slots < 0 or self.shutdown_grace < 0:
            raise KititansError("--cache-slots and --shutdown-grace must be at least 0")
        if not 0 <= self.port <= 65535:
            raise KititansError(f"--port must be from 0 to 65535, got {self.port}")
        return self
