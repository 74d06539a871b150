"""SentencePiece BPE tokenizer set up so llama.cpp tokenizes identically (research/gguf_llamacpp.md §4):
byte_fallback, identity normalization, no dummy prefix, no whitespace collapsing, chat tokens as
user-defined pieces. Files: tokenizer.model + tokenizer_config.json (special tokens, chat template).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm

from kititans.errors import KititansError
from kititans.files import atomic_path, read_json, write_json

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
END_TOKEN = "<|end|>"
MAX_PIECE_CHARS = 10  # llama-cpp-python's detokenize drops pieces longer than 32 UTF-8 bytes

# The chat template (Jinja, the HF/llama.cpp convention). It emits BOS itself because llama.cpp renders
# templates without adding BOS, and ends every turn with <|end|>. Content follows the role tag directly, so
# token boundaries fall on special tokens and the loss mask is exact.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# sentencepiece piece types == GGUF token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class TokenizerReport:
    vocab_size: int
    documents: int
    words: int
    tokens: int
    tokens_per_word: float
    byte_fallback_rate: float
    roundtrip_failures: int

    def lines(self) -> list[str]:
        return [
            f"vocab size          {self.vocab_size}",
            f"documents           {self.documents}",
            f"tokens per word     {self.tokens_per_word:.3f}  ({self.tokens} tokens / {self.words} words)",
            f"byte-fallback rate  {self.byte_fallback_rate:.4%}",
            f"exact round-trip    {self.documents - self.roundtrip_failures}/{self.documents} documents",
        ]


class Tokenizer:
    """A SentencePiece model plus its tokenizer_config.json."""

    def __init__(self, model_path: str | Path, config: dict[str, Any] | None = None):
        self.model_path = Path(model_path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromFile(str(self.model_path))
        except (OSError, RuntimeError) as e:
            raise KititansError(f"{self.model_path}: not a SentencePiece model ({e})") from None
        self.config = config or default_config(self.sp)
        self.chat_template: str = self.config.get("chat_template", CHAT_TEMPLATE)
        self.user_defined: list[str] = list(self.config.get("user_defined_symbols", CHAT_TOKENS))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.unk_id, self.pad_id = self.sp.unk_id(), self.sp.pad_id()
        self.end_id = self.sp.PieceToId(END_TOKEN) if END_TOKEN in self.user_defined else -1
        # strings parsed as special tokens in templates (llama.cpp tokenizes templates with special=True)
        self._specials = {
            p: self.sp.PieceToId(p) for p in [BOS, EOS, UNK, PAD, *self.user_defined] if self._has(p)
        }
        self._special_re = re.compile(
            "|".join(re.escape(s) for s in sorted(self._specials, key=len, reverse=True))
        )

    def _has(self, piece: str) -> bool:
        i = self.sp.PieceToId(piece)
        return i != self.unk_id or piece == UNK

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a run directory or a tokenizer directory (tokenizer.model + tokenizer_config.json)."""
        path = Path(path)
        model = path / "tokenizer.model" if path.is_dir() else path
        if not model.is_file():
            raise KititansError(f"no tokenizer.model in {path} (train one with `kititans tokenizer`)")
        cfg_path = model.with_name("tokenizer_config.json")
        config = read_json(cfg_path, "tokenizer config") if cfg_path.is_file() else None
        return cls(model, config)

    def save(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        data = self.model_path.read_bytes()
        if (out_dir / "tokenizer.model").resolve() != self.model_path.resolve():
            with atomic_path(out_dir / "tokenizer.model") as tmp:
                tmp.write_bytes(data)
        write_json(out_dir / "tokenizer_config.json", self.config)

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def stop_ids(self) -> list[int]:
        return [i for i in (self.eos_id, self.end_id) if i >= 0]

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, no BOS; chat tokens (user-defined) are matched, <s>/</s> are not."""
        return self.sp.EncodeAsIds(text)

    def encode_special(self, text: str) -> list[int]:
        """Like llama.cpp tokenize(special=True): <s>, </s>, <unk>, <pad> and chat tokens in the text become
        their ids."""
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                ids += self.sp.EncodeAsIds(text[pos : m.start()])
            ids.append(self._specials[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self.sp.EncodeAsIds(text[pos:])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """ids -> text; control tokens (<s>, </s>, <pad>) vanish, chat tokens print as text."""
        return self.sp.DecodeIds([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))

    def piece_type(self, i: int) -> int:
        if self.sp.IsUnknown(i):
            return UNKNOWN
        if self.sp.IsControl(i):
            return CONTROL
        if self.sp.IsByte(i):
            return BYTE
        if self.sp.IsUnused(i):
            return UNUSED
        return USER_DEFINED if self.sp.IdToPiece(i) in self.user_defined else NORMAL

    def pieces(self) -> list[tuple[str, float, int]]:
        """(piece, score, type) for every id: what the GGUF vocabulary needs."""
        return [
            (self.sp.IdToPiece(i), self.sp.GetScore(i), self.piece_type(i)) for i in range(self.vocab_size)
        ]

    def is_byte(self, i: int) -> bool:
        return self.sp.IsByte(i)


def default_config(sp: spm.SentencePieceProcessor, context_length: int | None = None) -> dict[str, Any]:
    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD if sp.pad_id() >= 0 else None,
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "chat_template": CHAT_TEMPLATE,
        "user_defined_symbols": list(CHAT_TOKENS),
        "end_of_turn_token": END_TOKEN,
        "vocab_size": sp.GetPieceSize(),
        "model_max_length": context_length or 1_000_000,
    }


def _sentences(texts: Iterable[str], max_sentences: int) -> list[str]:
    """Lines of the corpus (SentencePiece skips over-long "sentences"; newlines become byte tokens)."""
    lines = [ln for t in texts for ln in t.split("\n") if ln.strip()]
    if len(lines) > max_sentences:  # deterministic subsample
        step = len(lines) / max_sentences
        lines = [lines[int(i * step)] for i in range(max_sentences)]
    return lines


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int, max_sentences: int = 1_000_000
) -> Tokenizer:
    """Train a SentencePiece BPE model on `texts` and write tokenizer.model + tokenizer_config.json."""
    lines = _sentences(texts, max_sentences)
    if not lines:
        raise KititansError("cannot train a tokenizer on an empty corpus")
    minimum = 256 + 4 + len(CHAT_TOKENS) + 1
    if vocab_size < minimum:
        raise KititansError(f"vocab size {vocab_size} is too small: it needs >= {minimum} (bytes + specials)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(lines),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentencepiece_length=MAX_PIECE_CHARS,
            max_sentence_length=1 << 16,
            user_defined_symbols=list(CHAT_TOKENS),
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            unk_piece=UNK,
            bos_piece=BOS,
            eos_piece=EOS,
            pad_piece=PAD,
            character_coverage=0.9995,
            input_sentence_size=0,
            num_threads=max(1, os.cpu_count() or 1),
            minloglevel=2,
        )
    except RuntimeError as e:
        m = re.search(r"Vocabulary size (?:is )?too high \((\d+)\).*<= (\d+)", str(e))
        if m:
            raise KititansError(
                f"vocab size {m.group(1)} is too large for this corpus (it supports at most {m.group(2)}): "
                f"use --vocab-size {m.group(2)} or less, or give more text"
            ) from None
        raise KititansError(f"SentencePiece training failed: {e}") from None
    with atomic_path(out_dir / "tokenizer.model") as tmp:
        tmp.write_bytes(buf.getvalue())
    tok = Tokenizer(out_dir / "tokenizer.model")
    write_json(out_dir / "tokenizer_config.json", tok.config)
    return tok


def evaluate_tokenizer(tok: Tokenizer, texts: Iterable[str]) -> TokenizerReport:
    docs = words = tokens = byte_tokens = failures = 0
    for text in texts:
        ids = tok.encode(text)
        docs += 1
        words += len(text.split())
        tokens += len(ids)
        byte_tokens += sum(1 for i in ids if tok.is_byte(i))
        failures += tok.decode(ids) != text
    return TokenizerReport(
        vocab_size=tok.vocab_size,
        documents=docs,
        words=words,
        tokens=tokens,
        tokens_per_word=tokens / max(words, 1),
        byte_fallback_rate=byte_tokens / max(tokens, 1),
        roundtrip_failures=failures,
    )
