"""The pieces of `distill gen` that need no endpoint: filters that fire (and ones that must not), the JSONL
appender that survives a partial last line, seeds and personas, the 1-10 judge parser. Milliseconds."""

from __future__ import annotations

import json

import pytest

from kititans.distill.filters import FilterConfig, Filters, language_share, repeat_share
from kititans.distill.gen import clean_user_text, parse_turns
from kititans.distill.judge import parse_score, parse_verdict
from kititans.distill.records import Appender, read_records, repair
from kititans.distill.seeds import Seeds, load_cast
from kititans.errors import KititansError


def chat(*replies: str, user: str = "Tell me something.") -> list[dict[str, str]]:
    out = []
    for r in replies:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": r}]
    return out


def test_language_share_by_script():
    assert language_share("こんにちは、今日はいい天気ですね。", "ja") > 0.9
    assert language_share("Hello there, how are you today?", "ja") == 0.0
    assert language_share("Hello there, how are you today?", "en") == 1.0
    assert (
        language_share("今天天气很好，我们去公园散步吧，好不好呢朋友们大家一起", "ja") == 0.0
    )  # Han only: Chinese
    assert language_share("Привет, как дела?", "ru") == 1.0
    assert language_share("1234 !!", "ja") == 1.0  # no letters: nothing to judge


def test_each_filter_fires_and_counts():
    f = Filters(FilterConfig(language="en", min_chars=5))
    sun = "The sun is a star at the centre of our solar system. It gives light and heat to the planets, and its gravity keeps them in their orbits around it."
    good = chat(sun)
    assert f.check(good, ["stop"]) is None
    cases = {
        "empty": (chat("Fine answer here."), ["stop"], lambda m: m[0].update(content=" ")),
        "truncated": (chat("It was a long story about a"), ["length"], None),
        "length": (chat("Ok"), ["stop"], None),
        "language": (chat("太陽は太陽系の中心にある恒星です。"), ["stop"], None),
        "repetition": (chat("I like it. " * 20), ["stop"], None),
        "refusal": (chat("I'm sorry, but I can't help with that request."), ["stop"], None),
        "duplicate": (chat(sun.upper().replace(". ", "!  ")), ["stop"], None),
        "near_duplicate": (chat(sun.replace("our solar", "the solar")), ["stop"], None),
    }
    for reason, (msgs, finish, edit) in cases.items():
        if edit:
            edit(msgs)
        assert f.check(msgs, finish) == reason, reason
    assert f.counts == {"kept": 1, **dict.fromkeys(cases, 1)}
    kept = chat("Rain falls from clouds when their droplets grow heavy enough.")
    assert f.check(kept, ["stop"]) is None  # an unrelated reply is not a near duplicate
    loose = Filters(FilterConfig(keep_truncated=True, refusals=False, near_dup=0))
    assert loose.check(chat("I'm sorry, but I can't help"), ["length"]) is None
    assert "near_duplicate:0.85" in f.applied() and "language:en" in f.applied()


def test_repeat_share():
    assert repeat_share("abcdefghij" * 10) > 0.8
    assert repeat_share("The quick brown fox jumps over the lazy dog near the river bank today.") < 0.1


def test_appender_drops_a_partial_line_and_keeps_whole_records(tmp_path):
    p = tmp_path / "o.jsonl"
    with Appender(p) as a:
        a.write({"id": "a", "x": "日本"})
        a.write({"id": "b"})
    with open(p, "ab") as f:
        f.write(b'{"id": "c", "x": "cut he')
    assert repair(p) > 0 and [r["id"] for r in read_records(p)] == ["a", "b"]
    with Appender(p) as a:
        a.write({"id": "c"})
    assert [json.loads(ln)["id"] for ln in p.read_text().splitlines()] == ["a", "b", "c"]
    p.write_text('{"id": 1}\nnot json\n')
    with pytest.raises(KititansError, match=r"o.jsonl:2: not valid JSON"):
        list(read_records(p))


def test_seeds_and_cast(tmp_path):
    t = tmp_path / "t.txt"
    t.write_text("# topics\nfarm animals\n\nfarm animals\nboats\n")
    s = Seeds(t)
    assert [x.text for x in s.items] == ["farm animals", "boats"] and s.items[0].kind == "topic"
    assert Seeds(t, "prompts").items[0].kind == "prompt" and Seeds(t).items[0].id == s.items[0].id
    j = tmp_path / "o.jsonl"
    j.write_text(
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]})
        + "\n" + json.dumps({"prompt": "Why?", "id": "q7"}) + "\n"
    )  # fmt: skip
    kinds = [(x.kind, x.id) for x in Seeds(j).items]
    assert kinds[0][0] == "messages" and kinds[1] == ("prompt", "q7")
    j.write_text(json.dumps({"messages": [{"role": "assistant", "content": "Hi"}]}) + "\n")
    with pytest.raises(KititansError, match="o.jsonl:1: a seed needs"):
        Seeds(j)
    (tmp_path / "e.txt").write_text("\n# nothing\n")
    with pytest.raises(KititansError, match="the seeds file is empty"):
        Seeds(tmp_path / "e.txt")
    y = tmp_path / "p.yaml"
    y.write_text(
        "system_prompts: [Be kind.]\npersonas:\n  - name: kid\n    description: A child.\n  - An old man.\n"
    )
    cast = load_cast(y, ["Answer in English."])
    assert cast.system_prompts == ["Answer in English.", "Be kind."]
    assert [(p.name, p.description) for p in cast.personas] == [
        ("kid", "A child."),
        ("persona2", "An old man."),
    ]
    y.write_text("people: []\n")
    with pytest.raises(KititansError, match="expected a mapping"):
        load_cast(y)


def test_small_parsers():
    assert parse_turns("2-6") == (2, 6) and parse_turns("3") == (3, 3)
    for bad in ("0", "5-2", "x"):
        with pytest.raises(KititansError, match="--turns"):
            parse_turns(bad)
    assert parse_score("Score: 8/10") == 8 and parse_score("10") == 10 and parse_score("none") is None
    assert (
        parse_verdict("B is better") == "b" and parse_verdict("Tie.") == "tie" and parse_verdict("?") is None
    )
    assert clean_user_text('User: "What is rain?"') == "What is rain?"
