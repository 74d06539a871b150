"""kititans bench: speed, memory and quality of every runtime x quantization level of a run, one process
per pair; or a comparison of reports from several devices."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kititans.argtypes import int_list, positive_int
from kititans.bench.rows import RowOptions, add_row_options

HELP = "measure speed, memory and quality of every runtime and quantization level of a run"
EXAMPLES = """  kititans bench runs/tiny                           # every installed runtime at its main levels
  kititans bench runs/tiny --runtimes llamacpp --quants f16,q8_0,q4_k_m,q4_0
  kititans bench runs/tiny --runtimes torch:fp32,llamacpp:q4_0,onnx:int4 --trials 3
  kititans bench runs/tiny --prompt-tokens 128,512 --gen-tokens 128 --eval-text held_out.txt
  kititans bench runs/tiny --with runs/tiny-qat-q4_0 runs/tiny-qat-onnx-int4   # QAT rows beside PTQ rows
  kititans bench runs/tiny --runtimes llamacpp:q4_0 --repack both --delay 2   # repack on vs off, cooled
  kititans bench pack runs/tiny --artifacts gguf:q4_k_m,gguf:q4_0,onnx:int4,coreml:int4 --out tiny.benchpack
      # then on the device: python tiny.benchpack/run.py --label pi5 --trials 5 --out pi5.json
  kititans bench compare pc/bench.json pi5.json mac.json --out cmp/   # one checked table across devices
  kititans bench compare pc/bench.json llama-bench.json et.json       # + llama-bench / ExecuTorch JSON (speed)
  kititans bench runs/tiny --tasks arc_easy,ja_leaderboard_jcommonsenseqa --limit 200   # + accuracy, flips
  kititans bench --compare a.json b.json              # the same (use this if a run is named `compare`)

quantization names per runtime (`--quants` applies each to the runtimes that have it):
  torch     fp32 bf16 fp16                    (the run itself, cast at load)
  llamacpp  f32 f16 bf16 q8_0 q6_k q5_k_m q4_k_m q4_0
  onnx      fp32 fp16 int8 int8_dynamic int4  genai  fp32 fp16 int8 int4 (onnxruntime-genai)
  coreml    fp16 int8 int4 palettize4         (macOS only)
  aliases: f16=fp16, f32=fp32, q8 = q8_0/int8, q4 = q4_k_m/int4"""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "targets", nargs="+", metavar="RUN", help="a run directory, or `compare` and bench.json files"
    )
    p.add_argument(
        "--runtimes",
        help="torch,llamacpp,onnx,genai,coreml and/or runtime:quant pairs "
        "(default: every runtime installed here)",
    )
    p.add_argument(
        "--quants", help="quantization levels, e.g. f16,q8_0,q4_k_m (default: each runtime's main ones)"
    )
    p.add_argument(
        "--prompt-tokens",
        type=int_list,
        default=(128, 512),
        metavar="N,N",
        help="prefill lengths (default 128,512)",
    )
    p.add_argument(
        "--gen-tokens", type=positive_int, default=128, metavar="N", help="decode length (default 128)"
    )
    p.add_argument("--trials", type=positive_int, default=5, help="timed repetitions per test (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each test (default 1)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: the performance cores)")
    p.add_argument("--device", default="cpu", help="torch/onnx device: cpu or cuda (default cpu)")
    q = p.add_argument_group("quality")
    q.add_argument(
        "--eval-text", type=Path, metavar="FILE", help="held-out text (default: the run's validation split)"
    )
    q.add_argument(
        "--ppl-ctx", type=int, default=0, metavar="N", help="chunk length (default min(512, context))"
    )
    q.add_argument(
        "--ppl-chunks", type=positive_int, default=16, metavar="N", help="chunks scored (default 16)"
    )
    q.add_argument("--no-quality", dest="quality", action="store_false", help="speed and memory only")
    q.add_argument("--keep-reference", action="store_true", help="keep OUT/reference.npz (float16 log-probs)")
    a = p.add_argument_group("accuracy (lm-eval tasks, pip install 'kititans[eval]'; see kititans eval)")
    a.add_argument("--tasks", help="lm-eval tasks scored on every pair: accuracy and flips against fp32")
    a.add_argument("--limit", type=float, metavar="N", help="items per task (default: all)")
    a.add_argument("--num-fewshot", type=int, metavar="N", help="few-shot examples (default: the task's)")
    a.add_argument(
        "--include-path", action="append", type=Path, default=[], metavar="DIR", help="folder of task YAMLs"
    )
    p.add_argument(
        "--bandwidth",
        type=float,
        metavar="GB/S",
        help="memory bandwidth for the roofline (default: measured by a copy test)",
    )
    p.add_argument("--out", type=Path, help="report folder (default RUN/bench; compare: ./bench-compare)")
    p.add_argument("--label", help="the device's name in reports (default: board, GPU or CPU model)")
    p.add_argument("--reexport", action="store_true", help="export again even when RUN/export is up to date")
    p.add_argument("--timeout", type=float, default=1800, metavar="S", help="seconds per pair (default 1800)")
    p.add_argument("--seed", type=int, default=0, help="random prompt tokens seed (default 0)")
    p.add_argument(
        "--with",
        dest="with_runs",
        nargs="+",
        type=Path,
        default=[],
        metavar="QATRUN",
        help="QAT runs of RUN (kititans qat): each measured at its target level against RUN's fp32 reference",
    )
    p.add_argument("--compare", action="store_true", help="the targets are bench.json files to compare")
    p.add_argument(
        "--force",
        action="store_true",
        help="compare: keep rows of other weights/eval text (marked); pack: replace an existing --out",
    )
    p.add_argument(
        "--artifacts",
        metavar="FMT:Q,...",
        help="pack: the artifacts to ship, e.g. gguf:q4_k_m,gguf:q4_0,onnx:int4,coreml:int4",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    add_row_options(p)


def compare_targets(args: argparse.Namespace) -> list[str] | None:
    """The report files when this is a comparison: --compare, `compare A.json ...`, or only .json targets.
    A single target is always a run, so a run directory named `compare` still benches."""
    t = args.targets
    if args.compare:
        return t
    if len(t) > 1 and t[0] == "compare":
        return t[1:]
    if all(x.endswith(".json") and Path(x).is_file() for x in t):
        return t
    return None


def run(args: argparse.Namespace) -> int:
    from kititans.errors import KititansError

    files = compare_targets(args)
    if files is not None:
        return run_compare(files, args)
    if len(args.targets) > 1 and args.targets[0] == "pack":
        return run_pack(args)
    if len(args.targets) > 1:
        raise KititansError(
            "bench measures one run at a time (to compare reports: kititans bench compare A.json B.json)"
        )
    from kititans.bench.harness import BenchConfig, run_bench
    from kititans.bench.pairs import parse_list
    from kititans.bench.report import write_reports

    if (Path(args.targets[0]) / "run.py").is_file() and (Path(args.targets[0]) / "kititans.pyz").is_file():
        raise KititansError(f"{args.targets[0]} is a bench pack: run it with python {args.targets[0]}/run.py")
    tasks = parse_list(args.tasks)
    if tasks:  # task names and the eval extra are checked before an hour of benchmarking
        from kititans.eval.tasks import require_lm_eval, resolve_tasks, task_manager

        require_lm_eval()
        resolve_tasks(task_manager(args.include_path), tasks)

    cfg = BenchConfig(
        run=Path(args.targets[0]),
        runtimes=parse_list(args.runtimes),
        quants=parse_list(args.quants),
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        trials=args.trials,
        warmup=max(0, args.warmup),
        seed=args.seed,
        threads=args.threads,
        device=args.device,
        quality=args.quality,
        eval_text=args.eval_text,
        ppl_ctx=args.ppl_ctx,
        ppl_chunks=args.ppl_chunks,
        bandwidth_gbs=args.bandwidth,
        out=args.out,
        reexport=args.reexport,
        timeout_s=args.timeout,
        label=args.label,
        keep_reference=args.keep_reference,
        with_runs=list(args.with_runs),
        rows=RowOptions(args.repack, args.n_gpu_layers, tuple(args.coreml_units)),
        delay_s=args.delay,
        omp_wait_policy=args.omp_wait_policy,
    )
    progress = Progress(args.quiet)
    try:
        report = run_bench(cfg, progress)
    finally:
        progress.close()
    out = Path(args.out) if args.out else Path(args.targets[0]) / "bench"
    if tasks:
        from kititans.commands.eval import progress as eval_progress
        from kititans.eval.bench import add_accuracy

        limit = int(args.limit) if args.limit and args.limit >= 1 else args.limit
        add_accuracy(
            report,
            cfg.run,
            tasks,
            limit,
            args.num_fewshot,
            args.include_path,
            out / "eval",
            None if args.quiet else eval_progress,
        )
    paths = write_reports(report, out)
    ok = sum(r["status"] == "ok" for r in report["results"])
    print(f"{ok}/{len(report['results'])} rows measured in {report['seconds']:.0f} s")
    for kind, path in paths.items():
        print(f"  {kind:<5} {path}")
    if ok == 0:
        print("error: no row could be measured (reasons in the report)")
        return 1
    return 0


def run_compare(files: list[str], args: argparse.Namespace) -> int:
    from kititans.bench.compare import compare_reports, load_any, write_compare
    from kititans.errors import KititansError

    if len(files) < 1:
        raise KititansError("compare needs at least one report file")
    cmp = compare_reports([load_any(f) for f in files], force=args.force)
    paths = write_compare(cmp, args.out or Path("bench-compare"))
    marked = sum(r["check"].startswith("DIFFERS") for r in cmp["rows"])
    print(
        f"compared {len(files)} reports, {len(cmp['rows'])} rows"
        + (f" ({marked} marked DIFFERS)" if marked else "")
    )
    for kind, path in paths.items():
        print(f"  {kind:<5} {path}")
    return 0


def run_pack(args: argparse.Namespace) -> int:
    from kititans.bench.pack import PackConfig, build_pack, pack_summary_lines
    from kititans.bench.pairs import parse_list
    from kititans.errors import KititansError

    if len(args.targets) != 2:
        raise KititansError(
            "bench pack takes one run: kititans bench pack RUN --artifacts gguf:q4_0 --out X.benchpack"
        )
    run_dir = Path(args.targets[1])
    if not args.artifacts:
        raise KititansError("bench pack needs --artifacts, e.g. --artifacts gguf:q4_k_m,gguf:q4_0,onnx:int4")
    cfg = PackConfig(
        run=run_dir,
        artifacts=parse_list(args.artifacts) or [],
        out=args.out or Path(f"{run_dir.resolve().name}.benchpack"),
        eval_text=args.eval_text,
        ppl_ctx=args.ppl_ctx,
        ppl_chunks=args.ppl_chunks,
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        seed=args.seed,
        threads=args.threads,
        reexport=args.reexport,
        timeout_s=args.timeout,
        force=args.force,
        omp_wait_policy=args.omp_wait_policy,
    )

    def show(e: dict[str, Any]) -> None:
        if not args.quiet and e.get("kind") in ("exports",):
            print(f"exporting {', '.join(e['tasks'])}", file=sys.stderr)
        elif not args.quiet and e.get("job") == "pack":
            print(e["stage"], file=sys.stderr)

    for line in pack_summary_lines(build_pack(cfg, show)):
        print(line)
    return 0


class Progress:
    """A bar over the pairs, the current stage as its postfix, one summary line per finished pair."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar: Any = None

    def __call__(self, e: dict[str, Any]) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        kind = e["kind"]
        if kind == "plan":
            # a live bar on a terminal; in logs and pipes only the lines below
            self.bar = tqdm(
                total=len(e["pairs"]),
                unit="pair",
                desc="bench",
                dynamic_ncols=True,
                disable=not sys.stderr.isatty(),
            )
            self.bar.write(f"measuring {len(e['pairs'])} rows: {', '.join(e['pairs'])}")
        elif self.bar is None:
            return
        elif kind == "exports":
            self.bar.write(f"exporting {len(e['tasks'])} missing artifacts: {', '.join(e['tasks'])}")
        elif kind == "start":
            self.bar.set_description(e["pair"])
        elif kind == "stage":
            self.bar.set_postfix_str(e.get("stage", ""))
        elif kind == "pair":
            self.bar.update()
            self.bar.write(summary(e["result"]))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary(r: dict[str, Any]) -> str:
    """One line per pair for the terminal."""
    from kititans.bench.cells import drift, fmt, get, kld, quant_label

    name = f"{r['runtime']} {quant_label(r)}"
    if r["status"] != "ok":
        return f"  FAIL {name:<24} {r.get('reason', '')}"
    parts = []
    for n, s in (get(r, "speed", "prefill") or {}).items():
        parts.append(f"pp{n} {fmt(s['median'])} t/s")
    if get(r, "speed", "decode"):
        parts.append(f"tg {fmt(r['speed']['decode']['median'])} t/s")
    for b, s in (get(r, "speed", "batch") or {}).items():  # an encoder's embeddings/s
        parts.append(f"b{b} {fmt(s['median'])} emb/s")
    if get(r, "memory", "peak_rss_bytes"):
        parts.append(f"RSS {r['memory']['peak_rss_bytes'] / 2**20:.0f} MiB")
    q = r.get("quality")
    if q and "cosine_mean" in q:
        parts.append(
            f"cosine {q['cosine_mean']:.5f} (min {q['cosine_min']:.5f}) R@1 {fmt(q['retrieval_at1'])}"
        )
    elif q:
        parts.append(f"PPL {fmt(q['ppl'])} (drift {drift(q['ppl_drift_pct'])}%) KLD {kld(q['kld_mean'])}")
    elif r.get("quality_error"):
        parts.append(f"quality: {r['quality_error']}")
    return f"  ok   {name:<24} " + "  ".join(parts)
