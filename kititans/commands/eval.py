"""kititans eval: lm-evaluation-harness tasks on a run and its exports, with flips and KLD against fp32."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kititans.argtypes import nonneg_int, positive_int

HELP = "score lm-eval tasks (English, Japanese, your own YAMLs) on a run and every export of it"
EXAMPLES = """  kititans eval runs/my-run --tasks hellaswag,arc_easy,piqa --limit 500          # the float model (torch)
  kititans eval runs/my-run --tasks ja_leaderboard_jcommonsenseqa --artifacts all # fp32 + every export here
  kititans eval runs/my-run --tasks arc_easy --artifacts gguf:q4_k_m,onnx:int4    # flips and KLD vs fp32
  kititans eval runs/my-run --tasks my_task --include-path tasks/                 # your own task YAMLs
  kititans eval runs/my-run/export/model.q8_0.gguf --tasks arc_easy --limit 200   # one artifact
  kititans eval runs/my-sft --tasks arc_easy --apply-chat-template --num-fewshot 3

Needs pip install 'kititans[eval]'. Task names, groups, --num-fewshot, --limit and the per-artifact
results.json are lm-eval's own (list the tasks with: lm-eval ls tasks). Reports: OUT/eval.json, eval.md,
eval.html (default OUT = RUN/eval, replaced as a whole when the evaluation finishes).
From Python: lm_eval.simple_evaluate(model=kititans.eval.backend.KititansLM("runs/my-run"), tasks=[...])"""


def parse_list(value: str | None) -> list[str] | None:
    """A comma-separated flag value -> its items (None when the flag was not given)."""
    from kititans.errors import KititansError

    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise KititansError("an empty list was given: name at least one item, e.g. --tasks arc_easy")
    return items


def runtime_options(items: list[str]) -> dict[str, Any]:
    """--runtime-opt KEY=VALUE flags -> keyword arguments (true/false, integers, floats or text)."""
    from kititans.errors import KititansError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise KititansError(f"--runtime-opt {item!r}: expected KEY=VALUE, e.g. kv_type=f32")
        value: Any = raw.strip()
        if value.lower() in ("true", "false"):
            value = value.lower() == "true"
        else:
            for kind in (int, float):
                try:
                    value = kind(value)
                    break
                except ValueError:
                    pass
        out[key.strip()] = value
    return out


def _limit(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of items (or a fraction < 1), got {value!r}"
        ) from None
    if x <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return int(x) if x >= 1 else x


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run directory, or one artifact (.gguf, ONNX folder, .mlpackage)")
    p.add_argument("--tasks", required=True, help="lm-eval task, group or tag names, comma-separated")
    p.add_argument(
        "--artifacts",
        metavar="all|FMT:LEVEL,...",
        help="also score exports of the run: `all`, or e.g. gguf:q8_0,gguf:q4_k_m,onnx:int4,coreml:int8",
    )
    p.add_argument("--limit", type=_limit, help="items per task (a fraction < 1 takes that share)")
    p.add_argument("--num-fewshot", type=nonneg_int, help="few-shot examples (default: the task's own)")
    p.add_argument(
        "--include-path", action="append", type=Path, default=[], metavar="DIR", help="folder of task YAMLs"
    )
    p.add_argument(
        "--no-builtin-tasks",
        dest="builtin_tasks",
        action="store_false",
        help="index only the --include-path folders, not lm-eval's ~15k task YAMLs (a faster start)",
    )
    p.add_argument("--apply-chat-template", action="store_true", help="render prompts with the chat template")
    p.add_argument(
        "--fewshot-as-multiturn", action="store_true", help="with a chat template: examples as earlier turns"
    )
    p.add_argument("--gen-kwargs", help="generation settings for generate tasks, e.g. max_gen_toks=64")
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="sequences per batched call (default 8)"
    )
    p.add_argument("--max-length", type=positive_int, help="context length used (default: the model's)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: the runtime's)")
    p.add_argument("--device", default="cpu", help="torch/onnx device: cpu or cuda (default cpu)")
    p.add_argument(
        "--runtime-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a runtime setting for every artifact, e.g. kv_type=f32 flash_attn=false (llama.cpp)",
    )
    p.add_argument("--out", type=Path, help="report folder (default RUN/eval)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from kititans.eval.tasks import require_lm_eval

    require_lm_eval()  # before anything else: the one-line error naming the extra
    from kititans.eval.report import markdown
    from kititans.eval.sweep import EvalConfig, run_eval

    cfg = EvalConfig(
        target=Path(args.model),
        tasks=parse_list(args.tasks) or [],
        artifacts=parse_list(args.artifacts),
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        include_path=list(args.include_path),
        builtin_tasks=args.builtin_tasks,
        apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=args.fewshot_as_multiturn,
        gen_kwargs=args.gen_kwargs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        threads=args.threads,
        device=args.device,
        runtime_options=runtime_options(args.runtime_opt),
        out=args.out,
    )
    report = run_eval(cfg, None if args.quiet else progress)
    sys.stdout.write(markdown(report))
    print(f"reports in {report['out']} (eval.json, eval.md, eval.html; lm-eval's results per artifact)")
    return 0


def progress(e: dict[str, Any]) -> None:
    if e["kind"] == "plan":
        print(f"scoring {', '.join(e['tasks'])} on {', '.join(e['artifacts'])}", file=sys.stderr)
        for note in e["notes"]:
            print(f"  note: {note}", file=sys.stderr)
    elif e["kind"] == "start":
        print(f"[{e['index'] + 1}] {e['artifact']} ...", file=sys.stderr)
    elif e["kind"] == "done":
        d = e["entry"]
        trunc = f", {d['truncated']} truncated" if d["truncated"] else ""
        print(f"    {d['items']} items in {d['seconds']:.1f} s{trunc}", file=sys.stderr)
