"""Helpers for the serve tests: a server on a free port, raw HTTP over a socket, the openai client."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from kititans.runtimes import load_runtime
from kititans.serve import ServeConfig, Server, model_info

pytest.importorskip("uvicorn", reason="kititans serve needs uvicorn (pip install 'kititans[serve]')")
pytest.importorskip("starlette", reason="kititans serve needs starlette (pip install 'kititans[serve]')")


def start(path: Path, runtime: str | None = None, **cfg) -> Server:
    rt = load_runtime(path, runtime)
    return Server(rt, model_info(path, rt), ServeConfig(port=0, **cfg)).start()


def client(server: Server, key: str = "none"):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def connect(server: Server, timeout: float = 30) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from the socket: status, headers (lower-case), body (Content-Length or chunked)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            raise ConnectionError(f"closed before a response: {buf!r}")
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    if "content-length" in headers:
        n = int(headers["content-length"])
        while len(rest) < n:
            data = s.recv(65536)
            if not data:
                break
            rest += data
        return status, headers, rest[:n]
    if "chunked" not in headers.get("transfer-encoding", ""):  # delimited by the close
        while data := s.recv(65536):
            rest += data
        return status, headers, rest
    body = b""
    while True:  # chunked
        while b"\r\n" not in rest:
            rest += s.recv(65536)
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        while len(rest) < size + 2:
            rest += s.recv(65536)
        body, rest = body + rest[:size], rest[size + 2 :]
        if size == 0:
            return status, headers, body


def post(model: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {model} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def closed(s: socket.socket, timeout: float = 5) -> bool:
    """Whether the server closed the connection (EOF) within `timeout`."""
    s.settimeout(timeout)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


def recv_until(s: socket.socket, marker: bytes, limit: int = 1 << 20) -> bytes:
    """Read until `marker` has arrived (the start of a stream: headers and the first events)."""
    buf = b""
    while marker not in buf and len(buf) < limit:
        data = s.recv(65536)
        if not data:
            break
        buf += data
    return buf
