"""The chat page at `/`: one self-contained HTML file (chat.html: inline CSS and JavaScript, no CDN, no build
step) that streams replies from /v1/chat/completions, keeps the conversation's history, takes a system prompt
and sampling settings, stops a reply mid-way and shows the model's name and runtime."""

from __future__ import annotations

import json
from importlib import resources

from kititans.serve.api import ModelInfo


def chat_page(info: ModelInfo) -> str:
    html = resources.files("kititans.serve").joinpath("chat.html").read_text(encoding="utf-8")
    blob = json.dumps({"id": info.id, "runtime": info.runtime, "context_length": info.context_length,
                       "family": info.family, "task": info.task})  # fmt: skip
    # inside <script>: no "</script>" can end it early
    blob = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return html.replace("__MODEL_INFO__", blob)
