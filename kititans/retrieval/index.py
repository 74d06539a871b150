"""The saved index folder: what an app ships beside its encoder, read with numpy + bm25s (no torch), so the
ONNX, llama.cpp and CoreML runtimes search it as the torch one does.

    idx/manifest.json    format "kititans-index", version, the encoder's identity (tokenizer hash, vector size,
                         probe vectors), passage settings, analyzer, fusion, counts, every file's size
                         and sha256 (checked at load: a corrupted folder is one clear error)
    idx/docs.jsonl       {"source", "text"} per document
    idx/passages.jsonl   {"doc", "start", "end", "text"} per passage (token window of its document)
    idx/vectors.npy      (passages, dim) float32 unit vectors (float16 with dtype="float16")
    idx/lexical/         BM25 (bm25s: .npy arrays and JSON)

Every build and every --add writes a new folder and swaps it in (files.atomic_path): a crash leaves the old
index whole. --add embeds only the new documents and rebuilds BM25 over all passages (cheap).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kititans.errors import KititansError
from kititans.files import atomic_path
from kititans.retrieval.fusion import Fusion
from kititans.retrieval.lexical import LexicalIndex, detect_analyzer, terms
from kititans.retrieval.passages import split_ids

FORMAT, VERSION = "kititans-index", 1
MANIFEST = "manifest.json"
FILES = ("docs.jsonl", "passages.jsonl", "vectors.npy")
# texts embedded at build time and again at load: another encoder (or a broken export) gives other vectors
PROBES = (
    "how do I reset my password?",
    "The quick brown fox jumps over the lazy dog.",
    "今日は良い天気です。",
)
PROBE_MIN_COSINE = 0.9  # quantized exports of the same encoder stay above 0.99; another encoder does not


def codec_hash(codec: Any) -> str:
    """The tokenizer's identity: its pieces (the same across a run and its exports)."""
    h = hashlib.sha256()
    for i in range(codec.vocab_size):
        h.update(codec.id_to_piece(i).encode("utf-8", "surrogatepass") + b"\x00")
    return h.hexdigest()[:16]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Encoder:
    """What the index needs from a runtime: embed(rows) -> unit vectors, the codec, the context."""

    embed: Any
    codec: Any
    context: int
    name: str = ""


@dataclass
class Index:
    folder: Path
    manifest: dict[str, Any]
    docs: list[dict[str, Any]]
    passages: list[dict[str, Any]]
    vectors: np.ndarray  # (P, dim) float32
    lexical: LexicalIndex

    @property
    def owner(self) -> np.ndarray:
        return np.asarray([p["doc"] for p in self.passages])


def _write_folder(tmp: Path, manifest: dict[str, Any], docs: Sequence[dict], passages: Sequence[dict],
                  vectors: np.ndarray, lexical: LexicalIndex) -> None:  # fmt: skip
    tmp.mkdir()
    for name, rows in (("docs.jsonl", docs), ("passages.jsonl", passages)):
        with open(tmp / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(tmp / "vectors.npy", "wb") as f:
        np.save(f, vectors, allow_pickle=False)
    lexical.save(tmp / "lexical")
    files = [*FILES, *(f"lexical/{p.name}" for p in sorted((tmp / "lexical").iterdir()))]
    manifest["files"] = {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)} for n in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _passages_for(
    enc: Encoder, docs: Sequence[dict], first_doc: int, passage_tokens: int, stride: int
) -> tuple[list[dict], list[list[int]], dict]:
    ps = split_ids(
        [enc.codec.encode(d["text"]) for d in docs], enc.codec.bos_id, passage_tokens, stride, first_doc
    )
    rows = [{"doc": o, "start": s, "end": e, "text": enc.codec.decode(r[1:])}
            for o, (s, e), r in zip(ps.owner, ps.spans, ps.rows)]  # fmt: skip
    return rows, ps.rows, ps.summary()


def build_index(out: str | Path, enc: Encoder, docs: Sequence[dict], *, passage_tokens: int, stride: int,
                analyzer: str = "auto", fusion: Fusion | None = None, dtype: str = "float32",
                add_to: Index | None = None) -> dict[str, Any]:  # fmt: skip
    """Write (or, with add_to, rewrite with the new documents appended) the index folder; returns the manifest."""
    if not docs:
        raise KititansError("nothing to index: the corpus has no document with text")
    if dtype not in ("float32", "float16"):
        raise KititansError(f"--dtype must be float32 or float16, got {dtype!r}")
    t0 = time.perf_counter()
    old_docs = list(add_to.docs) if add_to else []
    old_passages = list(add_to.passages) if add_to else []
    if add_to:
        m0 = add_to.manifest
        passage_tokens, stride = m0["passages"]["tokens"], m0["passages"]["stride"]
        analyzer, dtype = m0["lexical"]["analyzer"], m0["vectors"]["dtype"]
        fusion = Fusion.from_json(m0["fusion"]) if fusion is None else fusion
    elif analyzer == "auto":
        analyzer = detect_analyzer(d["text"] for d in docs)
    new_passages, rows, summary = _passages_for(enc, docs, len(old_docs), passage_tokens, stride)
    t1 = time.perf_counter()
    new_vecs = np.asarray(enc.embed(rows), dtype=np.float32)
    embed_s = time.perf_counter() - t1
    vectors = np.concatenate([add_to.vectors, new_vecs]) if add_to else new_vecs
    all_passages = old_passages + new_passages
    lexical = LexicalIndex.build([terms(p["text"], analyzer, enc.codec) for p in all_passages], analyzer)
    manifest = {
        "format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "encoder": {"name": enc.name, "dim": int(vectors.shape[1]), "tokenizer": codec_hash(enc.codec),
                    "context": enc.context, "probes": list(PROBES),
                    "probe_vectors": np.asarray(enc.embed(_probe_rows(enc)), np.float32).round(5).tolist()},
        "passages": {"tokens": passage_tokens, "stride": stride},
        "lexical": {"library": "bm25s", "method": "lucene", "k1": 1.5, "b": 0.75, "analyzer": analyzer},
        "fusion": (fusion or Fusion()).to_json(),
        "vectors": {"dtype": dtype},
        "documents": len(old_docs) + len(docs), "passage_count": len(all_passages),
        "added": {"documents": len(docs), **summary, "embed_seconds": round(embed_s, 3),
                  "build_seconds": round(time.perf_counter() - t0, 3)},
    }  # fmt: skip
    with atomic_path(Path(out)) as tmp:
        _write_folder(tmp, manifest, old_docs + list(docs), all_passages, vectors.astype(dtype), lexical)
    return manifest


def _probe_rows(enc: Encoder) -> list[list[int]]:
    return [[enc.codec.bos_id, *enc.codec.encode(t)][: enc.context] for t in PROBES]


def load_index(folder: str | Path, verify: bool = True) -> Index:
    """Read an index folder, checking its format, version and (verify) every file's size and sha256."""
    folder = Path(folder)
    bad = f"{folder} is not a usable kititans index"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KititansError(
            f"{bad}: no {MANIFEST} (build one with `kititans index DOCS --model RUN --out {folder}`)"
        ) from None
    except (OSError, ValueError) as e:
        raise KititansError(f"{bad}: {MANIFEST} is unreadable ({type(e).__name__}); rebuild it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KititansError(f"{bad}: {MANIFEST} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise KititansError(
            f"{folder}: index version {manifest.get('version')}, this kititans reads {VERSION}: rebuild it"
        )
    for name, info in manifest.get("files", {}).items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != info["bytes"] or (verify and _sha256(p) != info["sha256"]):
            raise KititansError(f"{bad}: {name} is missing or corrupted (size or sha256 differs): rebuild it")
    try:
        docs = [json.loads(ln) for ln in (folder / "docs.jsonl").read_text(encoding="utf-8").splitlines()]
        passages = [
            json.loads(ln) for ln in (folder / "passages.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        vectors = np.load(folder / "vectors.npy", allow_pickle=False).astype(np.float32)
    except (OSError, ValueError) as e:
        raise KititansError(f"{bad}: {type(e).__name__} reading it; rebuild it") from None
    if len(vectors) != len(passages) or len(docs) != manifest["documents"]:
        raise KititansError(f"{bad}: {len(vectors)} vectors for {len(passages)} passages; rebuild it")
    lexical = LexicalIndex.load(folder / "lexical", manifest["lexical"]["analyzer"])
    if lexical.size != len(passages):
        raise KititansError(
            f"{bad}: the lexical index has {lexical.size} passages, not {len(passages)}; rebuild it"
        )
    return Index(folder, manifest, docs, passages, vectors, lexical)


def check_encoder(index: Index, enc: Encoder) -> None:
    """One line when the searching encoder is not the one the index was built with."""
    m = index.manifest["encoder"]
    if codec_hash(enc.codec) != m["tokenizer"]:
        raise KititansError(f"{index.folder} was built with another tokenizer than {enc.name or 'this encoder'}'s: "
                            "search it with the encoder that built it, or rebuild the index")  # fmt: skip
    probes = np.asarray(enc.embed(_probe_rows(enc)), np.float32)
    ref = np.asarray(m["probe_vectors"], np.float32)
    if probes.shape != ref.shape or float((probes * ref).sum(1).min()) < PROBE_MIN_COSINE:
        raise KititansError(f"{index.folder} was built with another encoder ({m.get('name') or 'unknown'}, "
                            f"{m['dim']}-d) than {enc.name or 'this one'}: search it with that encoder, or rebuild the index")  # fmt: skip
