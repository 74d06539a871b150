"""kititans chat: an interactive, streaming chat REPL over any runtime."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kititans.commands.common import (
    add_runtime_args,
    add_sampling_args,
    open_runtime,
    sampling_from_args,
    warn_if_base_model,
)

HELP = "chat with a model (streaming; /reset clears the history, /quit exits)"
EXAMPLES = """  kititans chat runs/tiny-sft
  kititans chat runs/tiny-sft --system "You are a friendly teacher for young children."
  kititans chat runs/tiny-sft/export/model.q4_k_m.gguf --temperature 0.3
  printf 'Hi!\\nWhat sound does a cow make?\\n' | kititans chat runs/tiny-sft   # scripted
  kititans chat runs/titans-sft --session me.state   # Titans: the conversation continues next time"""


def configure(p: argparse.ArgumentParser) -> None:
    add_runtime_args(p)
    p.add_argument("--system", help="system prompt")
    p.add_argument(
        "--session",
        type=Path,
        metavar="FILE",
        help="Titans: keep the conversation in FILE (its fixed-size memory state, tokens and messages): "
        "loaded at the start when FILE exists, saved after every reply",
    )
    add_sampling_args(p, max_tokens=200)


def run(args: argparse.Namespace) -> int:
    from kititans.data.chat import trim_history
    from kititans.generate import Generation, stream_text

    sampling = sampling_from_args(args)  # bad values fail before the model loads
    rt = open_runtime(args)
    warn_if_base_model(args.model, rt)
    codec = rt.codec
    interactive = sys.stdin.isatty()
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    cache: list[int] = []  # token ids the runtime holds, reused across turns
    if args.session is not None:
        messages, cache = open_session(rt, args.session, messages)
    if interactive:
        print(
            f"chatting with {args.model} ({rt.name}); /reset clears the history, /quit exits", file=sys.stderr
        )
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            messages, cache = list(base), []
            if args.session is not None:
                rt.reset()
                save_session(rt, args.session, cache, {"messages": messages})
            print("(history cleared)", file=sys.stderr)
            continue
        if not interactive:
            print(f"> {text}")
        messages.append({"role": "user", "content": text})
        # keep room for the reply: trim the oldest turns first (a system prompt stays)
        kept, ids = trim_history(
            codec, messages, rt.context_length - min(sampling.max_tokens, rt.context_length // 2)
        )
        if len(kept) < len(messages):
            print(
                f"(history trimmed to fit the context: dropped the {len(messages) - len(kept)} oldest messages)",
                file=sys.stderr,
            )
        messages = kept
        gen = Generation(rt, ids, sampling, codec.stop_ids, history=cache)
        reply = ""
        for chunk in stream_text(gen, codec):
            reply += chunk
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply.strip() or "..."})
        if args.session is not None:  # after every reply: an interrupted chat loses nothing
            save_session(rt, args.session, cache, {"messages": messages})
    return 0


def open_session(rt, path: Path, messages: list[dict]) -> tuple[list[dict], list[int]]:
    """The messages and token ids of session file `path` (its state loaded into `rt`), or, for a new file,
    the given messages after checking the runtime can save a session (one-line error otherwise)."""
    from kititans.runtimes.session import load_session, save_session

    if not path.exists():
        save_session(rt, path, [], {"messages": messages})  # fails now, not after the first reply
        return messages, []
    session = load_session(rt, path)
    restored = list(session.extra.get("messages") or messages)
    if messages and restored[:1] != messages[:1]:
        print("(--system ignored: the session keeps its own)", file=sys.stderr)
    print(f"(session {path}: {len(restored)} messages, {len(session.tokens)} tokens)", file=sys.stderr)
    return restored, session.tokens


def save_session(rt, path: Path, tokens: list[int], extra: dict) -> None:
    from kititans.runtimes.session import save_session as save

    save(rt, path, tokens, extra)
