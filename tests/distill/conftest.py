"""Distillation fixtures: a small SFT'd debug run served by `kititans serve` (the real teacher endpoint, a
subprocess on 127.0.0.1), and a stub OpenAI-shaped server used only to inject faults (429, 500, no choices)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

CLI = [sys.executable, "-c", "from kititans.cli import main; raise SystemExit(main())"]


@pytest.fixture(scope="session")
def teacher_run(debug_run, tmp_path_factory) -> Path:
    """The session's debug run after a short SFT on built-in chats (it ends replies with <|end|>)."""
    from kititans.train.sft import sft, sft_config

    base = tmp_path_factory.mktemp("distill") / "base"
    shutil.copytree(debug_run, base, ignore=shutil.ignore_patterns("data", "train_state"))
    out = base.with_name("teacher")
    layers = [("train.compile", "off"), ("train.dtype", "fp32"), ("train.batch_size", 8),
              ("train.steps", 30), ("train.eval_every", 30), ("train.report", False),
              ("sft.builtin_examples", 400), ("out", str(out))]  # fmt: skip
    sft(sft_config(base, layers), progress=False)
    return out


def start_serve(model: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*CLI, "serve", str(model), "--port", "0"], stderr=subprocess.PIPE, text=True, env=env
    )
    lines: list[str] = []
    while not any(" at http" in ln for ln in lines):
        line = proc.stderr.readline()
        if not line:
            proc.kill()
            raise RuntimeError(f"kititans serve exited: {''.join(lines)}")
        lines.append(line)
    url = next(ln for ln in lines if " at http" in ln).split(" at ")[1].strip()
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log
    return proc, url


@pytest.fixture(scope="session")
def teacher_url(teacher_run) -> Iterator[str]:
    """`kititans serve` of the teacher run: http://127.0.0.1:PORT/v1."""
    proc, url = start_serve(teacher_run)
    yield url
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


class Stub:
    """An OpenAI-shaped chat endpoint whose answers a test scripts: `plan` is a list of (status, headers,
    body) consumed one per chat request; when it is empty, a valid answer."""

    def __init__(self) -> None:
        self.plan: list[tuple[int, dict[str, str], Any]] = []
        self.seen: list[float] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._send(200, {}, {"object": "list", "data": [{"id": "stub", "object": "model"}]})

            def do_POST(self) -> None:
                import time

                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.seen.append(time.monotonic())
                if stub.plan:
                    self._send(*stub.plan.pop(0))
                    return
                text = f"A fine answer about {body['messages'][-1]['content'][:40]}."
                self._send(200, {}, {"id": "x", "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}})  # fmt: skip

            def _send(self, status: int, headers: dict[str, str], obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stub() -> Iterator[Stub]:
    s = Stub()
    yield s
    s.close()


@pytest.fixture
def write_lines(tmp_path) -> Callable[..., Path]:
    def write(name: str, lines: list[str]) -> Path:
        p = tmp_path / name
        p.write_text("".join(ln + "\n" for ln in lines), encoding="utf-8")
        return p

    return write
