"""Write the retrieval development sets as pairs JSONL ({"query", "positive"}), from ../shared/data:

  jsquad.jsonl   JGLUE JSQuAD test: each question -> its paragraph (1,159 paragraphs, 4,420 questions)
  alpaca.jsonl   alpaca_en_demo: each instruction (+ input) -> its output

Both are split by positive document at training and evaluation time (kititans.data.pairs.DocumentSplit), so
no held-out paragraph or output is ever a training positive.

    python benchmarks/retrieval_sets.py --out sets/    # then: kititans train-retriever --pairs sets/jsquad.jsonl
    python benchmarks/retrieval_sets.py --out sets/ --baseline   # + BM25 per analyzer on the held-out split
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent.parent / "shared" / "data"


def jsquad(path: Path) -> list[dict[str, str]]:
    out = []
    for art in json.loads(path.read_text(encoding="utf-8"))["data"]:
        for para in art["paragraphs"]:
            out += [{"query": qa["question"], "positive": para["context"]} for qa in para["qas"]]
    return out


def alpaca(path: Path) -> list[dict[str, str]]:
    out = []
    for rec in json.loads(path.read_text(encoding="utf-8")):
        q = (rec["instruction"] + ("\n" + rec["input"] if rec.get("input") else "")).strip()
        if q and rec.get("output", "").strip():
            out.append({"query": q, "positive": rec["output"].strip()})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="the shared data folder (default ../shared/data)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--baseline", action="store_true", help="BM25 (3 analyzers) on the document-grouped split")
    p.add_argument("--val-fraction", type=float, default=0.3)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for name, rows in [("jsquad", jsquad(a.data / "japanese" / "jsquad_test.json")),
                       ("alpaca", alpaca(a.data / "instruct" / "alpaca_en_demo.json"))]:  # fmt: skip
        with open(a.out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        docs = len({r["positive"] for r in rows})
        print(f"{a.out / name}.jsonl: {len(rows)} pairs over {docs} documents")
        if a.baseline:
            baseline(rows, a.out / f"tokenizer-{name}", a.val_fraction)


def baseline(rows: list[dict[str, str]], tok_dir: Path, val_fraction: float) -> None:
    """BM25 with each analyzer on the held-out documents (a 4096-piece tokenizer trained on the set cuts the
    passages, as train-retriever's would)."""
    from kititans.data.tokenizer import train_tokenizer
    from kititans.retrieval.evaluate import EvalSettings, evaluate, heldout_set, lines

    tok = train_tokenizer(sorted({t for r in rows for t in (r["query"], r["positive"])}), tok_dir, 4096)
    ev = heldout_set([(r["query"], r["positive"]) for r in rows], 0, val_fraction)
    for i, analyzer in enumerate(("chars", "pieces", "words")):
        rep = evaluate(ev, None, tok, EvalSettings(127, 95, analyzer), 256)
        print("\n".join(lines(rep)[0 if i == 0 else 1 :]))


if __name__ == "__main__":
    main()
