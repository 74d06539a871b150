"""The OpenAI wire format of `kititans serve`: request bodies -> checked jobs, results -> response JSON.

Pure data in and out (no sockets, no runtime): kititans/serve.py does HTTP, kititans/serve_engine.py runs the
model. Every problem with a request is an `ApiError` carrying the HTTP status and the OpenAI error fields
(`message`, `type`, `param`, `code`), so a client library raises its usual exception for it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from kititans.data.chat import ROLES, Message, render_prompt
from kititans.errors import KititansError
from kititans.generate import SamplingConfig, SamplingError

MAX_STOPS = 4
# roles clients send that mean one of ours (OpenAI's "developer" is the newer name of "system")
ROLE_ALIASES = {"developer": "system"}


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """One checked request: what the engine runs and how the answer is shaped."""

    kind: str  # "chat" | "completion"
    prompt_ids: list[int]
    sampling: SamplingConfig
    stops: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    echo: str = ""  # completions with echo=true: the prompt text, sent before the completion
    ignore_eos: bool = False  # llama-server's extension: generate max_tokens even past end-of-turn
    id: str = ""
    created: int = 0


@dataclass
class ModelInfo:
    """What the server says about the one model it serves."""

    id: str
    context_length: int
    runtime: str
    family: str | None
    defaults: SamplingConfig  # for fields a request leaves out (the model's generation_config.json)


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body.decode("utf-8") or "null")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(
            400, f"We could not parse the JSON body of your request ({e})", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object", code="invalid_json")
    return data


def check_model(data: dict[str, Any], model: ModelInfo) -> None:
    name = data.get("model", model.id)  # lenient like llama-server: a missing name means the served model
    if name != model.id:
        raise ApiError(
            404,
            f"The model `{name}` does not exist: this server serves `{model.id}`",
            param="model",
            code="model_not_found",
        )


def _number(data: dict[str, Any], key: str, default: Any, kind: type) -> Any:
    value = data.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok:
        raise ApiError(400, f"`{key}` must be {'a number' if kind is float else 'an integer'}", param=key)
    return kind(value)


def sampling(data: dict[str, Any], model: ModelInfo) -> SamplingConfig:
    """OpenAI sampling fields (plus top_k, min_p, repetition_penalty) -> a checked SamplingConfig."""
    d = model.defaults
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(data, key, 0.0, float) != 0.0:
            raise ApiError(
                400,
                f"`{key}` is not supported: use `repetition_penalty` (> 1 discourages repeats)",
                param=key,
            )
    if _number(data, "n", 1, int) != 1:
        raise ApiError(400, "`n` must be 1: this server returns one choice per request", param="n")
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    key = "max_completion_tokens" if "max_completion_tokens" in data else "max_tokens"
    cfg = SamplingConfig(
        temperature=_number(data, "temperature", d.temperature, float),
        top_k=_number(data, "top_k", d.top_k, int),
        top_p=_number(data, "top_p", d.top_p, float),
        min_p=_number(data, "min_p", d.min_p, float),
        repetition_penalty=_number(data, "repetition_penalty", d.repetition_penalty, float),
        seed=_number(data, "seed", None, int),
        max_tokens=_number({key: max_tokens}, key, d.max_tokens, int),
    )
    try:
        return cfg.check()
    except SamplingError as e:
        param = key if e.param == "max_tokens" else e.param
        raise ApiError(400, str(e).replace("max_tokens", param, 1), param=param) from None


def stops(data: dict[str, Any]) -> list[str]:
    stop = data.get("stop")
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise ApiError(400, "`stop` must be a non-empty string or a list of them", param="stop")
    if len(items) > MAX_STOPS:
        raise ApiError(400, f"`stop` takes at most {MAX_STOPS} sequences", param="stop")
    return items


def _unsupported(data: dict[str, Any], fields: tuple[str, ...]) -> None:
    for key in fields:
        value = data.get(key)
        if value not in (None, False, [], {}) and not (
            key == "response_format" and value == {"type": "text"}
        ):
            raise ApiError(400, f"`{key}` is not supported by this server", param=key)


def messages(data: dict[str, Any]) -> list[Message]:
    """OpenAI messages -> ours: text content (a string or text parts), roles system/user/assistant."""
    raw = data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "`messages` must be a non-empty list", param="messages")
    out: list[Message] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with `role` and `content`", param=where)
        role = ROLE_ALIASES.get(m.get("role"), m.get("role"))
        if role not in ROLES:
            raise ApiError(
                400, f"{where}.role {m.get('role')!r} is not supported (use {', '.join(ROLES)})", param=where
            )
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"{where}.content: only text parts are supported", param=where)
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str) or not content.strip():
            raise ApiError(400, f"{where}.content must be non-empty text", param=where)
        out.append({"role": role, "content": content})
    return out


def _fits(ids: list[int], model: ModelInfo, param: str) -> None:
    if len(ids) + 1 > model.context_length:
        raise ApiError(
            400,
            f"This model's maximum context length is {model.context_length} tokens, but your {param} has "
            f"{len(ids)} tokens (at least one more is needed for the reply); shorten it",
            param=param,
            code="context_length_exceeded",
        )


def _stream_flags(data: dict[str, Any]) -> tuple[bool, bool]:
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be true or false", param="stream")
    opts = data.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "`stream_options` must be an object", param="stream_options")
    return stream, bool(opts.get("include_usage"))


def chat_request(data: dict[str, Any], model: ModelInfo, codec: Any) -> Request:
    check_model(data, model)
    _unsupported(data, ("tools", "functions", "tool_choice", "function_call", "logprobs", "response_format"))
    msgs = messages(data)
    try:
        ids = render_prompt(codec, msgs)
    except KititansError as e:
        raise ApiError(400, str(e), param="messages") from None
    _fits(ids, model, "messages")
    stream, usage = _stream_flags(data)
    ignore = _flag(data, "ignore_eos")
    return Request(
        "chat", ids, sampling(data, model), stops(data), stream, usage, "", ignore, **_ids("chatcmpl")
    )


def completion_request(data: dict[str, Any], model: ModelInfo, codec: Any) -> Request:
    """A prompt is text after BOS, as `kititans generate --prompt` feeds it."""
    check_model(data, model)
    _unsupported(data, ("logprobs", "suffix", "best_of"))
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "`prompt` must be a non-empty string (one prompt per request)", param="prompt")
    ids = [codec.bos_id, *codec.encode(prompt)]
    _fits(ids, model, "prompt")
    stream, usage = _stream_flags(data)
    echo = prompt if _flag(data, "echo") else ""
    ignore = _flag(data, "ignore_eos")
    return Request(
        "completion", ids, sampling(data, model), stops(data), stream, usage, echo, ignore, **_ids("cmpl")
    )


def _flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"`{key}` must be true or false", param=key)
    return value


def _ids(prefix: str) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time())}


# ----------------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response(req: Request, model: ModelInfo, result: Any) -> dict[str, Any]:
    """The whole answer of a non-streaming request."""
    text = req.echo + result.text
    if req.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": result.finish_reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": result.finish_reason}
        obj = "text_completion"
    return {
        "id": req.id,
        "object": obj,
        "created": req.created,
        "model": model.id,
        "choices": [choice],
        "usage": usage(result.prompt_tokens, result.completion_tokens),
        "timings": result.timings,
    }


def chunk(req: Request, model: ModelInfo, text: str | None, finish: str | None = None) -> dict[str, Any]:
    """One streamed event: a text delta (text=None with finish set: the last one)."""
    if req.kind == "chat":
        delta: dict[str, Any] = {} if text is None else {"content": text}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": req.id, "object": obj, "created": req.created, "model": model.id, "choices": [choice]}


def first_chunk(req: Request, model: ModelInfo) -> dict[str, Any] | None:
    """The opening event: a chat stream announces the assistant role; a completion with echo, the prompt."""
    if req.kind == "chat":
        out = chunk(req, model, "")
        out["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return out
    return chunk(req, model, req.echo) if req.echo else None


def usage_chunk(req: Request, model: ModelInfo, result: Any) -> dict[str, Any]:
    out = chunk(req, model, None)
    out["choices"] = []
    out["usage"] = usage(result.prompt_tokens, result.completion_tokens)
    return out


def models_list(model: ModelInfo) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(model)]}


def model_card(model: ModelInfo) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": 0,
        "owned_by": "kititans",
        "context_length": model.context_length,
        "runtime": model.runtime,
        "family": model.family,
    }
