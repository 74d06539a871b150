"""Index build time and size, and query latency (dense, lexical, hybrid), per runtime and quantization, for one
set of passages (the JSQuAD paragraphs cut into short overlapping passages: about 10k of them).

Every artifact indexes the same documents in one process; query latencies are medians over the same queries,
the artifacts' queries interleaved round-robin, and reported beside their ratio to torch fp32 from the same run.

    python -m benchmarks.retrieval_speed --run runs/ret --pairs sets/jsquad.jsonl --out bench_out/retrieval.json \
        --artifacts torch runs/ret/export/onnx/fp32 runs/ret/export/onnx/int8 runs/ret/export/model.q8_0.gguf
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine
from kititans.retrieval.index import build_index, load_index
from kititans.retrieval.search import Searcher
from kititans.retrieval.settings import encoder_of
from kititans.runtimes import load_runtime


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the encoder run (torch fp32 is its run dir)")
    ap.add_argument("--artifacts", nargs="+", default=["torch"], help="'torch' or export paths")
    ap.add_argument("--pairs", required=True, help="pairs JSONL whose positives are the documents")
    ap.add_argument("--passage-tokens", type=int, default=32)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--queries", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rows = [json.loads(ln) for ln in Path(a.pairs).read_text(encoding="utf-8").splitlines()]
    docs = [{"source": f"doc{i}", "text": d} for i, d in enumerate(sorted({r["positive"] for r in rows}))]
    queries = [r["query"] for r in rows[: a.queries]]
    tmp = Path(tempfile.mkdtemp(prefix="retrieval-speed-"))
    results, searchers = {}, {}
    try:
        for art in a.artifacts:
            path = a.run if art == "torch" else art
            rt = load_runtime(path, threads=a.threads)
            enc = encoder_of(rt, art)
            t0 = time.perf_counter()
            m = build_index(tmp / Path(art).name, enc, docs, passage_tokens=a.passage_tokens, stride=a.stride)
            build = time.perf_counter() - t0
            idx = load_index(tmp / Path(art).name)
            searchers[art] = Searcher(idx, enc)
            results[art] = {"passages": m["passage_count"], "documents": m["documents"], "build_s": round(build, 2),
                            "embed_s": m["added"]["embed_seconds"], "index_mib": round(folder_bytes(tmp / Path(art).name) / 2**20, 2),
                            "vectors_mib": round((tmp / Path(art).name / "vectors.npy").stat().st_size / 2**20, 2)}  # fmt: skip
            print(art, results[art], flush=True)
        lat: dict[str, dict[str, list[float]]] = {
            art: {m: [] for m in ("dense", "lexical", "hybrid")} for art in searchers
        }
        for q in queries:  # round-robin: a noisy neighbour slows every artifact alike
            for art, s in searchers.items():
                for mode in ("dense", "lexical", "hybrid"):
                    t0 = time.perf_counter()
                    s.search(q, mode, 10)
                    lat[art][mode].append((time.perf_counter() - t0) * 1e3)
        ref = {m: statistics.median(v) for m, v in lat[a.artifacts[0]].items()}
        for art in searchers:
            for mode, v in lat[art].items():
                med = statistics.median(v)
                results[art][f"{mode}_ms"] = round(med, 2)
                results[art][f"{mode}_ratio_to_{a.artifacts[0]}"] = round(med / ref[mode], 3)
            print(art, {k: v for k, v in results[art].items() if k.endswith("_ms")}, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(a.out).write_text(
        json.dumps({"machine": machine(), "settings": vars(a), "results": results}, indent=2)
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
