"""kititans serve: an OpenAI-compatible HTTP server over any runtime, with continuous batching and a chat page
(see docs/serve.md)."""

from __future__ import annotations

import argparse
import os
import sys

from kititans.commands.common import add_runtime_args, open_runtime, warn_if_base_model

HELP = (
    "serve a model over an OpenAI-compatible HTTP API with a chat page (run dir, .gguf, ONNX folder, CoreML)"
)
EXAMPLES = """  kititans serve runs/tiny-sft                      # http://127.0.0.1:8000/ (chat page), /v1 (API)
  kititans serve runs/tiny-sft/export/model.q4_k_m.gguf --port 8080 --parallel 8
  kititans serve runs/my-titans/export/onnx/int4 --api-key "$KEY" --host 0.0.0.0
  kititans serve runs/my-titans --sessions sessions/ # Titans: "session": "me" continues a saved state
  kititans serve runs/my-encoder                    # an encoder: POST /v1/embeddings
  kititans serve runs/my-encoder --index idx/       # ... and POST /v1/search over a `kititans index` folder
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "What does a cow say?"}]}'"""


def configure(p: argparse.ArgumentParser) -> None:
    from kititans.serve.config import ServeConfig

    d = ServeConfig()
    add_runtime_args(p)
    p.add_argument(
        "--host", default=d.host, help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=d.port, help="port (default 8000; 0 = any free port)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("KITITANS_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $KITITANS_API_KEY, else none)",
    )
    p.add_argument("--model-name", help="the model id clients send (default: from the path, see /v1/models)")
    p.add_argument("--index", help="an encoder's `kititans index` folder: serve POST /v1/search over it")
    p.add_argument(
        "--sessions",
        metavar="DIR",
        help='Titans: keep conversations\' states in DIR; requests name one with "session": "NAME" '
        "(per API key; see docs/serve.md)",
    )
    g = p.add_argument_group("batching and limits")
    g.add_argument("--parallel", type=int, default=d.parallel,
                   help=f"sequences decoded together (default {d.parallel})")  # fmt: skip
    g.add_argument("--cache-slots", type=int, default=d.cache_slots,
                   help="conversations kept for prompt caching, per client key + prompt_cache_key/user "
                   f"(default {d.cache_slots}; 0: off)")  # fmt: skip
    g.add_argument("--max-queue", type=int, default=d.max_queue,
                   help=f"requests that may wait; more get HTTP 503 + Retry-After (default {d.max_queue})")  # fmt: skip
    g.add_argument("--max-connections", type=int, default=d.max_connections,
                   help=f"open connections; more are answered 503 and closed (default {d.max_connections})")  # fmt: skip
    g.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / (1 << 20),
                   help="largest request body in MiB (default 8)")  # fmt: skip
    g.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help=f"seconds a request may take, queue included (default {d.request_timeout:g})")  # fmt: skip
    g.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help=f"seconds for a request's headers to arrive (default {d.header_timeout:g})")  # fmt: skip
    g.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace,
                   help="seconds in-flight requests get to finish after SIGTERM / Ctrl-C "
                   f"(default {d.shutdown_grace:g})")  # fmt: skip
    p.add_argument(
        "--quiet", action="store_true", help="no access log (default: one line per request on stderr)"
    )


def run(args: argparse.Namespace) -> int:
    from kititans.errors import KititansError
    from kititans.serve import ServeConfig, Server, model_info

    cfg = ServeConfig(
        args.host, args.port, args.api_key or None, args.model_name, parallel=args.parallel,
        cache_slots=args.cache_slots, max_queue=args.max_queue, max_connections=args.max_connections,
        max_body_bytes=int(args.max_body_mb * (1 << 20)), request_timeout=args.request_timeout,
        header_timeout=args.header_timeout, shutdown_grace=args.shutdown_grace, index=args.index,
        sessions=args.sessions,
    ).check()  # fmt: skip
    if args.max_body_mb <= 0:
        raise KititansError(f"--max-body-mb must be above 0, got {args.max_body_mb}")
    # no spin-waiting onnxruntime threads: between two tokens the server's own threads need the cores
    rt = open_runtime(args, task="any", spin=False)  # an encoder serves /v1/embeddings
    if rt.task == "lm":
        warn_if_base_model(args.model, rt)
    info = model_info(args.model, rt, args.model_name)
    server = Server(rt, info, cfg)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(
            f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    what = "embeddings" if info.task == "embed" else f"up to {cfg.parallel} sequences in one batch"
    what += f", search over {args.index}" if args.index else ""
    what += f", sessions in {args.sessions}" if args.sessions else ""
    print(f"serving {info.id} ({rt.name}, context {info.context_length}, {what}) at {server.url}/v1",
          file=sys.stderr)  # fmt: skip
    print(f"  chat page: {server.url}/   try: curl {server.url}/v1/models   (Ctrl-C stops)", file=sys.stderr)
    server.serve_forever()
    print("stopped", file=sys.stderr)
    return 0
