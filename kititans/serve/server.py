"""`Server`: the engine, the routes and the transport put together, with every limit in one `ServeConfig`.

with Server(rt, model_info(path, rt), ServeConfig(port=0)) as s:   # serves in a background thread
    print(s.url)
Server(rt, info, cfg).serve_forever()                              # the CLI: here, until SIGTERM/Ctrl-C
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path
from typing import Any

from kititans.errors import KititansError
from kititans.generate import SamplingConfig
from kititans.serve.api import ModelInfo
from kititans.serve.config import ServeConfig

log = logging.getLogger("kititans.serve")


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
    d = SamplingConfig()
    sampling = SamplingConfig(
        temperature=float(gen.get("temperature", d.temperature)) if gen.get("do_sample", True) else 0.0,
        top_k=int(gen.get("top_k", d.top_k)),
        top_p=float(gen.get("top_p", d.top_p)),
        repetition_penalty=float(gen.get("repetition_penalty", d.repetition_penalty)),
        max_tokens=int(gen.get("max_new_tokens", d.max_tokens)),
    )
    task = getattr(rt, "task", "lm")
    vocab = int(getattr(rt, "vocab_size", 0) or getattr(rt.codec, "vocab_size", 0))
    return ModelInfo(name, int(rt.context_length), rt.name, meta.get("family"), sampling, task, vocab)


class Server:
    """The engine (its own thread), the Starlette app and uvicorn on one bound socket."""

    def __init__(self, rt: Any, info: ModelInfo, cfg: ServeConfig | None = None):
        try:
            import starlette  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as e:
            raise KititansError(
                f"kititans serve needs {e.name}: pip install 'kititans[serve]' (uvicorn, starlette)"
            ) from None
        from kititans.serve.app import Limits, Routes, build_app
        from kititans.serve.engine import Engine, EngineConfig
        from kititans.serve.page import chat_page
        from kititans.serve.transport import TransportLimits, listen, uvicorn_server

        self.cfg = (cfg or ServeConfig()).check()
        self.info = info
        c = self.cfg
        searcher = self._searcher(rt, info) if c.index else None  # before the engine: it embeds probes
        store = None
        if c.sessions:  # Titans only: refused before the socket and the engine exist
            from kititans.serve.sessions import SessionStore

            store = SessionStore(c.sessions, rt)
        try:
            self.socket = listen(c.host, c.port)
        except OSError as e:
            raise KititansError(
                f"cannot listen on {c.host}:{c.port} ({e.strerror or e}): pick another --port"
            ) from None
        ecfg = EngineConfig(c.parallel, c.cache_slots, c.max_queue, c.request_timeout, c.prefill_budget)
        self.engine = Engine(rt, ecfg, sessions=store)
        if store is not None:
            try:
                store.check_sequences(self.engine.seqs)
            except KititansError:
                self.engine.close()
                self.socket.close()
                raise
        limits = Limits(c.max_body_bytes, c.body_timeout, c.request_timeout)
        self.routes = Routes(self.engine, info, c.api_key, limits, chat_page(info), searcher)
        tl = TransportLimits(c.max_connections, c.header_timeout, c.keep_alive, c.max_header_bytes)
        self.uvicorn = uvicorn_server(build_app(self.routes), tl, self._begin_shutdown)
        self.uvicorn.grace = c.shutdown_grace
        self._thread: threading.Thread | None = None

    def _searcher(self, rt: Any, info: ModelInfo) -> Any:
        """The --index folder's Searcher with the served encoder (refused for a language model)."""
        from kititans.retrieval.index import load_index
        from kititans.retrieval.search import Searcher
        from kititans.retrieval.settings import encoder_of

        if info.task != "embed":
            raise KititansError(f"--index needs an encoder: {info.id} is a language model")
        return Searcher(load_index(self.cfg.index), encoder_of(rt, info.id))

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    @property
    def url(self) -> str:
        host = self.socket.getsockname()[0]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{self.port}"

    def _begin_shutdown(self) -> None:
        log.info("shutting down: %d active, %d waiting", len(self.engine.active), self.engine.queued)
        self.engine.shutdown(self.cfg.shutdown_grace)

    def serve_forever(self) -> None:
        """Serve here until SIGTERM or Ctrl-C, then shut down gracefully."""
        try:
            asyncio.run(self.uvicorn.serve(sockets=[self.socket]))
        finally:
            self._close_rest()

    def start(self) -> Server:
        """Serve in a background thread; returns once the server accepts connections."""
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.uvicorn.serve(sockets=[self.socket])), name="kititans-serve-http"
        )
        self._thread.daemon = True
        self._thread.start()
        while not self.uvicorn.started and self._thread.is_alive():
            self._thread.join(0.01)
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.uvicorn.should_exit = True
            self._thread.join(self.cfg.shutdown_grace + 15)
            self._thread = None
        self._close_rest()

    def _close_rest(self) -> None:
        self.engine.close()
        self.routes.pool.shutdown(wait=False)
        self.socket.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
