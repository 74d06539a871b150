"""SFT with the old loss reduction (each micro-batch's mean over its assistant tokens, averaged over micro-batches:
a token of a short reply weighs more) against the new one (the sum over all assistant tokens of the step
divided by their count), the same base, data, steps and seed; both measured by this checkout's evaluation.

usage: python -m benchmarks.sft_reduction --base runs/tiny --old-code /tmp/main [--steps 600]
         [--grad-accum 4] [--prompts 100] [--out bench_out/sft_reduction]
--old-code is a checkout of kititans from before the change (its `kititans sft` trains the "old" run).
Reported per run: the assistant-token validation loss on the SFT val split, and the share of held-out chats
(another seed than training) whose greedy reply ends with <|end|>.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parents[1]


def train(code: Path, base: str, out: Path, args: argparse.Namespace) -> None:
    if (out / "config.json").is_file():
        return
    cmd = [sys.executable, "-m", "kititans", "sft", base, "--out", str(out), "--steps", str(args.steps),
           "--dtype", "fp32", "--compile", "off", "--set", f"train.grad_accum={args.grad_accum}",
           "--set", f"train.batch_size={args.batch_size}", "--set", "train.report=false", "-q"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(code)}
    subprocess.run(cmd, check=True, env=env, cwd=str(code))


def ended_share(run: Path, prompts: int) -> float:
    from kititans.data.builtin import generate_chat_examples
    from kititans.data.chat import render_prompt
    from kititans.generate import Generation, SamplingConfig
    from kititans.runtimes.pytorch import TorchRuntime

    rt = TorchRuntime(run)
    tok = rt.codec
    ended = 0
    for conv in generate_chat_examples(seed=12345, n=prompts):  # not the training seed
        prompt = render_prompt(tok, conv[:-1])
        budget = min(128, rt.context_length - len(prompt) - 1)
        gen = Generation(rt, prompt, SamplingConfig(temperature=0, max_tokens=budget), tok.stop_ids)
        list(gen)
        ended += bool(gen.tokens) and gen.tokens[-1] == tok.end_id
    return ended / prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--old-code", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--out", default="bench_out/sft_reduction")
    args = ap.parse_args()
    from benchmarks.common import machine, md_table, write_json
    from kititans.checkpoint import read_meta
    from kititans.config import RunConfig, apply_overrides, flatten
    from kititans.train.sft import sft_eval

    out = Path(args.out).resolve()
    base = str(Path(args.base).resolve())
    rows = []
    for name, code in (("old", args.old_code.resolve()), ("new", HERE)):
        run = out / name
        train(code, base, run, args)
        cfg = apply_overrides(RunConfig(), flatten(read_meta(run)["run"]))
        report = sft_eval(cfg, run)
        rows.append({"reduction": name, "steps": args.steps, "val loss (assistant tokens)": round(report.val_loss, 4),
                     "replies ending with <|end|>": f"{ended_share(run, args.prompts):.0%}",
                     "held-out chats": args.prompts})  # fmt: skip
        print(md_table(rows[-1:], list(rows[-1])), flush=True)
    print(md_table(rows, list(rows[0])))
    write_json(out / "summary.json", {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                      "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
