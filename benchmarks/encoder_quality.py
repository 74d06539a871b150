"""Sentence-encoder quality (issue 11): retrieval@1, MRR, recall@5 and mean margin of `encoder-tiny` on held-out
pairs, against a bag-of-words TF-IDF baseline on the same split, in the same run.

Two tasks:
  spans  unsupervised: the built-in corpus, two disjoint spans of each document are a pair (no labels)
  qa     the built-in chat data: a user question -> its answer (written as JSONL messages, the way users
         pass chat files)
The TF-IDF baseline (scikit-learn, word unigrams + bigrams, fitted on the train split's texts) ranks the
same candidates for the same queries; both use the metric code of training (train/contrastive.py).

    python -m benchmarks.encoder_quality --out bench_out/encoder --steps 250
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.common import write_json
from kititans.data.pairs import PairStore
from kititans.data.tokenizer import Tokenizer
from kititans.train.contrastive import THRESHOLDS, retrieval_metrics


def texts(store: PairStore, tok: Tokenizer, column: str) -> list[str]:
    return [tok.decode(store.get(column, i)[1:]) for i in range(len(store))]  # [1:]: BOS


def tfidf(run: Path) -> dict[str, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    tok = Tokenizer.load(run)
    train, val = PairStore(run / "pairs", "train"), PairStore(run / "pairs", "val")
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    vec.fit(texts(train, tok, "query") + texts(train, tok, "positive"))
    q = vec.transform(texts(val, tok, "query"))
    c = vec.transform(
        texts(val, tok, "positive") + (texts(val, tok, "negative") if "negative" in val.columns else [])
    )
    to_t = lambda m: torch.tensor(m.toarray(), dtype=torch.float32)  # noqa: E731 (rows are L2-normalised)
    return retrieval_metrics(to_t(q), to_t(c), 0.05)


def kititans(*args: object) -> None:
    r = subprocess.run([sys.executable, "-m", "kititans", *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])


def qa_file(path: Path, n: int) -> Path:
    from kititans.data.chatdata import builtin_conversations

    with open(path, "w", encoding="utf-8") as f:
        for c in builtin_conversations(seed=1, n=n):
            f.write(json.dumps({"messages": c.messages}) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_out/encoder")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--qa-conversations", type=int, default=4000)
    ap.add_argument("--tasks", default="spans,qa")
    ap.add_argument(
        "--tokenizer",
        help="a run whose tokenizer the qa task reuses (default: the spans run; the chat data alone is too "
        "small a vocabulary for 4096 pieces)",
    )
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"thresholds": THRESHOLDS, "steps": a.steps, "tasks": {}}
    for task in a.tasks.split(","):
        run = out / f"encoder-tiny-{task}"
        if not (run / "eval_report.json").is_file():
            subprocess.run(["rm", "-rf", str(run)])
            data = [] if task == "spans" else ["--data", qa_file(out / "qa.jsonl", a.qa_conversations)]
            if task == "qa":
                data += ["--tokenizer", a.tokenizer or out / "encoder-tiny-spans"]
            kititans("train", "--preset", "encoder-tiny", "--steps", a.steps, *data, "--out", run, "-q")
        ours = json.loads((run / "eval_report.json").read_text())["metrics"]
        base = tfidf(run)
        results["tasks"][task] = {"encoder-tiny": ours, "tfidf": base}
        row = {
            k: (round(ours[k], 4), round(base[k], 4))
            for k in ("retrieval_at1", "mrr", "recall_at5", "mean_margin")
        }
        print(
            task,
            json.dumps(row),
            f"({ours['pairs']} held-out queries, {ours['candidates']} candidates)",
            flush=True,
        )
    write_json(out / "encoder_quality.json", results)
    print("| task | model | retrieval@1 | MRR | recall@5 | mean margin |")
    print("|---|---|--:|--:|--:|--:|")
    for task, r in results["tasks"].items():
        for name, m in r.items():
            print(f"| {task} | {name} | {m['retrieval_at1']:.3f} | {m['mrr']:.3f} | {m['recall_at5']:.3f} | "
                  f"{m['mean_margin']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
