"""Large synthetic corpora for data-pipeline benchmarks: Zipf-distributed words over a big invented vocabulary
(English-like, space-delimited) or over kana/kanji "words" with no spaces (Japanese-like), cut into
paragraphs and documents. Fast (numpy), deterministic from the seed, written straight to disk.

    python -m benchmarks.synth_corpus --mb 250 --out /tmp/c250.txt [--lang ja] [--jsonl] [--zst]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + list("aeiou")
KANA = [chr(c) for c in range(0x3041, 0x3097)] + [chr(c) for c in range(0x30A1, 0x30FB)]
KANJI = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def vocabulary(lang: str, size: int, rng: np.random.Generator) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        if lang == "ja":
            n = int(rng.integers(1, 4))
            pool = KANJI if rng.random() < 0.6 else KANA
            words.add("".join(pool[int(i)] for i in rng.integers(0, len(pool), n)))
        else:
            n = int(rng.integers(1, 5))
            words.add("".join(SYLLABLES[int(i)] for i in rng.integers(0, len(SYLLABLES), n)))
    return sorted(words)


def documents(lang: str, total_bytes: int, seed: int = 0, vocab: int = 50_000):
    """Yield documents (a few paragraphs of sentences) until about total_bytes of UTF-8."""
    rng = np.random.default_rng(seed)
    words = np.array(vocabulary(lang, vocab, rng), dtype=object)
    ranks = np.arange(1, vocab + 1, dtype=np.float64)
    p = 1 / ranks**1.07
    p /= p.sum()
    sep, end = ("", "。") if lang == "ja" else (" ", ". ")
    made = 0
    while made < total_bytes:
        ids = rng.choice(vocab, size=4096, p=p)
        cuts = np.cumsum(rng.integers(6, 18, size=400))
        cuts = cuts[cuts < len(ids)]
        sentences = [sep.join(words[s]) for s in np.split(ids, cuts)]
        paras, i = [], 0
        while i < len(sentences):
            k = int(rng.integers(3, 8))
            paras.append(end.join(sentences[i : i + k]) + end.strip())
            i += k
        for j in range(0, len(paras), 4):
            doc = "\n\n".join(paras[j : j + 4])
            made += len(doc.encode("utf-8"))
            yield doc


def write(
    path: Path, mb: float, lang: str = "en", seed: int = 0, jsonl: bool = False, zst: bool = False
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = open(path, "wb")  # noqa: SIM115
    out = raw
    if zst:
        import zstandard

        out = zstandard.ZstdCompressor(level=3).stream_writer(raw)
    for doc in documents(lang, int(mb * 1e6), seed):
        line = json.dumps({"text": doc}, ensure_ascii=False) + "\n" if jsonl else doc + "\n\n"
        out.write(line.encode("utf-8"))
    out.close()
    if out is not raw:
        raw.close()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=100)
    ap.add_argument("--lang", choices=["en", "ja"], default="en")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jsonl", action="store_true")
    ap.add_argument("--zst", action="store_true")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    print(write(Path(a.out), a.mb, a.lang, a.seed, a.jsonl, a.zst))


if __name__ == "__main__":
    main()
