"""`kititans serve`: an OpenAI-compatible HTTP server over any runtime (a floor above kititans/runtimes).

    GET  /health                 liveness, queue length
    GET  /v1/models              the one served model
    POST /v1/chat/completions    chat (the model's own chat template), streaming with "stream": true (SSE)
    POST /v1/completions         plain completion of a prompt (after BOS, as `kititans generate`)

Standard library only (http.server): one thread per connection parses and checks the request and streams
the answer, while kititans/serve_engine.py runs the model for one request at a time. serve_api.py holds the
OpenAI wire format; every error is an OpenAI-style JSON body with the matching HTTP status (400 bad
request, 401 wrong key, 404 unknown model or URL, 413 body too large, 503 queue full, 500 runtime failure).
A client that disconnects mid-stream only cancels its own generation.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import select
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kititans
from kititans import serve_api as api
from kititans.errors import KititansError
from kititans.generate import SamplingConfig
from kititans.serve_api import ApiError, ModelInfo, Request
from kititans.serve_engine import Engine, Job

log = logging.getLogger("kititans.serve")
GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout)


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 = any free port
    api_key: str | None = None
    model_name: str | None = None
    max_queue: int = 64
    max_body_bytes: int = 8 << 20


def _near(path: Path, name: str) -> Path | None:
    """`name` in the artifact's folder, a tokenizer/ folder beside it, or up to its run directory."""
    folder = path if path.is_dir() else path.parent
    for d in [folder, *list(folder.parents)[:3]]:
        for cand in (d / name, d / "tokenizer" / name):
            if cand.is_file():
                return cand
    return None


def _read(path: Path | None) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        return {}


def model_info(path: str | Path, rt: Any, name: str | None = None) -> ModelInfo:
    """Id, context, family and default sampling (generation_config.json) of the served artifact."""
    path = Path(path).resolve()
    run = next((d for d in [path, *path.parents] if (d / "model.safetensors").is_file()), None)
    if name is None:  # runs/tiny -> "tiny"; runs/tiny/export/model.q4_k_m.gguf -> "tiny/model.q4_k_m.gguf"
        inside = run is not None and run != path
        base = run / "export" if inside and (run / "export") in path.parents else run
        name = f"{run.name}/{path.relative_to(base).as_posix()}" if inside else path.name
    gen = _read(_near(path, "generation_config.json"))
    meta = _read(run / "config.json").get("kititans", {}) if run else {}
    defaults = SamplingConfig()
    sampling = SamplingConfig(
        temperature=float(gen.get("temperature", defaults.temperature))
        if gen.get("do_sample", True)
        else 0.0,
        top_k=int(gen.get("top_k", defaults.top_k)),
        top_p=float(gen.get("top_p", defaults.top_p)),
        repetition_penalty=float(gen.get("repetition_penalty", defaults.repetition_penalty)),
        max_tokens=int(gen.get("max_new_tokens", defaults.max_tokens)),
    )
    return ModelInfo(name, int(rt.context_length), rt.name, meta.get("family"), sampling)


class Server:
    """The HTTP server and its engine; `start()` serves in a background thread, `serve_forever()` here."""

    def __init__(self, rt: Any, info: ModelInfo, cfg: ServeConfig | None = None):
        self.cfg = cfg or ServeConfig()
        self.info, self.codec = info, rt.codec
        self.engine = Engine(rt, self.cfg.max_queue)
        handler = type("Handler", (_Handler,), {"app": self})
        try:
            self.httpd = ThreadingHTTPServer((self.cfg.host, self.cfg.port), handler)
        except OSError as e:
            self.engine.close()
            raise KititansError(
                f"cannot listen on {self.cfg.host}:{self.cfg.port} ({e.strerror or e}): pick another --port"
            ) from None
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever(poll_interval=0.2)
        finally:
            self.close()

    def start(self) -> Server:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1})
        self._thread.daemon = True
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self.httpd.server_close()
        self.engine.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked transfer encoding
    # TCP_NODELAY: without it each small write after the first waits for the client's delayed ACK (~40 ms:
    # the body after the headers, every streamed token)
    disable_nagle_algorithm = True
    server_version = f"kititans/{kititans.__version__}"
    app: Server

    # ------------------------------------------------------------------ routing

    def do_GET(self) -> None:
        self._dispatch({"/health": self._health, "/v1/models": self._models}, "GET")

    def do_POST(self) -> None:
        routes = {"/v1/chat/completions": self._chat, "/v1/completions": self._completion}
        self._dispatch(routes, "POST")

    def do_PUT(self) -> None:
        self._dispatch({}, "PUT")

    do_DELETE = do_PATCH = do_PUT

    def _dispatch(self, routes: dict[str, Any], method: str) -> None:
        t0 = time.perf_counter()
        self.status = 0
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        if not path.startswith("/v1/") and path != "/health":
            path = "/v1" + path  # llama-server answers /chat/completions too
        try:
            handler = routes.get(path) or (self._model if path.startswith("/v1/models/") else None)
            if handler is None or (handler == self._model and method != "GET"):
                known = path in ("/health", "/v1/models", "/v1/chat/completions", "/v1/completions")
                raise ApiError(
                    405 if known else 404,
                    f"{'Method not allowed' if known else 'Unknown request URL'}: {method} {self.path}",
                    code="method_not_allowed" if known else "unknown_url",
                )
            if path != "/health":
                self._check_key()
            handler()
        except ApiError as e:
            self._json(e.status, e.body())
        except GONE:
            self.close_connection = True
        except Exception as e:  # never let one request take the server down
            log.exception("request failed")
            self._json(500, ApiError(500, f"internal error: {e}", type="server_error").body())
        log.info("%s %s %s %.0f ms", method, self.path, self.status, 1000 * (time.perf_counter() - t0))

    def _check_key(self) -> None:
        key = self.app.cfg.api_key
        if not key:
            return
        given = self.headers.get("Authorization", "")
        token = given[7:] if given.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    # ------------------------------------------------------------------ endpoints

    def _health(self) -> None:
        eng = self.app.engine
        self._json(
            200,
            {
                "status": "ok",
                "model": self.app.info.id,
                "runtime": self.app.info.runtime,
                "busy": eng.busy,
                "queued": eng.queued,
                "served": eng.served,
            },
        )

    def _models(self) -> None:
        self._json(200, api.models_list(self.app.info))

    def _model(self) -> None:
        name = self.path.split("?", 1)[0][len("/v1/models/") :].rstrip("/")
        api.check_model({"model": name}, self.app.info)
        self._json(200, api.model_card(self.app.info))

    def _chat(self) -> None:
        self._generate(api.chat_request(self._body(), self.app.info, self.app.codec))

    def _completion(self) -> None:
        self._generate(api.completion_request(self._body(), self.app.info, self.app.codec))

    # ------------------------------------------------------------------ plumbing

    def _body(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError(411, "A Content-Length header is required", code="length_required")
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, f"bad Content-Length {length!r}", code="invalid_request") from None
        if n > self.app.cfg.max_body_bytes:
            self.close_connection = True  # the unread body would be parsed as the next request
            raise ApiError(
                413, f"The request body is over {self.app.cfg.max_body_bytes} bytes", code="too_large"
            )
        return api.parse_json(self.rfile.read(n))

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.status = status
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except GONE:
            self.close_connection = True

    def _generate(self, req: Request) -> None:
        job = self.app.engine.submit(req)
        if req.stream:
            self._stream(job)
            return
        while True:
            kind, value = self._next_event(job)
            if kind == "done":
                self._json(200, api.response(req, self.app.info, value))
                return
            if kind == "error":
                raise value

    def _next_event(self, job: Job) -> tuple[str, Any]:
        """The job's next event; while waiting, notice a client that closed its connection (cancel the job)."""
        while True:
            try:
                return job.events.get(timeout=0.25)
            except queue.Empty:
                if self._client_gone():
                    job.cancelled.set()
                    raise ConnectionAbortedError("client went away") from None

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _stream(self, job: Job) -> None:
        req, info = job.req, self.app.info
        self.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if (first := api.first_chunk(req, info)) is not None:
                self._event(first)
            while True:
                kind, value = self._next_event(job)
                if kind == "delta":
                    text, (kind, value) = self._more_deltas(job, value)
                    self._event(api.chunk(req, info, text))
                if kind == "error":
                    self._event(value.body())
                    break
                if kind == "done":
                    self._event(api.chunk(req, info, None, value.finish_reason))
                    if req.include_usage:
                        self._event(api.usage_chunk(req, info, value))
                    break
            self._write(b"data: [DONE]\n\n")
            self._write(b"")  # the last chunk of the chunked body
        except GONE:
            job.cancelled.set()
            self.close_connection = True

    @staticmethod
    def _more_deltas(job: Job, text: str) -> tuple[str, tuple[str, Any]]:
        """`text` plus the deltas that arrived meanwhile (one chunk, one write per wake-up), and the event
        that ended the run of deltas (("delta", None) when none did)."""
        while True:
            try:
                kind, value = job.events.get_nowait()
            except queue.Empty:
                return text, ("delta", None)
            if kind != "delta":
                return text, (kind, value)
            text += value

    def _event(self, obj: Any) -> None:
        self._write(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")

    def _write(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:  # http.server's own log: into ours, quietly
        log.debug(format, *args)
