"""`kititans data` at scale: peak memory and throughput on generated corpora of growing size (issue 15).

For each size it generates a synthetic English-like corpus (benchmarks/synth_corpus.py), runs the same
`kititans data` command, samples the resident memory of the whole process tree every 0.1 s, and reads the
per-stage MB/s from the manifest. In the same run it measures the limit: raw SentencePiece batch encoding of
the same text with the same number of threads (encode time only), and `--workers 1` against `--workers 2`
(re-using the first run's tokenizer, interleaved). `--old REV` also runs the same command with the code of a
git revision (the pre-streaming pipeline) on the smallest corpus.

    python -m benchmarks.data_scale --sizes 250,1000 --vocab 32000 --out bench_out/data_scale
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd; peak RSS (MB) of the main process and of the process tree, and wall seconds."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    peak = {"main": 0.0, "tree": 0.0}
    proc = psutil.Process(p.pid)

    def sample() -> None:
        while p.poll() is None:
            try:
                procs = [proc, *proc.children(recursive=True)]
                rss = [q.memory_info().rss / 2**20 for q in procs if q.is_running()]
                peak["main"] = max(peak["main"], rss[0])
                peak["tree"] = max(peak["tree"], sum(rss))
            except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
                pass
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = p.communicate()
    th.join()
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err.decode()[-2000:]}")
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_main_mb": round(peak["main"]),
        "peak_tree_mb": round(peak["tree"]),
        "stdout": out.decode(),
    }


# runs kititans from another checkout: the editable install's import hook must not win over it
OTHER_CHECKOUT = (
    "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
    "sys.path.insert(0, sys.argv.pop(1)); from kititans.cli import main; sys.exit(main(sys.argv[1:]))"
)


def kititans_data(args: list[str], py_path: str | None = None) -> dict:
    if py_path:
        return run_measured([sys.executable, "-c", OTHER_CHECKOUT, py_path, "data", *args, "-q"])
    return run_measured([sys.executable, "-m", "kititans", "data", *args, "-q"])


def raw_spm_mb_per_s(corpus: Path, model: Path, threads: int) -> float:
    """SentencePiece batch encoding of the corpus's documents, 1 MB batches, encode time only."""
    import sentencepiece as spm

    from kititans.data.readers import Corpus

    sp = spm.SentencePieceProcessor(model_file=str(model))
    batch, size, total, secs = [], 0, 0, 0.0
    for doc in Corpus([str(corpus)]):
        batch.append(doc)
        size += len(doc.encode("utf-8"))
        if size >= 1 << 20:
            t = time.perf_counter()
            sp.EncodeAsIds(batch, num_threads=threads)
            secs += time.perf_counter() - t
            total, batch, size = total + size, [], 0
    if batch:
        t = time.perf_counter()
        sp.EncodeAsIds(batch, num_threads=threads)
        secs += time.perf_counter() - t
        total += size
    return total / 1e6 / secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="250,1000", help="corpus sizes in MB")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workers", type=int, default=0, help="workers of the main runs (default: all cores)")
    ap.add_argument(
        "--old", help="also run this git revision's pipeline on the smallest corpus (e.g. HEAD~3)"
    )
    ap.add_argument("--out", default="bench_out/data_scale")
    ap.add_argument("--only-old", action="store_true", help="re-measure only the --old revision")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from benchmarks.synth_corpus import write as write_corpus
    from kititans.data.encode import default_workers

    workers = a.workers or default_workers()
    rows, results = [], {"workers": workers, "vocab": a.vocab, "cpu_count": os.cpu_count()}
    sizes = [float(s) for s in a.sizes.split(",")]
    if a.only_old:  # keep the other measurements of an earlier run
        results = json.loads((out / "data_scale.json").read_text())
    for mb in [] if a.only_old else sizes:
        corpus = out / f"corpus-{mb:g}mb.txt"
        if not corpus.is_file():
            print(f"generating {corpus} ...", flush=True)
            write_corpus(corpus, mb, seed=int(mb))
        ds = out / f"ds-{mb:g}"
        subprocess.run(["rm", "-rf", str(ds)], check=True)
        r = kititans_data(
            [str(corpus), "--vocab-size", str(a.vocab), "--workers", str(workers), "--out", str(ds)]
        )
        m = json.loads((ds / "manifest.json").read_text())
        stages = m["segments"][-1]["stages"]
        raw = raw_spm_mb_per_s(corpus, ds / "tokenizer.model", workers)
        row = {
            "mb": mb,
            **{k: v for k, v in r.items() if k != "stdout"},
            "stages": stages,
            "raw_spm_mb_per_s": round(raw, 2),
            "encode_ratio": round(stages["encode"]["mb_per_s"] / raw, 3),
            "train_tokens": m["train_tokens"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    results["runs"] = results.get("runs", []) if a.only_old else rows
    # workers 1 vs 2 on the smallest corpus, with its tokenizer (pass 2 only), interleaved twice
    mb = sizes[0]
    corpus, tok = out / f"corpus-{mb:g}mb.txt", out / f"ds-{mb:g}"
    scaling: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(0 if a.only_old else 2):
        for w in (1, 2):
            ds = out / f"ds-w{w}"
            subprocess.run(["rm", "-rf", str(ds)], check=True)
            kititans_data([str(corpus), "--tokenizer", str(tok), "--workers", str(w), "--out", str(ds)])
            m = json.loads((ds / "manifest.json").read_text())
            scaling[w].append(m["segments"][-1]["stages"]["encode"]["mb_per_s"])
    if not a.only_old:
        results["workers_scaling"] = {str(k): v for k, v in scaling.items()}
        print(json.dumps(results["workers_scaling"]), flush=True)
    if a.old:
        wt = Path("/tmp/kititans-old")
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)], capture_output=True
        )
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(wt), a.old],
            check=True,
            capture_output=True,
        )
        ds = out / "ds-old"
        subprocess.run(["rm", "-rf", str(ds)], check=True)
        r = kititans_data(
            [str(out / f"corpus-{mb:g}mb.txt"), "--vocab-size", str(a.vocab), "--out", str(ds)],
            py_path=str(wt),
        )
        results["old"] = {"revision": a.old, "mb": mb, **{k: v for k, v in r.items() if k != "stdout"}}
        print(json.dumps(results["old"]), flush=True)
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(wt)], capture_output=True
        )
    (out / "data_scale.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'data_scale.json'}")


if __name__ == "__main__":
    main()
