"""`kititans serve`: an OpenAI-compatible HTTP server over any runtime, with continuous batching (a floor above
kititans/runtimes, beside bench/).

    transport.py   uvicorn + h11, hardened: header deadline, connection cap, graceful shutdown
    app.py         the routes (Starlette): body limits, the key, JSON / SSE answers, the access log
    api.py         the OpenAI wire format, requests side (bodies -> checked requests)
    shapes.py      the OpenAI wire format, answers side (responses, stream chunks, log-probs, embeddings)
    engine.py      continuous batching over the runtime's multi-sequence interface
    sequence.py    one choice: sampler, text stream, stop strings, log-probs
    cache.py       prompt caching per client conversation
    sessions.py    --sessions: Titans states kept in files per API key, continued by a request's `session`
    metrics.py     /metrics (Prometheus text)
    page.py        the chat page at / (chat.html)
    config.py      ServeConfig: every setting and limit
    server.py      Server: all of the above on one socket

Endpoints: GET / (chat page), /health, /metrics, /v1/models; POST /v1/chat/completions, /v1/completions,
/v1/embeddings (encoders); vLLM-style /tokenizer_info, /tokenize, /detokenize for lm-eval's remote tokenizer.
"""

from typing import Any

from kititans.serve.config import ServeConfig

__all__ = ["ApiError", "ModelInfo", "ServeConfig", "Server", "model_info"]
_LAZY = {"ApiError": "kititans.serve.api", "ModelInfo": "kititans.serve.api", "Server": "kititans.serve.server",
         "model_info": "kititans.serve.server"}  # fmt: skip


def __getattr__(name: str) -> Any:  # the server's modules load on first use, not with the CLI's parser
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kititans.serve' has no attribute {name!r}")
