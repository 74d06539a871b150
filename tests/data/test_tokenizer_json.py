"""tokenizer.json, written with the `tokenizers` library: the same ids as SentencePiece on built-in, English and
Japanese text, the same special tokens and BOS, and the file every run directory has (with
model_max_length = the context in tokenizer_config.json)."""

from __future__ import annotations

import json

import pytest

tokenizers = pytest.importorskip("tokenizers", reason="tokenizer.json is built with the tokenizers library")

from kititans.data.builtin import generate_chat_examples, generate_corpus  # noqa: E402
from kititans.data.chat import render_text  # noqa: E402
from kititans.data.tokenizer import CHAT_TOKENS, Tokenizer, train_tokenizer  # noqa: E402

ENGLISH = [
    "The quick brown fox jumps over the lazy dog, doesn't it? Prices rose 3.5% in 2024 (from $12,000).",
    "  Indented  text\twith tabs,\n\nblank lines and trailing spaces   ",
    "Emoji 🙂🚀, accents café naïve Ωμέγα, a URL https://example.com/a?b=c&d=e, code `x = f(y) + 1`.",
]
JAPANESE = [
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。",
    "東京は日本の首都です。今日はいい天気ですね。カタカナとひらがなと漢字。",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    docs = generate_corpus(0, 400_000)
    return train_tokenizer([*docs, *JAPANESE * 50], tmp_path_factory.mktemp("tokjson"), vocab_size=1200)


def test_same_ids_as_sentencepiece(tok):
    path = tok.model_path.with_name("tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(path))
    held_out = [*generate_corpus(99, 60_000), *ENGLISH, *JAPANESE, "日本語 and English mixed 123"]
    assert len(held_out) > 20
    for text in held_out:
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text), text[:60]
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text)) == text
    assert hf.encode("Hello").ids[0] == tok.bos_id  # BOS added like llama.cpp / add_bos_token
    for msgs in generate_chat_examples(seed=1, n=20):  # a rendered template parses its special tokens
        text = render_text(tok.chat_template, msgs, add_generation_prompt=True)
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode_special(text)
    for t in CHAT_TOKENS:
        assert hf.token_to_id(t) == tok.sp.PieceToId(t)
        assert hf.decode([tok.sp.PieceToId(t)], skip_special_tokens=True) == ""


def test_transformers_loads_the_folder(tok):
    transformers = pytest.importorskip("transformers", reason="checks the files with transformers' loader")
    fast = transformers.AutoTokenizer.from_pretrained(str(tok.model_path.parent))
    text = ENGLISH[0] + JAPANESE[0]
    assert fast(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    msgs = [{"role": "user", "content": "What does a cow say?"}]
    rendered = fast.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == render_text(tok.chat_template, msgs, add_generation_prompt=True)


def test_run_directory_has_tokenizer_json_and_context(debug_run):
    cfg = json.loads((debug_run / "tokenizer_config.json").read_text())
    assert cfg["model_max_length"] == 256  # the debug preset's context
    tok = Tokenizer.load(debug_run)
    hf = tokenizers.Tokenizer.from_file(str(debug_run / "tokenizer.json"))
    text = "Once upon a time, a little robot found a red ball."
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)
    from kititans.files import _UMASK

    for f in ("model.safetensors", "tokenizer.json", "config.json"):  # 0644 under umask 022, not the 0600
        assert (debug_run / f).stat().st_mode & 0o777 == 0o666 & ~_UMASK, f  # of temp-file writers
