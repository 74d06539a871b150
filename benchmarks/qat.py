"""PTQ vs QAT at each target, against the fp32 model: perplexity drift, mean KLD and same-top on the run's
held-out split and on a second text (default: TinyStories from ../shared/data), the share of the QAT
weights' error it recovers, the extra training time, and the two ONNX int8 levels against llama.cpp q8_0.

    python benchmarks/qat.py RUN [--targets gguf:q4_0,gguf:q4_k_m,onnx:int4] [--fraction 0.1]
                             [--text FILE] [--chunks 16] [--out bench_out/qat/NAME.json]

For each target it fine-tunes RUN into RUN-qat-<level> (reused when it is already there: delete it to redo), then runs
`kititans bench RUN --with <the QAT runs>` once per evaluation text (quality only: one short speed trial),
so the PTQ rows (RUN exported at the level) and the QAT rows share one fp32 reference and the same tokens.
recovered = 1 - QAT / PTQ, for the perplexity drift (|%|) and for the mean KLD.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script or with -m

from benchmarks.common import machine, md_table, write_json
from kititans.bench.harness import BenchConfig, run_bench
from kititans.bench.withruns import RUNTIME_OF
from kititans.checkpoint import read_meta
from kititans.quantize.qat import parse_target
from kititans.train.qat import QatSpec, default_out, qat, qat_config

TINYSTORIES = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_valid_head.txt"
)
INT8_PAIRS = ["onnx:int8", "onnx:int8_dynamic", "llamacpp:q8_0"]


def fine_tune(run: Path, target: str, args: argparse.Namespace) -> dict[str, Any]:
    t = parse_target(target)
    out = default_out(run, t)
    if (out / "config.json").is_file():  # reused: delete RUN-qat-<level> to fine-tune again
        meta = read_meta(out)
        return {
            "target": target,
            "run": str(out),
            "reused": True,
            "seconds": _seconds(out),
            "qat": meta["qat"],
        }
    spec = QatSpec(run, t, out, fraction=args.fraction)
    layers = [("optim.lr", args.lr)] if args.lr else []
    t0 = time.perf_counter()
    result = qat(spec, qat_config(spec, layers), progress=not args.quiet)
    return {
        "target": target,
        "run": str(out),
        "reused": False,
        "seconds": result.seconds,
        "wall_seconds": time.perf_counter() - t0,
        "steps": result.step,
        "float_val_loss": result.extra["float_val_loss"],
        "ptq_val_loss": result.extra["ptq_val_loss"],
        "qat_val_loss": result.val_loss,
        "base_seconds": result.extra["base_seconds"],
    }


def _seconds(run: Path) -> float | None:
    from kititans.train.qat import base_seconds

    return base_seconds(run)


def quality_table(run: Path, qat_runs: dict[str, str], text: Path | None, args: argparse.Namespace) -> dict:
    """One bench: fp32 reference, the PTQ pairs of every target, the int8 pairs, the QAT rows."""
    pairs = [f"{RUNTIME_OF[t.split(':')[0]]}:{t.split(':')[1]}" for t in qat_runs] + INT8_PAIRS
    cfg = BenchConfig(
        run=run,
        runtimes=list(dict.fromkeys(["torch:fp32", *pairs])),
        prompt_tokens=(16,),
        gen_tokens=4,
        trials=1,
        warmup=0,
        eval_text=text,
        ppl_chunks=args.chunks,
        out=Path(args.work) / ("text" if text else "val"),
        with_runs=[Path(p) for p in qat_runs.values()],
    )
    return run_bench(cfg)


def summarize(report: dict[str, Any], qat_runs: dict[str, str], label: str) -> list[dict[str, Any]]:
    rows = {(r["key"]): r for r in report["results"] if r["status"] == "ok" and r.get("quality")}
    out = []
    for target, path in qat_runs.items():
        fmt, level = target.split(":")
        key = f"{RUNTIME_OF[fmt]}:{level}"
        ptq, q = rows.get(key), rows.get(f"{key}@{Path(path).resolve().name}")
        if not ptq or not q:
            out.append({"text": label, "target": target, "note": "not measured"})
            continue
        a, b = ptq["quality"], q["quality"]
        out.append(
            {
                "text": label,
                "target": target,
                "ptq_drift_pct": round(a["ppl_drift_pct"], 3),
                "qat_drift_pct": round(b["ppl_drift_pct"], 3),
                "drift_recovered": _recovered(abs(a["ppl_drift_pct"]), abs(b["ppl_drift_pct"])),
                "ptq_kld": a["kld_mean"],
                "qat_kld": b["kld_mean"],
                "kld_recovered": _recovered(a["kld_mean"], b["kld_mean"]),
                "ptq_same_top": round(100 * a["same_top"], 2),
                "qat_same_top": round(100 * b["same_top"], 2),
            }
        )
    for key in INT8_PAIRS:
        if key in rows:
            qd = rows[key]["quality"]
            out.append(
                {
                    "text": label,
                    "target": key,
                    "ptq_drift_pct": round(qd["ppl_drift_pct"], 3),
                    "ptq_kld": qd["kld_mean"],
                    "ptq_same_top": round(100 * qd["same_top"], 2),
                }
            )
    return out


def _recovered(ptq: float, q: float) -> float | None:
    return round(1 - q / ptq, 3) if ptq > 0 else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--targets", default="gguf:q4_0,gguf:q4_k_m,onnx:int4")
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=None, help="QAT learning rate (default: kititans qat's)")
    p.add_argument("--text", type=Path, default=TINYSTORIES, help="second evaluation text")
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--work", default=None, help="bench output folder (default bench_out/qat/<run>)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    run = args.run
    args.work = args.work or f"bench_out/qat/{run.resolve().name}"
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    trained = [fine_tune(run, t, args) for t in targets]
    qat_runs = {t["target"]: t["run"] for t in trained}
    base_s = next((t.get("base_seconds") for t in trained if t.get("base_seconds")), None) or _seconds(run)
    for t in trained:
        t["share_of_base_run"] = round(t["seconds"] / base_s, 4) if base_s and t.get("seconds") else None
    texts = [("held-out split", None)] + (
        [("text: " + args.text.name, args.text)] if args.text and args.text.is_file() else []
    )
    quality = []
    for label, text in texts:
        quality += summarize(quality_table(run, qat_runs, text, args), qat_runs, label)
    result = {
        "run": str(run),
        "machine": machine(),
        "base_seconds": base_s,
        "training": trained,
        "quality": quality,
    }
    out = args.out or Path(args.work) / "qat.json"
    write_json(out, result)
    cols = ["text", "target", "ptq_drift_pct", "qat_drift_pct", "drift_recovered", "ptq_kld", "qat_kld"]
    cols += ["kld_recovered", "ptq_same_top", "qat_same_top"]
    print(md_table(quality, cols))
    print()
    print(
        md_table(
            trained,
            ["target", "seconds", "share_of_base_run", "float_val_loss", "ptq_val_loss", "qat_val_loss"],
        )
    )
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
