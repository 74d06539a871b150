"""An async client for any OpenAI-compatible endpoint (llama-server, vLLM, `kititans serve`, a hosted API).

httpx (the `distill` extra; the openai SDK depends on it too, so it is usually there already): one pooled
AsyncClient per run, a connection limit equal to the run's concurrency, separate connect/read timeouts. Each
request is retried on connection failures, timeouts, 408/409/429 and 5xx, with exponential backoff and jitter,
honouring the server's `Retry-After` / `retry-after-ms`. A request that still fails raises `EndpointError`
naming the URL and the last failure; a 4xx that retrying cannot fix raises `HttpError` at once.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from dataclasses import dataclass
from typing import Any

from kititans.errors import KititansError, require

RETRY_STATUS = {408, 409, 429}


class EndpointError(KititansError):
    """The endpoint cannot be used (unreachable after retries, no choices, not OpenAI-compatible)."""


class HttpError(KititansError):
    """A 4xx answer that retrying cannot fix; `status` says which (400: this request, 401/404: all of them)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


@dataclass
class EndpointConfig:
    url: str
    api_key: str | None = None
    model: str | None = None  # default: the first id of GET /models
    timeout: float = 300.0  # seconds to wait for one answer
    retries: int = 5  # after the first attempt
    backoff: float = 1.0  # first retry waits about this many seconds, doubling each time
    max_backoff: float = 60.0

    def __post_init__(self) -> None:
        self.url = normalize_url(self.url)


def normalize_url(url: str) -> str:
    """'http://host:8080' and 'http://host:8080/v1/' -> 'http://host:8080/v1' (a path given is kept)."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise KititansError(f"endpoint URL {url!r} must start with http:// or https://")
    rest = url.split("://", 1)[1]
    return url if "/" in rest else url + "/v1"


@dataclass
class Reply:
    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


def retry_after(headers: Any) -> float | None:
    """Seconds the server asks us to wait (retry-after-ms, or Retry-After as seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, when.timestamp() - time.time()) if when else None


def error_message(body: bytes) -> str:
    """The message of an OpenAI-style error body ({"error": {"message"}} or {"error": "..."}), or its text."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body[:200].decode("utf-8", "replace").strip()
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])
    if isinstance(err, str):
        return err
    return json.dumps(data)[:200]


def open_client(concurrency: int, timeout: float) -> Any:
    import logging

    httpx = require("httpx", "distill", "talking to an OpenAI-compatible endpoint")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request under the CLI's INFO log
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)))


class Endpoint:
    """One OpenAI-compatible endpoint (`role` names it in messages: teacher, user model, judge)."""

    def __init__(self, cfg: EndpointConfig, client: Any, role: str = "teacher"):
        self.cfg, self.client, self.role = cfg, client, role
        self.requests = self.retried = 0

    @property
    def model(self) -> str:
        return self.cfg.model or "default"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cfg.api_key}"} if self.cfg.api_key else {}

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The JSON answer of one request, retried as the module docstring says."""
        httpx = require("httpx", "distill", "talking to an OpenAI-compatible endpoint")
        url, cfg, last = f"{self.cfg.url}{path}", self.cfg, ""
        for attempt in range(cfg.retries + 1):
            wait = min(cfg.max_backoff, cfg.backoff * 2**attempt) * (0.5 + random.random() / 2)
            try:
                r = await self.client.request(method, url, json=body, headers=self._headers())
            except httpx.TimeoutException:
                last = f"no answer within {cfg.timeout:g} s"
            except httpx.TransportError as e:
                last = f"unreachable ({type(e).__name__}: {e or 'no detail'})"
            else:
                self.requests += 1
                if r.status_code == 200:
                    try:
                        return r.json()
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        raise EndpointError(
                            f"{self.role} {url} answered 200 with a body that is not JSON "
                            f"({r.text[:80]!r}): is it an OpenAI-compatible endpoint?"
                        ) from None
                msg = error_message(r.content)
                if r.status_code not in RETRY_STATUS and r.status_code < 500:
                    raise HttpError(f"{self.role} {url} answered HTTP {r.status_code}: {msg}", r.status_code)
                last = f"HTTP {r.status_code}: {msg}"
                asked = retry_after(r.headers)
                wait = min(cfg.max_backoff, asked) if asked is not None else wait
            if attempt < cfg.retries:
                self.retried += 1
                await asyncio.sleep(wait)
        raise EndpointError(
            f"{self.role} {url} failed after {cfg.retries + 1} attempts, last: {last} "
            f"(check that the server runs there, or raise --retries/--timeout)"
        )

    async def resolve_model(self) -> str:
        """--*-model, else the first model the endpoint lists (GET /models)."""
        if self.cfg.model:
            return self.cfg.model
        try:
            data = await self.request("GET", "/models")
        except HttpError:  # some endpoints have no /models: they take any name
            self.cfg.model = "default"
            return self.cfg.model
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list) or not models or not isinstance(models[0], dict):
            raise EndpointError(
                f"{self.role} {self.cfg.url}/models lists no models; name one with --{self.role}-model"
            )
        self.cfg.model = str(models[0].get("id"))
        return self.cfg.model

    async def chat(self, messages: list[dict[str, str]], sampling: dict[str, Any]) -> Reply:
        """One chat completion (non-streaming)."""
        body = {"model": self.model, "messages": messages, "stream": False, **sampling}
        data = await self.request("POST", "/chat/completions", body)
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise EndpointError(
                f"{self.role} {self.cfg.url}/chat/completions returned no choices "
                f"({json.dumps(data)[:120]}): is it an OpenAI-compatible chat endpoint?"
            )
        choice = choices[0]
        msg = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        text = msg.get("content")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return Reply(
            text if isinstance(text, str) else "",
            choice.get("finish_reason"),
            usage.get("prompt_tokens"),
            usage.get("completion_tokens"),
        )
