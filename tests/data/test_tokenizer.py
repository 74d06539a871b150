from __future__ import annotations

import pytest

from kititans.data.chat import render_conversation, render_prompt, render_text, trim_history
from kititans.data.tokenizer import (
    CHAT_TOKENS,
    CONTROL,
    USER_DEFINED,
    Tokenizer,
    evaluate_tokenizer,
    train_tokenizer,
)
from kititans.errors import KititansError

TEXTS = [
    "Tom had a red ball. He liked to play in the park with his dog Spot.\n"
    "Question: What color was the ball?\nAnswer: The ball was red.",
    "  Two spaces, a tab\there, digits 12345 and unicode: café, naïve, 日本, emoji 🙂.",
] * 200


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(TEXTS, tmp_path_factory.mktemp("tok"), vocab_size=400)


def test_special_tokens_and_types(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    for t in CHAT_TOKENS:
        i = tok.sp.PieceToId(t)
        assert tok.piece_type(i) == CONTROL, t  # stored as a control token (trained as an atomic piece)
        assert tok.encode(t) != [i] and i not in tok.encode(f"a{t}b"), t  # a user's text stays text
        assert tok.encode_special(t) == [i] and tok.decode([i]) == t  # a template produces it
    assert tok.piece_type(tok.bos_id) == CONTROL and USER_DEFINED not in {t for _, _, t in tok.pieces()}
    assert tok.stop_ids == [tok.eos_id, tok.end_id]
    assert all(len(p.encode()) <= 32 for p, _, _ in tok.pieces())  # llama-cpp-python detokenize limit


def test_exact_round_trip_and_report(tok):
    text = "  leading spaces\n\n\tand  runs   of   spaces, café 🙂 <|user|> x"
    assert tok.decode(tok.encode(text)) == text
    report = evaluate_tokenizer(tok, TEXTS[:2])
    assert report.roundtrip_failures == 0 and report.vocab_size == 400
    assert 0 < report.byte_fallback_rate < 0.5 and report.tokens_per_word > 0.5


def test_encode_special_parses_bos(tok):
    ids = tok.encode_special("<s><|user|>Hi<|end|>\n")
    assert ids[0] == tok.bos_id and ids[1] == tok.sp.PieceToId("<|user|>")
    assert tok.encode("<s>")[0] != tok.bos_id  # plain text never produces BOS


def test_vocab_too_large_for_corpus(tmp_path):
    with pytest.raises(KititansError, match="too large for this corpus"):
        train_tokenizer(TEXTS[:4], tmp_path, vocab_size=30000)
    assert not (tmp_path / "tokenizer.model").exists()


def test_reload_from_directory(tok):
    again = Tokenizer.load(tok.model_path.parent)
    assert again.encode(TEXTS[0]) == tok.encode(TEXTS[0]) and again.chat_template == tok.chat_template


def test_chat_mask_on_multi_turn(tok):
    msgs = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Ball?"},
        {"role": "assistant", "content": "It was red."},
    ]
    ids, mask = render_conversation(tok, msgs)
    assert ids == tok.encode_special(
        render_text(tok.chat_template, msgs)
    )  # same as tokenizing the whole text
    assert ids[0] == tok.bos_id
    trained = [tok.decode([i]) if i != tok.end_id else "<END>" for i, m in zip(ids, mask) if m]
    assert "".join(trained) == "Hello there<END>It was red.<END>"
    prompt = render_prompt(tok, msgs[:2])
    assert prompt[-2:] == [tok.sp.PieceToId("<|assistant|>"), *tok.encode("\n")]  # Phi-3's "<|assistant|>\n"


def test_trim_history_keeps_system_and_latest(tok):
    msgs = [{"role": "system", "content": "Sys."}]
    for i in range(20):
        msgs += [
            {"role": "user", "content": f"question {i} " * 5},
            {"role": "assistant", "content": "ok " * 5},
        ]
    msgs.append({"role": "user", "content": "last one"})
    kept, ids = trim_history(tok, msgs, budget=80)
    assert len(ids) <= 80 and kept[0]["role"] == "system" and kept[-1]["content"] == "last one"
    assert len(kept) < len(msgs)
