"""`kititans serve --sessions`: what a session costs per request, through the server (torch runtime).

    python benchmarks/serve_sessions.py --tokenizer /work/artifacts/tiny-step400 --preset titans-tiny

A random-weight run of the preset (the cost does not depend on training) with the given run's tokenizer is
served with --sessions; a conversation of --turns turns (each --prompt new token ids, --tokens greedy reply
tokens, completions with token-id prompts) runs once with a session and once without (the whole
conversation fed every turn, as a client without a session must), interleaved turn by turn. Reported: the
median per-turn time of the file read + check (preparation thread), of loading it into the runtime and of
saving it (engine thread), the file size, and the median request times of both ways.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from kititans.checkpoint import save_checkpoint
from kititans.data.tokenizer import Tokenizer
from kititans.models.spec import find_preset
from kititans.runtimes import load_runtime
from kititans.serve import ServeConfig, Server, model_info
from kititans.serve.sessions import SessionStore


def timed(store: SessionStore, name: str, out: dict[str, list[float]]) -> None:
    fn = getattr(store, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            out.setdefault(name, []).append(1000 * (time.perf_counter() - t0))

    setattr(store, name, wrapper)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="a run directory whose tokenizer to use")
    ap.add_argument("--preset", default="titans-tiny")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    spec, preset = find_preset(args.preset)
    tok = Tokenizer.load(args.tokenizer)
    cfg = spec.make_config(preset.name, {"vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    run = save_checkpoint(tmp / "run", spec.build(cfg).eval(), spec, cfg, tok, extra={"step": 0})
    rt = load_runtime(run, "torch")
    times: dict[str, list[float]] = {}
    with Server(rt, model_info(run, rt), ServeConfig(port=0, sessions=str(tmp / "s"))) as server:
        for name in ("read", "resume", "save"):
            timed(server.engine.sessions, name, times)
        gen = torch.Generator().manual_seed(1)
        convo: list[int] = [tok.bos_id]
        with_s, without = [], []
        body = {"temperature": 0.0, "max_tokens": args.tokens, "ignore_eos": True, "logprobs": 0,
                "return_tokens_as_token_ids": True}  # fmt: skip
        for _ in range(args.turns):
            convo += torch.randint(5, tok.vocab_size - 1, (args.prompt,), generator=gen).tolist()
            answers = []
            for session, sink in (("bench", with_s), (None, without)):
                t0 = time.perf_counter()
                extra = {"session": session} if session else {}
                r = httpx.post(
                    server.url + "/v1/completions", json={**body, "prompt": convo, **extra}, timeout=600
                )
                sink.append(1000 * (time.perf_counter() - t0))
                r.raise_for_status()
                answers.append([int(t.split(":")[1]) for t in r.json()["choices"][0]["logprobs"]["tokens"]])
            convo += answers[0]
        files = list((tmp / "s").rglob("*.state"))
    med = {k: round(statistics.median(v), 2) for k, v in times.items()}
    result = {
        "preset": args.preset, "turns": args.turns, "prompt_per_turn": args.prompt, "reply_tokens": args.tokens,
        "conversation_tokens": len(convo), "file_bytes": files[0].stat().st_size,
        "read_ms": med["read"], "load_ms": med["resume"], "save_ms": med["save"],
        "request_ms_with_session": round(statistics.median(with_s), 1),
        "request_ms_whole_conversation": round(statistics.median(without), 1),
        "last_turn_ms_with_session": round(with_s[-1], 1), "last_turn_ms_whole": round(without[-1], 1),
        "same_tokens": answers[0] == answers[1], "loadavg": os.getloadavg()[0], "threads": torch.get_num_threads(),
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
