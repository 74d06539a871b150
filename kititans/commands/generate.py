"""kititans generate: one completion from any runtime."""

from __future__ import annotations

import argparse
import sys

from kititans.commands.common import (
    add_runtime_args,
    add_sampling_args,
    open_runtime,
    sampling_from_args,
    warn_if_base_model,
)

HELP = "generate one completion of a prompt (run dir, .gguf, ONNX or CoreML model)"
EXAMPLES = """  kititans generate runs/tiny-20261124 --prompt "Once upon a time"
  kititans generate runs/x/export/model.q4_k_m.gguf --prompt "Tom had a red ball." --temperature 0
  echo "The cat" | kititans generate runs/x --max-tokens 50 --seed 1"""


def configure(p: argparse.ArgumentParser) -> None:
    add_runtime_args(p)
    p.add_argument("--prompt", help="prompt text (default: read stdin)")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt as one user turn of the chat template"
    )
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--stats", action="store_true", help="print tokens/s to stderr")
    add_sampling_args(p)


def run(args: argparse.Namespace) -> int:
    from kititans.data.chat import render_prompt
    from kititans.errors import KititansError
    from kititans.generate import Generation, stream_text

    sampling = sampling_from_args(args)  # bad values fail before the model loads
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise KititansError("empty prompt: pass --prompt TEXT or pipe text on stdin")
    rt = open_runtime(args)
    codec = rt.codec
    if args.chat:
        warn_if_base_model(args.model, rt)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        ids = render_prompt(codec, messages)
    else:
        ids = [codec.bos_id, *codec.encode(prompt)]
        sys.stdout.write(prompt)
    if len(ids) >= rt.context_length:
        raise KititansError(f"the prompt has {len(ids)} tokens; the model's context is {rt.context_length}")
    gen = Generation(rt, ids, sampling, codec.stop_ids)
    for chunk in stream_text(gen, codec):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        s = gen.stats
        print(
            f"[{rt.name}] prompt {s.prompt_tokens} tokens at {s.prompt_tps:.1f} tok/s, generated "
            f"{s.generated_tokens} at {s.generation_tps:.1f} tok/s ({s.finish_reason})",
            file=sys.stderr,
        )
    return 0
