"""kititans serve: an OpenAI-compatible HTTP server over any runtime (see docs/serve.md)."""

from __future__ import annotations

import argparse
import os
import sys

from kititans.commands.common import add_runtime_args, open_runtime, warn_if_base_model

HELP = "serve a model over an OpenAI-compatible HTTP API (run dir, .gguf, ONNX folder or CoreML model)"
EXAMPLES = """  kititans serve runs/tiny-sft                      # http://127.0.0.1:8000/v1
  kititans serve runs/tiny-sft/export/model.q4_k_m.gguf --port 8080
  kititans serve runs/my-titans/export/onnx/int4 --api-key "$KEY" --host 0.0.0.0
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "What does a cow say?"}]}'"""


def configure(p: argparse.ArgumentParser) -> None:
    add_runtime_args(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("KITITANS_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $KITITANS_API_KEY, else none)",
    )
    p.add_argument("--model-name", help="the model id clients send (default: from the path, see /v1/models)")
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests that may wait; more get HTTP 503 (default 64)"
    )


def run(args: argparse.Namespace) -> int:
    from kititans.errors import KititansError
    from kititans.serve import ServeConfig, Server, model_info

    if not 0 <= args.port <= 65535:
        raise KititansError(f"--port must be from 0 to 65535, got {args.port}")
    if args.max_queue < 1:
        raise KititansError(f"--max-queue must be at least 1, got {args.max_queue}")
    # no spin-waiting onnxruntime threads: between two tokens the server's own threads need the cores
    rt = open_runtime(args, spin=False)
    warn_if_base_model(args.model, rt)
    info = model_info(args.model, rt, args.model_name)
    cfg = ServeConfig(args.host, args.port, args.api_key or None, args.model_name, args.max_queue)
    server = Server(rt, info, cfg)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(
            f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    print(f"serving {info.id} ({rt.name}, context {info.context_length}) at {server.url}/v1", file=sys.stderr)
    print(f"  try: curl {server.url}/v1/models   (Ctrl-C stops)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
    return 0
