"""The transport of `kititans serve`: uvicorn with its h11 protocol, hardened where uvicorn leaves it to
the application, and the server's life (start, serve, graceful shutdown on SIGTERM / Ctrl-C).

Why uvicorn + h11: uvicorn is the maintained ASGI server llama-cpp-python's and vLLM's servers run on; one
asyncio thread holds every connection (epoll/kqueue: no `select()` limit at 1,024 descriptors, no thread per
client), and h11 parses strictly (a Content-Length that is not digits, negative or doubled is a 400; chunked
bodies are framed; request line + headers are capped at `max_header_bytes`). h11 rather than httptools:
pure Python, so the same parser runs on every device kititans serves from.

What uvicorn does not do, `GuardedH11` adds (research wave3 §1): a deadline for the request line and
headers of every request on a connection (`header_timeout`; a client that stalls mid-headers is
disconnected, and the next request on a kept-alive connection gets the same deadline), and a cap on open
connections (`max_connections`: beyond it a new connection gets a 503 with Retry-After and is closed,
never queued). Idle keep-alive connections close after `keep_alive` s (uvicorn's timer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("kititans.serve")


@dataclass
class TransportLimits:
    max_connections: int = 1024
    header_timeout: float = 10.0
    keep_alive: float = 5.0
    max_header_bytes: int = 16384


_BUSY = b'{"error": {"message": "Too many open connections: retry later", "type": "server_error", "code": "too_many_connections"}}'
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY)
)


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap (set on the subclass)."""

    limits = TransportLimits()

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        self._head = b""  # bytes of the request line and headers seen so far (the size cap)
        if len(self.server_state.connections) >= self.limits.max_connections:
            transport.write(REFUSED)
            transport.close()
            self.transport = transport
            self.flow = None  # type: ignore[assignment]
            self.cycle = None  # type: ignore[assignment]
            self.conn = h11.Connection(h11.SERVER)
            return
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self._in_request() and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if not self._in_request():  # h11 caps only headers that arrive in pieces: count them ourselves
            seen = self._head + data
            end = seen.find(b"\r\n\r\n")
            if (end if end >= 0 else len(seen)) > self.limits.max_header_bytes:
                self._refuse(431, "Request Header Fields Too Large", "headers_too_large",
                             f"The request line and headers are over {self.limits.max_header_bytes} bytes")  # fmt: skip
                return
            self._head = b"" if end >= 0 else seen
        super().data_received(data)
        if self._in_request():
            self._disarm()
        elif not self.transport.is_closing():
            self._arm()  # bytes of a next request arrived: its headers get the same deadline

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._in_request() and not self.transport.is_closing():
            self._disarm()  # uvicorn's keep-alive timer watches the idle connection now
            self._head = b""

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse (bad or conflicting Content-Length, bad chunking): an OpenAI-style
        JSON 400, then the connection closes (its framing cannot be trusted)."""
        self._refuse(400, "Bad Request", "bad_http_request",
                     "Invalid HTTP request: its request line, headers or body length cannot be parsed")  # fmt: skip

    def _refuse(self, status: int, reason: str, code: str, message: str) -> None:
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode()  # fmt: skip
        if not self.transport.is_closing():
            self.transport.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (status, reason.encode(), len(body), body)
            )
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.flow is None:  # refused in connection_made: never registered
            return
        super().connection_lost(exc)


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def uvicorn_server(app: Any, limits: TransportLimits, on_shutdown: Any) -> Any:
    """A uvicorn.Server over `app` with GuardedH11; `on_shutdown()` runs when the shutdown begins (the
    engine stops taking requests and gives the active ones their grace period)."""
    import uvicorn

    protocol = type("Guarded", (GuardedH11,), {"limits": limits})
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # our own lines say when it starts and stops
    config = uvicorn.Config(
        app,
        http=protocol,
        ws="none",
        lifespan="off",
        loop="asyncio",
        log_config=None,
        access_log=False,
        server_header=False,
        date_header=True,
        headers=[("server", "kititans")],
        timeout_keep_alive=int(max(1, limits.keep_alive)),
        timeout_graceful_shutdown=None,
        h11_max_incomplete_event_size=limits.max_header_bytes,
    )

    class Server(uvicorn.Server):
        grace = 10.0

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            on_shutdown()
            self.config.timeout_graceful_shutdown = int(self.grace) + 2  # then uvicorn cancels what is left
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            """SIGTERM and SIGINT start the graceful shutdown (a second SIGINT forces it); unlike uvicorn's
            own handler nothing is re-raised afterwards, so the process exits 0."""
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handlers = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in handlers.items():
                    signal.signal(s, h)

    return Server(config)
