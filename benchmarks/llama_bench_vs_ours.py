"""Our llama.cpp rows against stock `llama-bench` on the same GGUF files and threads, with weight repacking on
and off, interleaved round by round: prefill (ppN) and decode (tgN) tokens/s.

usage: /work/bin/timing-lock python benchmarks/llama_bench_vs_ours.py A.gguf [B.gguf ...] [--threads 2]
       [--prompt 512] [--gen 128] [--reps 5] [--rounds 3] [--llama-bench PATH] [--json out.json]

Ours: one `kititans.bench.worker` process per measurement (what a `kititans bench` row runs: BOS + random ids,
median of --reps trials after a warm-up, llama-cpp-python's low-level API). Theirs: `llama-bench -p N -n N -r
reps --repack 0|1 -o json` (mean of reps after a warm-up; random ids; no Python in the loop). Both get the same
OMP_WAIT_POLICY (this script's, PASSIVE unless set). Each llama-bench JSON is kept beside --json, so
`kititans bench compare` can import it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kititans.bench.worker import run_job, worker_env
from kititans.runtimes.llamacpp import repack_setting


def ours(
    gguf: Path, threads: int, repack: bool, prompt: int, gen: int, reps: int, work: Path
) -> dict[str, float]:
    job = {
        "mode": "measure",
        "runtime": "llamacpp",
        "quant": gguf.stem.split(".")[-1],
        "artifact": str(gguf),
        "threads": threads,
        "device": "cpu",
        "settings": {"repack": repack, "n_gpu_layers": 0},
        "speed": {"prompt_tokens": [prompt], "gen_tokens": gen, "trials": reps, "warmup": 1, "seed": 0},
        "quality": None,
    }
    res = run_job(job, work, "row", 1800, lambda e: None, env=worker_env(None))
    if res.get("status") != "ok":
        sys.exit(f"our row failed: {res.get('reason')}")
    return {"pp": res["speed"]["prefill"][str(prompt)]["median"], "tg": res["speed"]["decode"]["median"]}


def theirs(
    exe: str, gguf: Path, threads: int, repack: bool, prompt: int, gen: int, reps: int, keep: Path | None
) -> dict[str, float]:
    cmd = [exe, "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(gen), "-r", str(reps)]
    cmd += ["--repack", "1" if repack else "0", "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"llama-bench failed ({r.returncode}): {r.stderr[-1500:]}")
    tests = json.loads(r.stdout)
    if keep:
        keep.write_text(r.stdout)
    pp = next(t["avg_ts"] for t in tests if t["n_prompt"] and not t["n_gen"])
    tg = next(t["avg_ts"] for t in tests if t["n_gen"] and not t["n_prompt"])
    return {"pp": pp, "tg": tg}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", type=Path, nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--llama-bench", default=shutil.which("llama-bench") or "/work/tools/lcp/build/bin/llama-bench"
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if not Path(args.llama_bench).is_file():
        sys.exit(f"no llama-bench at {args.llama_bench} (--llama-bench PATH)")
    why = repack_setting(None)[1]
    print(f"repack default here: {why}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    samples: dict[str, list[dict[str, float]]] = {}
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as work:
        for rnd in range(args.rounds):
            for g in args.gguf:
                for repack in (True, False):
                    keep = args.json.with_name(f"{args.json.stem}.llama-bench.{g.stem}.r{int(repack)}.json") if (
                        args.json and rnd == 0
                    ) else None  # fmt: skip
                    for who in ("ours", "llama-bench"):
                        t0 = time.perf_counter()
                        if who == "ours":
                            res = ours(g, args.threads, repack, args.prompt, args.gen, args.reps, Path(work))
                        else:
                            res = theirs(args.llama_bench, g, args.threads, repack, args.prompt, args.gen,
                                         args.reps, keep)  # fmt: skip
                        key = f"{g.name} repack={'on' if repack else 'off'} {who}"
                        samples.setdefault(key, []).append({**res, "s": time.perf_counter() - t0})
                        print(
                            f"round {rnd} {key}: pp{args.prompt} {res['pp']:.0f} t/s, tg{args.gen} {res['tg']:.1f} t/s"
                        )
            load.append(os.getloadavg()[0])
    rows = []
    for key, xs in samples.items():
        rows.append(
            {
                "row": key,
                "pp": statistics.median(x["pp"] for x in xs),
                "tg": statistics.median(x["tg"] for x in xs),
                "pp_all": [round(x["pp"]) for x in xs],
                "tg_all": [round(x["tg"], 1) for x in xs],
            }
        )

    def paired(a: str, b: str, k: str) -> float:
        """The median over rounds of a/b measured in the same round (a noisy neighbour slows both alike)."""
        return statistics.median(x[k] / y[k] for x, y in zip(samples[a], samples[b]))

    ratios = []
    for g in args.gguf:
        for rp in ("on", "off"):
            a, b = f"{g.name} repack={rp} ours", f"{g.name} repack={rp} llama-bench"
            ratios.append({"gguf": g.name, "repack": rp, "ours/llama-bench tg": paired(a, b, "tg"),
                           "ours/llama-bench pp": paired(a, b, "pp")})  # fmt: skip
        for who in ("ours", "llama-bench"):
            on, off = f"{g.name} repack=on {who}", f"{g.name} repack=off {who}"
            ratios.append({"gguf": g.name, "who": who, "repack on/off tg": paired(on, off, "tg"),
                           "repack on/off pp": paired(on, off, "pp")})  # fmt: skip
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "repack_default": why, "rows": rows,
           "ratios": ratios, "load_avg": load}  # fmt: skip
    for r in rows:
        print(
            f"{r['row']:<44} pp{args.prompt} {r['pp']:8.0f} t/s  tg{args.gen} {r['tg']:7.1f} t/s  (medians)"
        )
    print(json.dumps(ratios, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
