"""Hostile and slow clients over raw sockets: every limit of `kititans serve` holds, each case gets one clear
answer, and the server keeps serving with bounded threads and memory. About 20 s."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import psutil
import pytest

from tests.serve.conftest import client, closed, connect, post, read_response, recv_until, start

KEY = "sekrit"
AUTH = f"Authorization: Bearer {KEY}\r\n"


@pytest.fixture(scope="module")
def server(debug_run):
    s = start(
        debug_run, api_key=KEY, header_timeout=1.5, body_timeout=1.5, max_body_bytes=64 << 10, keep_alive=1
    )
    yield s
    s.close()


def request(server, raw: bytes, timeout: float = 30) -> tuple[int, dict, bytes, socket.socket]:
    s = connect(server, timeout)
    s.sendall(raw)
    status, headers, body = read_response(s)
    return status, headers, body, s


def completion(max_tokens: int = 4, **extra) -> dict:
    return {"prompt": "Tom had a ball.", "max_tokens": max_tokens, "temperature": 0, **extra}


def sdk(max_tokens: int = 4, **extra) -> dict:
    """completion() as openai-client keywords (our own fields through extra_body)."""
    return {"prompt": "Tom had a ball.", "max_tokens": max_tokens, "temperature": 0, "extra_body": extra}


def head(path: str, *lines: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{AUTH}" + "".join(f"{ln}\r\n" for ln in lines) + "\r\n"
    ).encode()


def test_content_length_negative_non_numeric_and_oversized(server):
    body = json.dumps(completion()).encode()
    for bad in ("-1", "abc", "1e3", "12, 13"):
        status, headers, data, s = request(server, head("/v1/completions", f"Content-Length: {bad}") + body)
        assert status == 400 and json.loads(data)["error"]["code"] == "bad_http_request", bad
        assert closed(s), bad  # the connection is not reused after a framing error
    # announced over the limit: 413 at once, the body is never read, the connection closes
    status, headers, data, s = request(server, head("/v1/completions", "Content-Length: 1000000000000"))
    assert status == 413 and json.loads(data)["error"]["code"] == "too_large"
    assert headers["connection"] == "close" and closed(s)


def test_short_lying_and_chunked_bodies(server):
    # shorter than announced: 408 after the body deadline, then the connection closes
    t0 = time.monotonic()
    status, _, data, s = request(server, head("/v1/completions", "Content-Length: 500") + b'{"prompt": ')
    assert status == 408 and json.loads(data)["error"]["code"] == "timeout" and closed(s)
    assert 1.0 < time.monotonic() - t0 < 10
    # a chunked body is read (and answered), and one over the limit is cut at the limit
    body = json.dumps(completion()).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:10], body[10:])) + b"0\r\n\r\n"
    status, _, data, s = request(server, head("/v1/completions", "Transfer-Encoding: chunked") + chunks)
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 4
    s.close()
    big = b"x" * 8192  # 8 chunks reach the 64 KiB limit, one byte more is over it
    s = connect(server)
    s.sendall(
        head("/v1/completions", "Transfer-Encoding: chunked") + b"2000\r\n%s\r\n" % big * 8 + b"1\r\nx\r\n"
    )
    status, _headers, data = read_response(s)
    assert status == 413 and json.loads(data)["error"]["code"] == "too_large" and closed(s)
    # no Content-Length and not chunked: 411
    status, _, data, s = request(server, head("/v1/completions"))
    assert status == 411 and json.loads(data)["error"]["code"] == "length_required"
    s.close()


def test_wrong_key_with_a_body_gets_exactly_one_response(server):
    smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
        f"Content-Length: {len(smuggled)}\r\n\r\n"
    ).encode() + smuggled
    status, headers, data, s = request(server, raw)
    assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
    s.settimeout(3)
    rest = b""
    try:
        while chunk := s.recv(65536):
            rest += chunk
    except TimeoutError:
        pass
    assert b"HTTP/1.1" not in rest  # the body was never taken for a second request
    # an unknown URL with a body: the same
    status, headers, data, s = request(
        server, head("/v1/nope", f"Content-Length: {len(smuggled)}") + smuggled
    )
    assert status == 404 and headers["connection"] == "close" and closed(s)
    s.close()


def test_headers_too_large_or_too_slow(server):
    for big in (b"a" * 40000, b"a" * 9000 + b"\r\nX-More: " + b"b" * 9000):  # one header, or several
        status, _, data, s = request(
            server, head("/v1/completions", "X-Big: " + big.decode(), "Content-Length: 2")
        )
        assert status == 431 and json.loads(data)["error"]["code"] == "headers_too_large" and closed(s)
    s = connect(server)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and never the rest
    t0 = time.monotonic()
    assert closed(s, timeout=10) and time.monotonic() - t0 < 6  # header deadline 1.5 s
    # on a kept-alive connection, the next request's headers get the same deadline
    s = connect(server)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(s)[0] == 200
    s.sendall(b"GET /health HTTP/1.1\r\n")
    assert closed(s, timeout=10)


def test_idle_keep_alive_closes(server):
    s = connect(server)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(s)[0] == 200
    t0 = time.monotonic()
    assert closed(s, timeout=10) and time.monotonic() - t0 < 5  # keep-alive 1 s


def _stall(server, mid_body: bool) -> socket.socket:
    s = connect(server)
    if mid_body:
        s.sendall(head("/v1/completions", "Content-Length: 1000") + b'{"prompt": "')
    else:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-")
    return s


def test_300_stalled_connections_and_over_1024_descriptors(server):
    proc = psutil.Process()
    threads, rss = threading.active_count(), proc.memory_info().rss
    stalled = [_stall(server, i % 2 == 1) for i in range(300)]
    c = client(server, KEY)
    t0 = time.monotonic()
    out = c.completions.create(model=server.info.id, **completion(8))
    assert out.usage.completion_tokens == 8 and time.monotonic() - t0 < 5
    # more than 1,024 descriptors open in this process (clients and server): a new request still streams
    more = [_stall(server, False) for _ in range(800)]
    assert proc.num_fds() > 1024 + 300
    t0 = time.monotonic()
    events = list(c.completions.create(model=server.info.id, stream=True, **completion(6)))
    assert "".join(e.choices[0].text for e in events) and time.monotonic() - t0 < 5
    assert threading.active_count() <= threads + 3  # no thread per connection
    grew = (proc.memory_info().rss - rss) / 2**20
    assert grew < 100, f"RSS grew {grew:.0f} MiB for 1,100 stalled connections"
    for s in stalled + more:
        s.close()
    # the stalled ones were dropped by the deadlines: connections return to a handful
    deadline = time.monotonic() + 10
    while len(server.uvicorn.server_state.connections) > 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(server.uvicorn.server_state.connections) <= 5


def test_connection_cap(debug_run):
    s = start(debug_run, max_connections=20, header_timeout=30)
    try:
        held = [connect(s) for _ in range(20)]
        time.sleep(0.2)
        extra = connect(s)
        status, headers, _data = read_response(extra)
        assert status == 503 and headers["retry-after"] == "1" and closed(extra)
        for h in held:
            h.close()
        time.sleep(0.3)
        assert client(s).completions.create(model=s.info.id, **completion(3)).usage.completion_tokens == 3
    finally:
        s.close()


def slowed(server, seconds: float) -> None:
    """Make every decode step of the server's runtime take `seconds` (a slow model, for timing tests)."""
    step = server.engine.seqs.step

    def slow(tokens):
        time.sleep(seconds)
        return step(tokens)

    server.engine.seqs.step = slow


def test_full_queue_deadline_and_disconnect(debug_run):
    import openai

    s = start(debug_run, parallel=1, max_queue=1, request_timeout=3)
    slowed(s, 0.02)
    try:
        first = connect(s)
        first.sendall(post("/v1/completions", completion(200, stream=True, ignore_eos=True)))
        assert b"data: " in recv_until(first, b"data: ")  # running: holds the only slot
        second = connect(s)
        second.sendall(post("/v1/completions", completion(3)))  # waits in the queue
        time.sleep(0.3)
        with pytest.raises(openai.InternalServerError) as e:
            client(s).completions.create(model=s.info.id, **completion(3))
        assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
        assert e.value.body["code"] == "server_busy"
        # the client of the running stream goes away: its sequence leaves, the queued one runs
        first.close()
        status, _, data = read_response(second)
        assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 3
        assert s.engine.cancelled >= 1 and not s.engine.active
        # a request past its deadline (3 s) gets 504
        with pytest.raises(openai.APIStatusError) as e:
            client(s).completions.create(model=s.info.id, **sdk(240, ignore_eos=True))
        assert e.value.status_code == 504 and e.value.body["code"] == "timeout"
    finally:
        s.close()


def test_mid_stream_disconnect_leaves_the_batch(server):
    c = client(server, KEY)
    got: list[str] = []

    def steady() -> None:
        events = c.completions.create(model=server.info.id, stream=True, **sdk(40, ignore_eos=True))
        got.append("".join(e.choices[0].text for e in events))

    t = threading.Thread(target=steady)
    t.start()
    body = json.dumps(completion(5000, stream=True, ignore_eos=True)).encode()
    s = connect(server)
    s.sendall(head("/v1/completions", f"Content-Length: {len(body)}") + body)
    assert b"data: " in recv_until(s, b"data: ")
    cancelled = server.engine.cancelled
    s.close()
    deadline = time.monotonic() + 10
    while server.engine.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.engine.cancelled == cancelled + 1
    t.join(60)
    assert got and got[0]  # the other stream went on to its end
    assert not any(len(c.chooser.tokens) > 1000 for c in server.engine.active)


def test_internal_errors_do_not_leak(server, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(server.engine.seqs, "add", boom)
    status, _, data, s = request(server, post_key("/v1/completions", completion()))
    err = json.loads(data)["error"]
    assert status == 500 and "secret" not in err["message"] and "internal error" in err["message"]
    s.close()
    monkeypatch.undo()
    assert (
        client(server, KEY).completions.create(model=server.info.id, **completion(2)).usage.completion_tokens
        == 2
    )


def post_key(path: str, body: dict) -> bytes:
    return post(path, body).replace(b"Host: x\r\n", f"Host: x\r\n{AUTH}".encode(), 1)


def test_pid_threads_bounded_after_everything(server):
    """After the hostile tests, the server process still answers and holds no thread per client."""
    assert threading.active_count() < 20
    assert os.getpid() and client(server, KEY).models.list().data[0].id == server.info.id
