"""The OpenAI wire format of `kititans serve`, requests side: JSON bodies -> checked `Request`s.

Pure data in and out (no sockets, no runtime): serve/app.py does HTTP, serve/engine.py runs the model,
serve/shapes.py builds the answers. Every problem with a request is an `ApiError` carrying the HTTP status
and the OpenAI error fields (`message`, `type`, `param`, `code`), so a client library raises its usual
exception for it.
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

MAX_STOPS = 16  # OpenAI takes 4; lm-eval tasks send their `until` list plus the EOS text
MAX_N = 16  # choices per prompt
MAX_PROMPTS = 512  # prompts in one completions request (lm-eval sends its batch as one request)
MAX_TOP_LOGPROBS = 20
# roles clients send that mean one of ours (OpenAI's "developer" is the newer name of "system")
ROLE_ALIASES = {"developer": "system"}


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def busy(message: str, retry_after: int = 1, code: str = "server_busy") -> ApiError:
    """503 with Retry-After (the openai client honours it when it retries)."""
    return ApiError(503, message, "server_error", None, code, {"Retry-After": str(retry_after)})


@dataclass
class Request:
    """One checked generation request: what the engine runs and how the answer is shaped."""

    kind: str  # "chat" | "completion"
    prompts: list[list[int]]  # one for chat; completions may send several (answered by index)
    sampling: SamplingConfig
    n: int = 1
    stops: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    echo: list[str] = field(default_factory=list)  # completions with echo=true: each prompt's text
    logprobs: int | None = None  # top alternatives per token (0: only the chosen token's); None: none
    prompt_logprobs: bool = False  # echo + logprobs: the prompt tokens' log-probabilities too
    token_ids: bool = False  # vLLM's return_tokens_as_token_ids: log-probs name tokens "token_id:N"
    skip_first: list[bool] = field(default_factory=list)  # per prompt: its first id is the BOS we added
    ignore_eos: bool = False  # llama-server's extension: generate max_tokens even past end-of-turn
    cache_key: str | None = None  # prompt caching within one client's conversation (tenant-scoped)
    session: str | None = None  # --sessions: the saved Titans state it continues (serve/sessions.py)
    id: str = ""
    created: int = 0

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def _check_session(self) -> Request:
        """A session is one state: one prompt, one choice, and no log-probs of the tokens it already holds."""
        if self.session is None:
            return self
        for bad, message, param in (
            (self.n > 1, "`n` must be 1 with `session`: one saved state continues one reply", "n"),
            (len(self.prompts) > 1, "`session` takes one prompt per request", "prompt"),
            (self.prompt_logprobs, "`echo` with `logprobs` cannot use a `session`: the tokens the session "
             "holds are not fed again, so they have no log-probabilities", "echo"),
        ):  # fmt: skip
            if bad:
                raise ApiError(400, message, param=param)
        return self


@dataclass
class ModelInfo:
    """What the server says about the one model it serves."""

    id: str
    context_length: int
    runtime: str
    family: str | None
    defaults: SamplingConfig  # for fields a request leaves out (the model's generation_config.json)
    task: str = "lm"  # "embed": an encoder, served on /v1/embeddings only
    vocab_size: int = 0


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body.decode("utf-8") or "null")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ApiError(
            400, f"We could not parse the JSON body of your request ({e})", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object", code="invalid_json")
    return data


def check_model(data: dict[str, Any], model: ModelInfo) -> None:
    name = data.get("model", model.id)  # lenient like llama-server: a missing name means the served model
    if name is not None and name != model.id:
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


def sampling(data: dict[str, Any], model: ModelInfo, allow_zero: bool = False) -> SamplingConfig:
    """OpenAI sampling fields (plus top_k, min_p, repetition_penalty) -> a checked SamplingConfig.
    allow_zero: max_tokens 0 (a completions request that only scores its prompt)."""
    d = model.defaults
    for key in ("frequency_penalty", "presence_penalty"):
        if _number(data, key, 0.0, float) != 0.0:
            raise ApiError(
                400,
                f"`{key}` is not supported: use `repetition_penalty` (> 1 discourages repeats)",
                param=key,
            )
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
    if allow_zero and cfg.max_tokens == 0:
        cfg.max_tokens = 1
        cfg.check()
        cfg.max_tokens = 0
        return cfg
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


def _refuse(data: dict[str, Any], fields: tuple[str, ...]) -> None:
    for key in fields:
        if data.get(key) not in (None, False, [], {}):
            raise ApiError(400, f"`{key}` is not supported by this server", param=key)


def _response_format(data: dict[str, Any]) -> None:
    fmt = data.get("response_format")
    if fmt in (None, {"type": "text"}):
        return
    kind = fmt.get("type") if isinstance(fmt, dict) else fmt
    raise ApiError(
        400,
        f"response_format {kind!r} is not supported: this server does not constrain decoding to a grammar, "
        "so it cannot promise valid JSON; ask for JSON in the prompt and validate the reply",
        param="response_format",
        code="unsupported_response_format",
    )


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
    """A prompt may fill the context: the logits after its last token still give one reply token."""
    if len(ids) > model.context_length:
        raise ApiError(
            400,
            f"This model's maximum context length is {model.context_length} tokens, but your {param} has "
            f"{len(ids)} tokens; shorten it",
            param=param,
            code="context_length_exceeded",
        )


def _stream_flags(data: dict[str, Any]) -> tuple[bool, bool]:
    stream = _flag(data, "stream")
    opts = data.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "`stream_options` must be an object", param="stream_options")
    return stream, bool(opts.get("include_usage"))


def _cache_key(data: dict[str, Any]) -> str | None:
    """The client's own conversation id for prompt caching: `prompt_cache_key` (OpenAI), else `user`."""
    for key in ("prompt_cache_key", "user"):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or len(value) > 256:
            raise ApiError(400, f"`{key}` must be a string of at most 256 characters", param=key)
        return value or None
    return None


def _session(data: dict[str, Any]) -> str | None:
    value = data.get("session")
    if value is not None and not isinstance(value, str):
        raise ApiError(400, "`session` must be a string: the name of a session", param="session")
    return value


def _n(data: dict[str, Any]) -> int:
    n = _number(data, "n", 1, int)
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"`n` must be from 1 to {MAX_N}", param="n")
    return n


def chat_request(data: dict[str, Any], model: ModelInfo, codec: Any) -> Request:
    check_model(data, model)
    _refuse(data, ("tools", "functions", "tool_choice", "function_call", "logit_bias", "audio"))
    _response_format(data)
    msgs = messages(data)
    try:
        ids = render_prompt(codec, msgs)
    except KititansError as e:
        raise ApiError(400, str(e), param="messages") from None
    _fits(ids, model, "messages")
    stream, usage = _stream_flags(data)
    logprobs = None
    if _flag(data, "logprobs"):
        logprobs = _number(data, "top_logprobs", 0, int)
        if not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"`top_logprobs` must be from 0 to {MAX_TOP_LOGPROBS}", param="top_logprobs")
    elif data.get("top_logprobs") is not None:
        raise ApiError(400, "`top_logprobs` needs `logprobs: true`", param="top_logprobs")
    return Request(
        "chat", [ids], sampling(data, model), _n(data), stops(data), stream, usage,
        logprobs=logprobs, skip_first=[False], ignore_eos=_flag(data, "ignore_eos"),
        token_ids=_flag(data, "return_tokens_as_token_ids"), cache_key=_cache_key(data),
        session=_session(data), **_ids("chatcmpl"),
    )._check_session()  # fmt: skip


def _token_list(value: Any, model: ModelInfo) -> list[int] | None:
    if not isinstance(value, list) or not value or not all(isinstance(t, int) for t in value):
        return None
    if any(isinstance(t, bool) or not 0 <= t < model.vocab_size for t in value):
        raise ApiError(400, f"token ids in `prompt` must be from 0 to {model.vocab_size - 1}", param="prompt")
    return list(value)


def prompts(
    data: dict[str, Any], model: ModelInfo, codec: Any
) -> tuple[list[list[int]], list[str], list[bool]]:
    """`prompt`: a string, a list of strings, a list of token ids, or a list of lists of token ids (what
    lm-eval's local-completions sends). A string goes in after BOS, as `kititans generate --prompt` feeds
    it; token ids go in as they are. Returns the ids, each prompt's text, and which start with our BOS."""
    raw = data.get("prompt")
    items: list[Any]
    if isinstance(raw, str) or _token_list(raw, model) is not None:
        items = [raw]
    elif isinstance(raw, list) and raw:
        items = raw
    else:
        raise ApiError(
            400, "`prompt` must be a string, a list of strings or a list of token ids", param="prompt"
        )
    if len(items) > MAX_PROMPTS:
        raise ApiError(400, f"`prompt` takes at most {MAX_PROMPTS} prompts per request", param="prompt")
    ids, texts, bos = [], [], []
    for item in items:
        if isinstance(item, str) and item:
            ids.append([codec.bos_id, *codec.encode(item)])
            texts.append(item)
            bos.append(True)
        elif (tokens := _token_list(item, model)) is not None:
            ids.append(tokens)
            texts.append(codec.decode(tokens))
            bos.append(False)
        else:
            raise ApiError(
                400, "each prompt must be a non-empty string or a list of token ids", param="prompt"
            )
        _fits(ids[-1], model, "prompt")
    return ids, texts, bos


def completion_request(data: dict[str, Any], model: ModelInfo, codec: Any) -> Request:
    check_model(data, model)
    _refuse(data, ("suffix", "logit_bias"))
    _response_format(data)
    if _number(data, "best_of", 1, int) != 1:
        raise ApiError(400, "`best_of` is not supported: use `n`", param="best_of")
    ids, texts, bos = prompts(data, model, codec)
    stream, usage = _stream_flags(data)
    echo = _flag(data, "echo")
    logprobs = _number(data, "logprobs", None, int)
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"`logprobs` must be from 0 to {MAX_TOP_LOGPROBS}", param="logprobs")
    cfg = sampling(data, model, allow_zero=echo)
    if stream and echo and logprobs is not None:
        raise ApiError(
            400, "`echo` with `logprobs` cannot stream: send it with `stream: false`", param="stream"
        )
    return Request(
        "completion", ids, cfg, _n(data), stops(data), stream, usage, echo=texts if echo else [],
        logprobs=logprobs, prompt_logprobs=echo and logprobs is not None, skip_first=bos,
        ignore_eos=_flag(data, "ignore_eos"), token_ids=_flag(data, "return_tokens_as_token_ids"),
        cache_key=_cache_key(data), session=_session(data), **_ids("cmpl"),
    )._check_session()  # fmt: skip


@dataclass
class EmbeddingRequest:
    rows: list[list[int]]
    base64: bool
    dimensions: int | None
    prompt_tokens: int


def embedding_request(data: dict[str, Any], model: ModelInfo, codec: Any) -> EmbeddingRequest:
    """`input`: a string, a list of strings, token ids or lists of token ids; each text becomes [BOS] + ids
    cut to the encoder's context, exactly as `kititans embed` tokenizes it."""
    from kititans.embedding import token_rows

    check_model(data, model)
    raw = data.get("input")
    items = [raw] if isinstance(raw, str) or _token_list(raw, model) is not None else raw
    if not isinstance(items, list) or not items or len(items) > 2048:
        raise ApiError(
            400, "`input` must be a string or a list of 1 to 2048 strings or token lists", param="input"
        )
    rows = []
    for item in items:
        if isinstance(item, str) and item:
            rows += token_rows(codec, [item], model.context_length)
        elif (tokens := _token_list(item, model)) is not None:
            rows.append(tokens[: model.context_length])
        else:
            raise ApiError(400, "each input must be a non-empty string or a list of token ids", param="input")
    fmt = data.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise ApiError(400, "`encoding_format` must be 'float' or 'base64'", param="encoding_format")
    dims = _number(data, "dimensions", None, int)
    if dims is not None and dims < 1:
        raise ApiError(400, "`dimensions` must be at least 1", param="dimensions")
    return EmbeddingRequest(rows, fmt == "base64", dims, sum(len(r) for r in rows))


def _flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"`{key}` must be true or false", param=key)
    return value


def _ids(prefix: str) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time())}
