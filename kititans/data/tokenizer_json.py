"""tokenizer.json (the Hugging Face `tokenizers` format) of a KiTitans SentencePiece BPE model, built with the
`tokenizers` library itself, for the tools that read only that file: transformers' fast tokenizers,
onnxruntime-genai (ort-extensions), swift-transformers on iOS, optimum.

SentencePiece BPE merges the adjacent pair whose merged piece scores highest; a `tokenizers` BPE model merges
the pair with the lowest rank. Ranking every split (a, b) of a normal piece by the piece's score makes the two
agree (the test checks built-in, English and Japanese text id for id). The rest mirrors the SentencePiece
settings of tokenizer.py: spaces become "▁" (no dummy prefix, no whitespace collapsing), characters outside
the vocabulary fall back to <0xXX> byte pieces, and control, unknown and chat tokens are added tokens
matched in text before BPE (as llama.cpp does when it tokenizes a rendered chat template).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from kititans.data.pieces import BYTE, CONTROL, NORMAL, UNKNOWN
from kititans.errors import KititansError
from kititans.files import atomic_path

SPACE = "▁"
TOKENIZER_JSON = "tokenizer.json"


class PieceModel(Protocol):
    """What tokenizer.json is built from: data/tokenizer.py's Tokenizer."""

    model_path: Path
    config: dict[str, Any]
    chat_tokens: list[str]
    bos_id: int
    unk_id: int

    def pieces(self) -> list[tuple[str, float, int]]: ...


def sentencepiece_merges(pieces: list[tuple[str, float, int]], normal: int = 1) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal piece into two normal pieces, in the order SentencePiece would
    merge them: higher piece score first, then by the ids of the parts (ties only among splits of one piece)."""
    ids = {p: i for i, (p, _, t) in enumerate(pieces) if t == normal}
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, i in ids.items():
        score = pieces[i][1]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-score, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def build(tok: PieceModel) -> Any:
    """A `tokenizers.Tokenizer` that encodes and decodes like `tok` (ids, added tokens, BOS on request)."""
    try:
        from tokenizers import AddedToken, decoders, models, normalizers, processors
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError as e:
        raise KititansError(
            f"writing tokenizer.json needs the 'tokenizers' package ({e}): pip install tokenizers"
        ) from None
    pieces = tok.pieces()
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    unk = pieces[tok.unk_id][0] if tok.unk_id >= 0 else None
    model = models.BPE(
        vocab=vocab,
        merges=sentencepiece_merges(pieces, NORMAL),
        unk_token=unk,
        fuse_unk=True,
        byte_fallback=True,
    )
    hf = HFTokenizer(model)
    hf.normalizer = normalizers.Replace(" ", SPACE)
    hf.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    added = [p for p, _, t in pieces if t in (CONTROL, UNKNOWN)]
    added += [p for p in tok.chat_tokens if p in vocab and p not in added]
    hf.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in added])
    if tok.config.get("add_bos_token", True) and tok.bos_id >= 0:
        bos = pieces[tok.bos_id][0]
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)]
        )
    n_bytes = sum(1 for _, _, t in pieces if t == BYTE)
    if n_bytes != 256:
        raise KititansError(
            f"{tok.model_path}: tokenizer.json needs all 256 byte-fallback pieces, this model has {n_bytes}"
        )
    return hf


def write_tokenizer_json(tok: PieceModel, path: str | Path) -> Path:
    """Write tokenizer.json atomically; one clear error if it cannot be written."""
    path = Path(path)
    hf = build(tok)
    try:
        with atomic_path(path) as tmp:
            hf.save(str(tmp))
    except OSError as e:
        raise KititansError(f"cannot write {path}: {e}") from None
    return path
