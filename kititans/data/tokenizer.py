"""SentencePiece BPE tokenizer set up so llama.cpp tokenizes identically (research/gguf_llamacpp.md §4):
byte_fallback, identity normalization, no dummy prefix, no whitespace collapsing. Chat tokens are trained as
user-defined pieces (atomic: no merges are learned across them) and then stored as CONTROL pieces, so text
never turns into a role token: only the chat template produces them (`encode_special`, as llama.cpp's
special=True), while `encode` of a user's text keeps "<|user|>" as plain characters. Runs made before keep
their user-defined chat pieces and their template. Files: tokenizer.model, tokenizer_config.json (special
tokens, chat template, model_max_length) and tokenizer.json (the same tokenizer for Hugging Face tools).
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

from kititans.data.pieces import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED
from kititans.data.tokenizer_json import TOKENIZER_JSON, write_tokenizer_json
from kititans.errors import KititansError
from kititans.files import atomic_path, read_json, write_json

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
END_TOKEN = "<|end|>"
MAX_PIECE_CHARS = 10  # llama-cpp-python's detokenize drops pieces longer than 32 UTF-8 bytes
# characters a tokenizer must cover (rarer ones fall back to bytes): SentencePiece's value for CJK text, which
# also keeps every letter of English or European text
CHARACTER_COVERAGE = 0.9995

# The chat template (Jinja, the HF/llama.cpp convention): Phi-3's exact prompt format,
# "<|user|>\n{content}<|end|>\n" per turn and "<|assistant|>\n" to generate, which llama.cpp without --jinja
# recognises by pattern (a template with <|assistant|> and <|end|> is Phi-3) and Ollama knows as phi3. It emits
# BOS itself because llama-cpp-python renders templates without adding BOS (llama.cpp with --jinja strips a
# leading BOS and adds its own). Unlike Phi-3's HF template it adds no EOS after the last turn, so the render
# of a conversation is a prefix of the render of a longer one (the SFT loss mask relies on it).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# The template of runs made before: no newline after the role tag. Their tokenizer_config.json keeps it.
LEGACY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass
class TokenizerReport:
    vocab_size: int
    documents: int
    words: int
    tokens: int
    tokens_per_word: float | None  # only for space-delimited text (None for Japanese, Chinese, ...)
    byte_fallback_rate: float
    roundtrip_failures: int
    characters: int = 0
    chars_per_token: float = 0.0
    sample: dict[str, Any] | None = None  # what the tokenizer was trained on (see data/prepare.py)

    def lines(self) -> list[str]:
        out = [f"vocab size          {self.vocab_size}"]
        if self.sample:
            s = self.sample
            out.append(
                f"trained on          {s['documents']:,} documents, {s['bytes'] / 1e6:.1f} MB sampled from "
                f"{s['read_bytes'] / 1e6:.1f} MB (budget {s['budget_bytes'] / 1e6:.0f} MB, "
                f"character coverage {s['character_coverage']})"
            )
        out += [
            f"evaluated on        {self.documents} held-out documents",
            f"characters/token    {self.chars_per_token:.3f}  ({self.characters} characters / {self.tokens} tokens)",
        ]
        if self.tokens_per_word is not None:
            out.append(
                f"tokens per word     {self.tokens_per_word:.3f}  ({self.tokens} tokens / {self.words} words)"
            )
        else:
            out.append("tokens per word     n/a (the text is not space-delimited)")
        out += [
            f"byte-fallback rate  {self.byte_fallback_rate:.4%}",
            f"exact round-trip    {self.documents - self.roundtrip_failures}/{self.documents} documents",
        ]
        return out


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
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.unk_id, self.pad_id = self.sp.unk_id(), self.sp.pad_id()
        # the chat tokens: "chat_tokens" in new configs, "user_defined_symbols" in runs made before
        listed = self.config.get("chat_tokens", self.config.get("user_defined_symbols", CHAT_TOKENS))
        self.chat_tokens: list[str] = [p for p in listed if self._has(p)]
        # chat tokens SentencePiece matches in any text (user-defined pieces: only in runs made before)
        self.user_defined = [p for p in self.chat_tokens if not self.sp.IsControl(self.sp.PieceToId(p))]
        self.end_id = self.sp.PieceToId(END_TOKEN) if END_TOKEN in self.chat_tokens else -1
        # strings parsed as special tokens in templates (llama.cpp tokenizes templates with special=True)
        self.special_tokens = {
            p: self.sp.PieceToId(p) for p in [BOS, EOS, UNK, PAD, *self.chat_tokens] if self._has(p)
        }
        self._special_re = _alternation(self.special_tokens)
        self._chat_ids = {self.sp.PieceToId(p): p for p in self.chat_tokens}
        self._document_proto: bytes | None = None
        self._document_sp: Any = None

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

    def save(self, out_dir: str | Path, context_length: int | None = None) -> None:
        """tokenizer.model, tokenizer_config.json (model_max_length = `context_length` when given: the
        model's context) and tokenizer.json (written with the `tokenizers` library) into out_dir."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if (out_dir / "tokenizer.model").resolve() != self.model_path.resolve():
            data = self.model_path.read_bytes()
            with atomic_path(out_dir / "tokenizer.model") as tmp:
                tmp.write_bytes(data)
        if context_length:
            self.config = {**self.config, "model_max_length": int(context_length)}
        write_tokenizer_json(self, out_dir / TOKENIZER_JSON)
        write_json(out_dir / "tokenizer_config.json", self.config)

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def stop_ids(self) -> list[int]:
        return [i for i in (self.eos_id, self.end_id) if i >= 0]

    def encode(self, text: str) -> list[int]:
        """A user's text -> ids, no BOS, like llama.cpp tokenize(special=False): "<s>" and the chat tokens
        stay characters (only a user-defined chat piece of a run made before is matched)."""
        return self.sp.EncodeAsIds(text)

    def encode_special(self, text: str) -> list[int]:
        """Like llama.cpp tokenize(special=True), for text a template produced: <s>, </s>, <unk>, <pad> and
        the chat tokens in it become their ids."""
        return self._split_encode(text, self._special_re, self.special_tokens)

    def document_model_proto(self) -> bytes:
        """This SentencePiece model with the chat tokens as USER_DEFINED pieces: encoding training documents
        with it (in any process) turns the chat tokens of a chat record rendered as text into their ids, like
        `encode_documents`; "<s>"/"</s>" stay text."""
        if self._document_proto is None:
            proto = self.sp.serialized_model_proto()
            self._document_proto = (
                retype_pieces(proto, self.chat_tokens, USER_DEFINED) if self.chat_tokens else proto
            )
        return self._document_proto

    def encode_documents(self, texts: Sequence[str]) -> list[list[int]]:
        """Training documents -> ids (no BOS/EOS), with the chat tokens of rendered chat records as ids."""
        if self._document_sp is None:
            self._document_sp = spm.SentencePieceProcessor(model_proto=self.document_model_proto())
        return self._document_sp.EncodeAsIds(list(texts))

    def _split_encode(self, text: str, pattern: re.Pattern[str] | None, table: dict[str, int]) -> list[int]:
        if pattern is None:
            return self.sp.EncodeAsIds(text)
        ids: list[int] = []
        pos = 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                ids += self.sp.EncodeAsIds(text[pos : m.start()])
            ids.append(table[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self.sp.EncodeAsIds(text[pos:])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """ids -> text; control tokens (<s>, </s>, <pad>) vanish, chat tokens print as text."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        if not any(i in self._chat_ids for i in ids):
            return self.sp.DecodeIds(ids)
        parts, run = [], []
        for i in ids:
            if i in self._chat_ids:  # a CONTROL piece would vanish in DecodeIds
                parts += [self.sp.DecodeIds(run), self._chat_ids[i]]
                run = []
            else:
                run.append(i)
        return "".join([*parts, self.sp.DecodeIds(run)])

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


def _alternation(strings: Iterable[str]) -> re.Pattern[str] | None:
    """A regex matching any of `strings`, longest first (None for none)."""
    strings = sorted(strings, key=len, reverse=True)
    return re.compile("|".join(re.escape(s) for s in strings)) if strings else None


def retype_pieces(model: bytes, tokens: Iterable[str], piece_type: int) -> bytes:
    """A serialized SentencePiece model with the pieces `tokens` (USER_DEFINED or CONTROL ones) re-typed."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model)
    wanted = set(tokens)
    for piece in proto.pieces:
        if piece.piece in wanted and piece.type in (USER_DEFINED, CONTROL):
            piece.type = piece_type
    return proto.SerializeToString()


def control_chat_tokens(model: bytes, tokens: Sequence[str] = CHAT_TOKENS) -> bytes:
    """`model` with the chat tokens as CONTROL pieces: trained as user-defined (atomic) pieces, stored as
    pieces that only a template (`encode_special`) produces."""
    return retype_pieces(model, tokens, CONTROL)


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
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
        "chat_tokens": list(CHAT_TOKENS),
        "end_of_turn_token": END_TOKEN,
        "vocab_size": sp.GetPieceSize(),
        # the model's context; a tokenizer trained on its own gets it when it is saved into a run
        **({"model_max_length": int(context_length)} if context_length else {}),
    }


def _lines(texts: Iterable[str], max_sentences: int) -> list[str]:
    """Lines of the (already bounded) sample: SentencePiece's "sentences"; newlines become byte tokens."""
    lines: list[str] = []
    for t in texts:
        lines += [ln for ln in t.split("\n") if ln.strip()]
        if len(lines) >= max_sentences:
            return lines[:max_sentences]
    return lines


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int,
    max_sentences: int = 4_000_000,
    character_coverage: float = CHARACTER_COVERAGE,
) -> Tokenizer:
    """Train a SentencePiece BPE model on `texts` (a bounded sample: data/prepare.TokenizerSample draws one
    from a corpus of any size) and write tokenizer.model + tokenizer_config.json."""
    lines = _lines(texts, max_sentences)
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
            character_coverage=character_coverage,
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
        tmp.write_bytes(control_chat_tokens(buf.getvalue()))  # trained atomic, stored as CONTROL
    tok = Tokenizer(out_dir / "tokenizer.model")
    tok.save(out_dir)  # + tokenizer_config.json and tokenizer.json
    return tok


def space_delimited(characters: int, spaces: int) -> bool:
    """Text whose words are separated by spaces (English, Korean...) has a space every 4-10 characters;
    Japanese and Chinese have almost none, so "tokens per word" means nothing there."""
    return characters > 0 and spaces / characters > 0.05


def evaluate_tokenizer(tok: Tokenizer, texts: Iterable[str]) -> TokenizerReport:
    docs = words = tokens = byte_tokens = failures = chars = spaces = 0
    for text in texts:
        ids = tok.encode(text)
        docs += 1
        words += len(text.split())
        chars += len(text)
        spaces += text.count(" ")
        tokens += len(ids)
        byte_tokens += sum(1 for i in ids if tok.is_byte(i))
        failures += tok.decode(ids) != text
    return TokenizerReport(
        vocab_size=tok.vocab_size,
        documents=docs,
        words=words,
        tokens=tokens,
        tokens_per_word=tokens / max(words, 1) if space_delimited(chars, spaces) else None,
        byte_fallback_rate=byte_tokens / max(tokens, 1),
        roundtrip_failures=failures,
        characters=chars,
        chars_per_token=chars / max(tokens, 1),
    )
