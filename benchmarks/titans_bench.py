"""Titans against Lite as users measure speed: `kititans bench` (prefill pp128/pp512, decode tg128), each Titans
block against Lite at equal width, at the bench's default threads and at 1 thread, rounds interleaved in one run.

    python benchmarks/titans_bench.py --runs /tmp/tb --threads 2,1 --rounds 3          # onnx:fp32, torch:fp32
    python benchmarks/titans_bench.py --runs /tmp/tb --compile --rounds 3              # + torch --compile rows
    python benchmarks/titans_bench.py --runs /tmp/tb --models lite,mac,mac-global,mac-noh   # hybrid, no h rows

Runs: random-weight `tiny` (Lite) and `titans-tiny` with block mal, mac, mag (same dims: 256 x 4 layers, vocab
4096), made under --runs when missing (the tokenizer is trained on the built-in corpus, or --tokenizer DIR).
Each round runs, for every thread count and model, `kititans bench RUN --runtimes onnx:fp32,torch:fp32
--threads T --no-quality` (its own worker process per runtime, its export step, its timing: see
kititans/bench/speed.py). --compile adds, per thread count and model, the torch runtime with compile=True timed
by the same kititans.bench.speed.measure_speed in a fresh process (kititans bench has no compile switch; Lite has
no compiled step, so its row is eager, as `--compile` runs it). Ratios are Titans tokens/s over Lite's in the
same round; the table shows their median over rounds (and the rounds' min-max).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = {"lite": ("tiny", {}), "mal": ("titans-tiny", {"block": "mal"}), "mac": ("titans-tiny", {"block": "mac"}),
          "mag": ("titans-tiny", {"block": "mag"}),
          # more with --models: mac whose layer 3 (no memory) attends globally (a K/V cache), mac without h rows
          "mac-global": ("titans-tiny", {"block": "mac", "global_layers": [3]}),
          "mac-noh": ("titans-tiny", {"block": "mac", "mac_h_rows": False})}  # fmt: skip
DEFAULT_MODELS = "lite,mal,mac,mag"
METRICS = ("pp128", "pp512", "tg128")

COMPILE_JOB = """
import json, sys, torch
from kititans.bench.speed import SpeedConfig, measure_speed
from kititans.runtimes.pytorch import TorchRuntime
run, threads, trials = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rt = TorchRuntime(run, threads=threads, compile=True)
res = measure_speed(rt, SpeedConfig(prompt_tokens=(128, 512), gen_tokens=128, trials=trials, warmup=1))
print(json.dumps(res))
"""


def make_runs(root: Path, tokenizer: str | None, names: list[str]) -> dict[str, Path]:
    import torch

    from kititans.checkpoint import save_checkpoint
    from kititans.data.tokenizer import Tokenizer
    from kititans.models.spec import find_preset

    if tokenizer:
        tok = Tokenizer.load(tokenizer)
    elif (root / "tokenizer" / "tokenizer.model").is_file():
        tok = Tokenizer.load(root / "tokenizer")
    else:
        from kititans.data.builtin import generate_corpus
        from kititans.data.tokenizer import train_tokenizer

        tok = train_tokenizer(generate_corpus(0, 3_000_000), root / "tokenizer", 4096)
    runs = {}
    for name in names:
        preset, extra = MODELS[name]
        run = root / name
        if not (run / "model.safetensors").is_file():
            spec, p = find_preset(preset)
            cfg = spec.make_config(p.name, extra)
            torch.manual_seed(0)
            save_checkpoint(run, spec.build(cfg).eval(), spec, cfg, tok)
        runs[name] = run
    return runs


def rows_of(speed: dict) -> dict[str, float]:
    """tokens/s medians of one speed result (kititans.bench.speed.measure_speed)."""
    return {
        "pp128": speed["prefill"]["128"]["median"],
        "pp512": speed["prefill"]["512"]["median"],
        "tg128": speed["decode"]["median"],
    }


def bench(run: Path, threads: int, trials: int, runtimes: str, out: Path) -> dict[str, dict[str, float]]:
    cmd = [sys.executable, "-m", "kititans", "bench", str(run), "--runtimes", runtimes, "--threads", str(threads),
           "--no-quality", "--trials", str(trials), "--out", str(out), "-q"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"error: kititans bench {run} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    report = json.loads((out / "bench.json").read_text())
    out_rows = {}
    for r in report["results"]:
        if r.get("status") != "ok":
            sys.exit(f"error: {run} {r['runtime']}:{r['quant']}: {r.get('reason')}")
        out_rows[f"{r['runtime']}:{r['quant']}"] = rows_of(r["speed"])
    return out_rows


def compiled(run: Path, threads: int, trials: int) -> dict[str, float]:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    cmd = [sys.executable, "-c", COMPILE_JOB, str(run), str(threads), str(trials)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"error: compiled torch on {run} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return rows_of(json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, required=True, help="folder of the runs (made when missing)")
    ap.add_argument("--tokenizer", help="a tokenizer folder (vocab 4096) instead of training one")
    ap.add_argument("--threads", default="2,1", help="comma-separated thread counts (default 2,1)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=3, help="kititans bench --trials")
    ap.add_argument("--runtimes", default="onnx:fp32,torch:fp32")
    ap.add_argument("--compile", action="store_true", help="also the torch runtime with compile=True")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--models", default=DEFAULT_MODELS, help=f"of {', '.join(MODELS)} (default {DEFAULT_MODELS})"
    )
    args = ap.parse_args(argv)
    names = args.models.split(",")
    if "lite" not in names or not set(names) <= set(MODELS):
        ap.error(f"--models: a subset of {', '.join(MODELS)} that includes lite (the reference)")
    runs = make_runs(args.runs, args.tokenizer, names)
    threads = [int(t) for t in args.threads.split(",")]
    rounds: list[dict] = []
    for r in range(args.rounds):
        res: dict = {"load_before": os.getloadavg()}
        for t in threads:
            for name, run in runs.items():
                rows = bench(run, t, args.trials, args.runtimes, args.runs / "bench" / f"r{r}-t{t}-{name}")
                if args.compile:
                    rows["torch:fp32 --compile"] = compiled(run, t, args.trials)
                for key, v in rows.items():
                    res.setdefault(f"t{t} {key}", {})[name] = v
        res["load_after"] = os.getloadavg()
        rounds.append(res)
        print(
            f"round {r + 1}/{args.rounds} done, load {tuple(round(x, 1) for x in res['load_after'])}",
            flush=True,
        )
    out = {"rounds": rounds, "ratios": ratios(rounds), "threads": threads, "trials": args.trials,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


def ratios(rounds: list[dict]) -> dict:
    """Per row (threads, runtime) and Titans block: median (min, max) over rounds of tokens/s / Lite's, and the
    median tokens/s of each model."""
    out: dict = {}
    for row in (k for k in rounds[0] if k.startswith("t")):
        for name in rounds[0][row]:
            for m in METRICS:
                tps = [rd[row][name][m] for rd in rounds]
                rat = [rd[row][name][m] / rd[row]["lite"][m] for rd in rounds]
                out.setdefault(row, {}).setdefault(name, {})[m] = {
                    "tps": statistics.median(tps), "ratio": statistics.median(rat), "min": min(rat), "max": max(rat),
                }  # fmt: skip
    return out


def report(res: dict) -> str:
    lines = ["| threads, runtime | model | pp128 tok/s (x Lite) | pp512 tok/s (x Lite) | tg128 tok/s (x Lite) |",
             "|---|---|--:|--:|--:|"]  # fmt: skip
    for row, models in res["ratios"].items():
        for name, m in models.items():
            cells = [f"{m[k]['tps']:,.0f} ({m[k]['ratio']:.2f}x)" if name != "lite" else f"{m[k]['tps']:,.0f}"
                     for k in METRICS]  # fmt: skip
            lines.append(f"| {row} | {name} | " + " | ".join(cells) + " |")
    loads = [rd["load_before"][0] for rd in res["rounds"]] + [rd["load_after"][0] for rd in res["rounds"]]
    lines.append(f"\n{len(res['rounds'])} rounds, load average (1 min) {min(loads):.1f}-{max(loads):.1f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(main(sys.argv[1:])))
