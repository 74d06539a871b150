"""The OpenAI wire format of `kititans serve`, answers side: a finished job -> response JSON, a streamed
delta -> an SSE chunk, vectors -> an embeddings list; log-probs in both of OpenAI's shapes.

Completions (`logprobs: k`): `{tokens, token_logprobs, top_logprobs: [{text: logprob}], text_offset}`, with
echo the prompt's tokens first; the shape lm-eval's `local-completions` reads (`token_logprobs[ctxlen:-1]`,
`max(top.values())`). Chat (`logprobs: true, top_logprobs: k`): `{content: [{token, logprob, bytes,
top_logprobs: [{token, logprob, bytes}]}]}`.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from kititans.serve.api import ModelInfo, Request
from kititans.serve.sequence import Choice, TokenLogprob, TokenText, text_offsets


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},  # this client's own conversation only
    }


def namer(tt: TokenText, ids: bool) -> Any:
    """How tokens are named in log-probs: their text, or "token_id:N" (vLLM's `return_tokens_as_token_ids`;
    texts are ambiguous: several ids decode alike, e.g. the byte pieces of one character)."""
    return (lambda i: f"token_id:{i}") if ids else tt.text


def completion_logprobs(
    records: list[TokenLogprob], tt: TokenText, start: int = 0, with_chosen: bool = True, ids: bool = False
) -> dict[str, Any]:
    """The completions shape. Each top dict also holds the chosen token (as llama-cpp-python does), so a
    greedy check `logprob == max(top.values())` holds exactly when the chosen token is the most likely."""
    name = namer(tt, ids)
    tops: list[dict[str, float] | None] = []
    for r in records:
        if r.logprob is None:
            tops.append(None)
            continue
        top = {name(i): lp for i, lp in r.top}
        if with_chosen:
            top.setdefault(name(r.token), r.logprob)
        tops.append(top)
    return {
        "tokens": [name(r.token) for r in records],
        "token_logprobs": [r.logprob for r in records],
        "top_logprobs": tops,
        "text_offset": text_offsets(records, tt, start),
    }


def chat_logprobs(records: list[TokenLogprob], tt: TokenText, ids: bool = False) -> dict[str, Any]:
    name = namer(tt, ids)

    def entry(tok: int, lp: float) -> dict[str, Any]:
        return {"token": name(tok), "logprob": lp, "bytes": list(tt.bytes(tok))}

    content = [
        {**entry(r.token, r.logprob), "top_logprobs": [entry(i, lp) for i, lp in r.top]} for r in records
    ]
    return {"content": content, "refusal": None}


def _choice_logprobs(req: Request, c: Choice, tt: TokenText) -> dict[str, Any] | None:
    if req.logprobs is None:
        return None
    generated = c.visible_records(tt)
    if req.kind == "chat":
        return chat_logprobs(generated, tt, req.token_ids)
    records = [*c.prompt_records, *generated] if req.prompt_logprobs else generated
    return completion_logprobs(records, tt, ids=req.token_ids)


def response(req: Request, model: ModelInfo, job: Any, tt: TokenText) -> dict[str, Any]:
    """The whole answer of a non-streaming request (choices in index order)."""
    choices = []
    for c in sorted(job.choices, key=lambda c: c.index):
        lp = _choice_logprobs(req, c, tt)
        if req.kind == "chat":
            msg = {"role": "assistant", "content": c.text, "refusal": None}
            choices.append(
                {"index": c.index, "message": msg, "logprobs": lp, "finish_reason": c.finish_reason}
            )
        else:
            text = (req.echo[c.index // req.n] if req.echo else "") + c.text
            choices.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
    return {
        "id": req.id,
        "object": "chat.completion" if req.kind == "chat" else "text_completion",
        "created": req.created,
        "model": model.id,
        "choices": choices,
        "usage": usage(job.prompt_tokens, sum(c.completion_tokens for c in job.choices), job.cached_tokens),
    }


def chunk(
    req: Request, model: ModelInfo, index: int, text: str | None, finish: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One streamed event: a text delta (text None with finish set: the last one)."""
    if req.kind == "chat":
        delta: dict[str, Any] = {} if text is None else {"content": text}
        choice: dict[str, Any] = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish,
        }
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        obj = "text_completion"
    return {"id": req.id, "object": obj, "created": req.created, "model": model.id, "choices": [choice]}


def delta_chunks(req: Request, model: ModelInfo, event: tuple, tt: TokenText) -> list[dict[str, Any]]:
    """SSE payloads for one ("delta", index, text, records, finish) event: the text (with its tokens'
    log-probs), then the finish chunk when the choice ended."""
    _, index, text, records, finish = event
    out = []
    if text or records:
        lp = None
        if req.logprobs is not None and records:
            if req.kind == "chat":
                lp = chat_logprobs(records, tt, req.token_ids)
            else:
                lp = completion_logprobs(records, tt, ids=req.token_ids)
        out.append(chunk(req, model, index, text, None, lp))
    if finish is not None:
        out.append(chunk(req, model, index, None, finish))
    return out


def first_chunks(req: Request, model: ModelInfo) -> list[dict[str, Any]]:
    """The opening events: a chat stream announces the assistant role; a completion with echo, the prompts."""
    out = []
    for index in range(req.choices):
        if req.kind == "chat":
            c = chunk(req, model, index, "")
            c["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            out.append(c)
        elif req.echo:
            out.append(chunk(req, model, index, req.echo[index // req.n]))
    return out


def usage_chunk(req: Request, model: ModelInfo, job: Any) -> dict[str, Any]:
    out = chunk(req, model, 0, None)
    out["choices"] = []
    out["usage"] = usage(job.prompt_tokens, sum(c.completion_tokens for c in job.choices), job.cached_tokens)
    return out


def embeddings(model: ModelInfo, vectors: np.ndarray, b64: bool, dims: int | None, tokens: int) -> dict:
    """OpenAI's embeddings list: float lists, or base64 of little-endian float32 (the openai client's
    default). `dimensions` keeps the first dims and re-normalizes (Matryoshka-style truncation)."""
    vecs = np.asarray(vectors, dtype=np.float32)
    if dims is not None and dims < vecs.shape[1]:
        vecs = vecs[:, :dims]
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    data = []
    for i, v in enumerate(vecs):
        emb: Any = base64.b64encode(v.astype("<f4").tobytes()).decode() if b64 else [float(x) for x in v]
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {
        "object": "list",
        "data": data,
        "model": model.id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


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
        "task": model.task,
    }
