"""The HTTP routes of `kititans serve` (a Starlette app): bodies read within limits, the key checked, the
request parsed and tokenized off the event loop, handed to the engine, answered as JSON or as SSE.

Limits enforced here (the transport, serve/transport.py, adds the header timeout and the connection cap):
- body: at most `max_body_bytes`, counted as it arrives, so a missing, lying or chunked length cannot get
  more through; a body that does not arrive within `body_timeout` gets 408. Any answer sent before the
  body was read closes the connection, so an unread body can never be taken for the next request.
- every error is an OpenAI-style JSON body; an internal exception is logged with an id and the client sees
  only the id.
- a client that disconnects cancels its request: the engine drops its sequences at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route

from kititans.serve import api, shapes
from kititans.serve.api import ApiError, ModelInfo
from kititans.serve.cache import tenant_key
from kititans.serve.engine import Call, Engine, Job

log = logging.getLogger("kititans.serve")
access = logging.getLogger("kititans.serve.access")


@dataclass
class Limits:
    max_body_bytes: int = 8 << 20
    body_timeout: float = 30.0
    request_timeout: float = 600.0


class Gone(Exception):
    """The client went away; nothing to answer."""


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> Response:
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    return Response(data, status, headers=headers, media_type="application/json")


class Routes:
    def __init__(
        self, engine: Engine, info: ModelInfo, api_key: str | None, limits: Limits, page: str,
        searcher: Any = None,
    ):  # fmt: skip
        self.engine, self.info, self.limits = engine, info, limits
        self.sessions = engine.sessions  # serve/sessions.py SessionStore of --sessions, or None
        self.searcher = searcher  # kititans.retrieval.search.Searcher of --index, for /v1/search
        self.codec = engine.codec
        self.api_key = api_key
        self.page = page
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="kititans-serve-prep")  # parse + tokenize

    # -- plumbing

    def _token(self, request: Request) -> str:
        given = request.headers.get("authorization", "")
        return given[7:].strip() if given[:7].lower() == "bearer " else ""

    def _check_key(self, request: Request) -> None:
        if self.api_key and not hmac.compare_digest(self._token(request).encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    async def _body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is None and "transfer-encoding" not in request.headers:
            raise ApiError(411, "A Content-Length header is required", code="length_required")
        if length is not None and (not length.isdigit() or int(length) > self.limits.max_body_bytes):
            raise ApiError(
                413, f"The request body is over {self.limits.max_body_bytes} bytes", code="too_large"
            )
        loop = asyncio.get_running_loop()
        parts, total, deadline = [], 0, loop.time() + self.limits.body_timeout
        chunks = request.stream().__aiter__()
        while True:
            try:  # asyncio.wait_for, not asyncio.timeout: Python 3.10 has no asyncio.timeout
                part = await asyncio.wait_for(chunks.__anext__(), max(deadline - loop.time(), 0.001))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise ApiError(
                    408,
                    f"The request body did not arrive within {self.limits.body_timeout:g} s",
                    code="timeout",
                ) from None
            except ClientDisconnect:
                raise Gone() from None
            total += len(part)
            if total > self.limits.max_body_bytes:
                raise ApiError(
                    413, f"The request body is over {self.limits.max_body_bytes} bytes", code="too_large"
                )
            parts.append(part)
        request.state.body_read = True
        return b"".join(parts)

    async def _prepare(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _guard(self, handler: Any) -> Any:
        """Wrap a handler: ApiError -> its JSON; Gone -> a bare close; anything else -> a logged 500."""

        async def run(request: Request) -> Response:
            request.state.body_read = request.method in ("GET", "HEAD")
            try:
                return await handler(request)
            except ApiError as e:
                headers = dict(e.headers)
                if not request.state.body_read:  # the unread body must not become the next request
                    headers["Connection"] = "close"
                return _json(e.status, e.body(), headers)
            except Gone:
                return Response(status_code=499, headers={"Connection": "close"})
            except Exception:
                err = api.ApiError(500, "internal error", type="server_error")
                log.exception("request failed")
                return _json(500, err.body(), {"Connection": "close"})

        return run

    # -- endpoints

    async def health(self, request: Request) -> Response:
        e = self.engine
        body = {"status": "stopping" if e.stopping else "ok", "model": self.info.id,
                "runtime": self.info.runtime, "active": len(e.active), "queued": e.queued}  # fmt: skip
        return _json(503 if e.stopping else 200, body)

    async def index(self, request: Request) -> Response:
        return HTMLResponse(self.page, headers={"Cache-Control": "no-store"})

    async def metrics(self, request: Request) -> Response:
        self._check_key(request)
        text = self.engine.metrics.render(self.engine.gauges())
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(self, request: Request) -> Response:
        self._check_key(request)
        name = request.path_params.get("name")
        if name is None:
            return _json(200, shapes.models_list(self.info))
        api.check_model({"model": name}, self.info)
        return _json(200, shapes.model_card(self.info))

    async def tokenizer_info(self, request: Request) -> Response:
        """vLLM's tokenizer endpoints, which lm-eval's remote tokenizer uses (`tokenizer_backend="remote"`)."""
        self._check_key(request)
        c = self.codec
        piece = getattr(c, "id_to_piece", lambda i: None)
        return _json(200, {"eos_token": piece(c.stop_ids[0]) if c.stop_ids else None,
                           "bos_token": piece(c.bos_id), "pad_token": None,
                           "chat_template": c.chat_template, "model_max_length": self.info.context_length})  # fmt: skip

    async def tokenize(self, request: Request) -> Response:
        self._check_key(request)
        data = api.parse_json(await self._body(request))
        text = data.get("prompt")
        if not isinstance(text, str):
            raise ApiError(400, "`prompt` must be a string", param="prompt")
        ids = await self._prepare(self.codec.encode_special, text)
        if data.get("add_special_tokens"):
            ids = [self.codec.bos_id, *ids]
        return _json(200, {"tokens": ids, "count": len(ids), "max_model_len": self.info.context_length})

    async def detokenize(self, request: Request) -> Response:
        self._check_key(request)
        data = api.parse_json(await self._body(request))
        ids = data.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ApiError(400, "`tokens` must be a list of token ids", param="tokens")
        return _json(200, {"prompt": self.codec.decode(ids)})

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, api.chat_request)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, api.completion_request)

    async def embeddings(self, request: Request) -> Response:
        self._check_key(request)
        body = await self._body(request)
        if self.info.task != "embed":
            raise ApiError(400, f"`{self.info.id}` is a language model: /v1/embeddings needs an encoder",
                           code="not_an_encoder")  # fmt: skip
        req = await self._prepare(lambda: api.embedding_request(api.parse_json(body), self.info, self.codec))
        job = await self._run(request, Job(req, None, self.limits.request_timeout))
        return _json(
            200, shapes.embeddings(self.info, job.vectors, req.base64, req.dimensions, req.prompt_tokens)
        )

    async def search(self, request: Request) -> Response:
        """kititans.retrieval.api's /v1/search over the --index folder, run in the engine thread (the query is
        embedded by the served encoder)."""
        from kititans.retrieval.api import search_request

        self._check_key(request)
        body = await self._body(request)
        if self.searcher is None:
            raise ApiError(404, "This server has no index: serve an encoder with --index DIR (kititans index)",
                           code="no_index")  # fmt: skip
        data = await self._prepare(api.parse_json, body)
        api.check_model(data, self.info)
        fn = lambda: search_request(self.searcher, data, self.info.id)  # noqa: E731
        job = await self._run(request, Job(Call(fn), None, self.limits.request_timeout))
        return _json(200, job.result)

    async def _generate(self, request: Request, parse: Any) -> Response:
        self._check_key(request)
        body = await self._body(request)
        if self.info.task != "lm":
            raise ApiError(400, f"`{self.info.id}` is an encoder: it serves /v1/embeddings only",
                           code="not_a_language_model")  # fmt: skip
        req = await self._prepare(lambda: parse(api.parse_json(body), self.info, self.codec))
        ticket = await self._session(request, req)
        tenant = None if ticket else tenant_key(self._token(request), req.cache_key)
        job = Job(req, tenant, self.limits.request_timeout)
        job.session = ticket
        if req.stream:
            queue = self._attach(job)
            self._submit(job)
            return StreamingResponse(self._sse(job, queue), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        await self._run(request, job)
        return _json(200, shapes.response(req, self.info, job, self.engine.token_text))

    async def _session(self, request: Request, req: api.Request) -> Any:
        """The request's hold on its session (serve/sessions.py), its file read and its prompt checked."""
        if req.session is None:
            return None
        if self.sessions is None:
            raise ApiError(400, "This server keeps no sessions: start it with --sessions DIR (Titans models)",
                           param="session", code="sessions_off")  # fmt: skip
        ticket = self.sessions.open(self._token(request), req.session)
        try:
            await self._prepare(self.sessions.read, ticket, req.prompts[0])
        except BaseException:
            ticket.release()
            raise
        return ticket

    # -- the engine hand-over

    def _submit(self, job: Job) -> None:
        try:
            self.engine.submit(job)
        except BaseException:
            if job.session is not None:
                job.session.release()
            raise

    def _attach(self, job: Job) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        job.sink = (asyncio.get_running_loop(), queue.put_nowait)
        return queue

    async def _run(self, request: Request, job: Job) -> Job:
        """Submit and wait for the end, cancelling the job if the client disconnects first."""
        queue = self._attach(job)
        self._submit(job)

        async def finished() -> None:
            while True:
                for event in await queue.get():
                    if event[0] == "error":
                        raise event[1]
                    if event[0] == "end":
                        return

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        done_task, gone_task = asyncio.ensure_future(finished()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({done_task, gone_task}, timeout=self.limits.request_timeout + 30,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            gone_task.cancel()
            if not done_task.done():
                job.cancelled.set()
                done_task.cancel()
        if not done_task.done() or done_task.cancelled():
            raise Gone()
        done_task.result()  # raises the job's ApiError
        return job

    async def _sse(self, job: Job, queue: asyncio.Queue) -> Any:
        req, tt, done = job.req, self.engine.token_text, False

        def event(obj: Any) -> bytes:
            return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"

        try:
            for obj in shapes.first_chunks(req, self.info):
                yield event(obj)
            while not done:
                out = []
                for ev in await queue.get():
                    if ev[0] == "delta":
                        out += [event(c) for c in shapes.delta_chunks(req, self.info, ev, tt)]
                    elif ev[0] == "error":
                        out.append(event(ev[1].body()))
                        done = True
                    elif ev[0] == "end":
                        if req.include_usage:
                            out.append(event(shapes.usage_chunk(req, self.info, job)))
                        done = True
                if done:
                    out.append(b"data: [DONE]\n\n")
                yield b"".join(out)
        finally:
            if not done:  # the client went away mid-stream: its sequences leave the batch
                job.cancelled.set()

    def routes(self) -> list[Route]:
        g = self._guard
        table = [
            ("/", self.index, ["GET"]),
            ("/health", self.health, ["GET"]),
            ("/metrics", self.metrics, ["GET"]),
            ("/tokenizer_info", self.tokenizer_info, ["GET"]),
            ("/tokenize", self.tokenize, ["POST"]),
            ("/detokenize", self.detokenize, ["POST"]),
        ]
        for prefix in ("/v1", ""):  # llama-server answers /chat/completions too
            table += [
                (f"{prefix}/models", self.models, ["GET"]),
                (f"{prefix}/models/{{name:path}}", self.models, ["GET"]),
                (f"{prefix}/chat/completions", self.chat, ["POST"]),
                (f"{prefix}/completions", self.completions, ["POST"]),
                (f"{prefix}/embeddings", self.embeddings, ["POST"]),
                (f"{prefix}/search", self.search, ["POST"]),
            ]
        return [Route(path, g(fn), methods=methods) for path, fn, methods in table]


def build_app(routes: Routes) -> Any:
    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        known = status == 405
        err = ApiError(status, f"{'Method not allowed' if known else 'Unknown request URL'}: "
                       f"{request.method} {request.url.path}",
                       code="method_not_allowed" if known else "unknown_url")  # fmt: skip
        # a body we did not read must not be taken for the next request
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        return _json(status, err.body(), {"Connection": "close"} if has_body else None)

    app = Starlette(routes=routes.routes(), exception_handlers={404: not_found, 405: not_found})
    return AccessLog(app, routes.engine.metrics)


class AccessLog:
    """One line per request (client, method, path, status, bytes, ms) on the `kititans.serve.access`
    logger, and the request counters of /metrics."""

    KNOWN = ("/", "/health", "/metrics", "/tokenizer_info", "/tokenize", "/detokenize")

    def __init__(self, app: Any, metrics: Any):
        self.app, self.metrics = app, metrics

    def _route(self, path: str) -> str:
        p = path.removeprefix("/v1") or "/"
        if path in self.KNOWN:
            return path
        if p.startswith("/models"):
            return "/v1/models"
        known = ("/chat/completions", "/completions", "/embeddings", "/search")
        return f"/v1{p}" if p in known else "other"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, info = time.monotonic(), {"status": 0, "bytes": 0}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
            elif message["type"] == "http.response.body":
                info["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            ms = 1000 * (time.monotonic() - t0)
            client = scope.get("client") or ("-", 0)
            status = info["status"] or 499  # 499: the client closed before an answer
            when = time.strftime("%Y-%m-%dT%H:%M:%S")
            access.info('%s %s "%s %s" %d %dB %.1fms', when, client[0], scope["method"], scope["path"], status,
                        info["bytes"], ms)  # fmt: skip
            self.metrics.request(scope["method"], self._route(scope["path"]), status, ms / 1000)
