"""The built-in corpus and chat examples: determinism, size, variety, grammar and fact consistency."""

from __future__ import annotations

import re
from collections import Counter
from itertools import islice

import pytest

from kititans.data import builtin_words as W
from kititans.data.builtin import (
    BUILTIN_CORPUS_VERSION,
    _documents,
    animal_answer,
    article,
    generate_chat_examples,
    generate_corpus,
)

SPECIAL = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
# "a" before a vowel letter is right only when the vowel is not sounded as one ("a unicorn", "a one")
A_BEFORE_VOWEL = re.compile(r"\b[Aa] ([aeiouAEIOU]\w*)")
A_EXCEPTIONS = {"one", "unicorn", "uniform", "useful", "user", "eulogy"}
AN_BEFORE_CONSONANT = re.compile(r"\b[Aa]n ([b-df-hj-np-tv-zB-DF-HJ-NP-TV-Z]\w*)")
AN_EXCEPTIONS = {"hour", "honest"}
STORY_REQUEST = re.compile(r"(?:named|called) (\w+)|story about (\w+) the ")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_SPLIT.split(text) if s.strip()]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return generate_corpus()  # the full default size, generated once for this module (~1 s)


@pytest.fixture(scope="module")
def kinds() -> list[tuple[str, str]]:
    return list(islice(_documents(0), 3000))


@pytest.fixture(scope="module")
def chat() -> list[list[dict[str, str]]]:
    return generate_chat_examples()


# ---------------------------------------------------------------------------------------------- corpus
def test_version_is_an_int() -> None:
    assert isinstance(BUILTIN_CORPUS_VERSION, int) and BUILTIN_CORPUS_VERSION >= 1


def test_corpus_is_deterministic_and_seeded() -> None:
    a, b, c = generate_corpus(0, 200_000), generate_corpus(0, 200_000), generate_corpus(1, 200_000)
    assert a == b
    assert a != c
    assert len(set(a) & set(c)) == 0  # documents are long enough never to coincide across seeds
    assert generate_corpus(0, 50_000) == a[: len(generate_corpus(0, 50_000))]  # a smaller target is a prefix


@pytest.mark.parametrize("target", [1, 10_000, 200_000])
def test_corpus_size_stops_at_first_document_reaching_target(target: int) -> None:
    docs = generate_corpus(3, target)
    sizes = [len(d.encode("utf-8")) for d in docs]
    assert sum(sizes) >= target
    assert sum(sizes[:-1]) < target


def test_full_default_corpus(corpus: list[str]) -> None:
    total = sum(len(d.encode("utf-8")) for d in corpus)
    assert 6_000_000 <= total < 6_000_000 + 5_000
    assert 8_000 < len(corpus) < 20_000


def test_characters_and_whitespace(corpus: list[str]) -> None:
    text = "\n".join(corpus)
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,!?'\":;-+")
    assert set(text) <= allowed, set(text) - allowed
    for d in corpus:
        assert d == d.strip() and d
        assert "  " not in d and " \n" not in d and "\n\n\n" not in d
        assert "{" not in d and "}" not in d and "~" not in d  # no template left unfilled


def test_variety(corpus: list[str]) -> None:
    assert len(set(corpus)) / len(corpus) > 0.999
    sents = [s for d in corpus for s in sentences(d)]
    # Measured 0.38 on the default 6 MB (about 160k sentences, 61k distinct). Generic short sentences
    # ("They laughed and laughed.", "Question: What did they eat?") recur as in TinyStories; names,
    # places, objects and numbers make the rest distinct. 0.3 catches a template or word list that
    # collapsed, the size of the corpus matters (the ratio falls slowly as it grows).
    assert len(set(sents)) / len(sents) > 0.3
    most, count = Counter(sents).most_common(1)[0]
    assert count / len(sents) < 0.01, most  # no sentence is everywhere
    vocab = {w.lower() for w in re.findall(r"[A-Za-z]+", "\n".join(corpus))}
    assert 700 < len(vocab) < 3000  # measured 1017: a small child's vocabulary, varied enough to learn from


def test_mix_of_stories_and_dialogues(kinds: list[tuple[str, str]]) -> None:
    size = Counter()
    for kind, doc in kinds:
        size[kind] += len(doc)
    total = sum(size.values())
    assert 0.67 < size["story"] / total < 0.73
    for kind in ("qa", "conversation", "reading"):
        assert size[kind] / total > 0.04, kind
    stories = [d for k, d in kinds if k == "story"]
    words = [len(d.split()) for d in stories]
    assert min(words) >= 80 and max(words) <= 250
    assert 95 < sum(words) / len(words) < 160
    assert all("Question:" not in d for d in stories)
    assert all("Question:" in d and "Answer:" in d for k, d in kinds if k in ("qa", "reading"))


def test_story_shapes_and_names(kinds: list[tuple[str, str]]) -> None:
    stories = [d for k, d in kinds if k == "story"]
    text = "\n".join(stories)
    for marker in ("birthday", "rain", "afraid", "help", "friend", "shar", "trip", "found"):
        assert marker in text, marker
    names = {n for n in (*W.FEMALE, *W.MALE, *W.NEUTRAL) if re.search(rf"\b{n}\b", text)}
    assert len(names) >= 60
    for pronoun in ("she", "he", "they"):
        assert re.search(rf"\b{pronoun}\b", text, re.IGNORECASE)


def test_grammar_spot_checks(corpus: list[str]) -> None:
    text = "\n".join(corpus)
    bad_a = Counter(m.lower() for m in A_BEFORE_VOWEL.findall(text) if m.lower() not in A_EXCEPTIONS)
    bad_an = Counter(m.lower() for m in AN_BEFORE_CONSONANT.findall(text) if m.lower() not in AN_EXCEPTIONS)
    assert not bad_a, bad_a.most_common(5)
    assert not bad_an, bad_an.most_common(5)
    one_plural = r"\b1 (?:" + "|".join(plural for _, plural in W.FOODS) + r")\b"
    for wrong in (r"\b[Tt]hey was\b", r"\b[Ss]he were\b", r"\b[Hh]e were\b", one_plural):
        assert not re.search(wrong, text), wrong
    for d in corpus:
        assert d.count('"') % 2 == 0, d
        for s in sentences(d):
            first = s.lstrip('"')[:1]
            assert first.isupper() or first.isdigit(), (s, d)
            assert s[-1] in '.!?"' or s.startswith(("Question:", "Answer:")), (s, d)


def test_article_helper() -> None:
    assert article("apple") == "an apple"
    assert article("orange ball") == "an orange ball"
    assert article("red ball") == "a red ball"
    assert article("unicorn") == "a unicorn"
    assert article("owl") == "an owl"


# ---------------------------------------------------------------------------------------------- knowledge
SOUND_Q = re.compile(r"What sound does (?:a|an) ([a-z]+) make\?")


def qa_pairs(docs: list[str]) -> list[tuple[str, str]]:
    return re.findall(r"Question: (.+)\nAnswer: (.+)", "\n".join(docs))


def test_knowledge_is_stated_consistently(corpus: list[str], chat: list[list[dict[str, str]]]) -> None:
    pairs = qa_pairs(corpus)
    chat_pairs = [
        (c[i]["content"], c[i + 1]["content"])
        for c in chat
        for i in range(len(c) - 1)
        if c[i]["role"] == "user"
    ]
    seen_sounds = set()
    for q, a in pairs + chat_pairs:
        m = SOUND_Q.fullmatch(q)
        if m:
            assert a == animal_answer(m.group(1), "sound"), (q, a)
            seen_sounds.add(m.group(1))
        m = re.fullmatch(r"What is (\d+) plus (\d+)\?", q)
        if m:
            x, y = int(m.group(1)), int(m.group(2))
            assert a == f"{x} plus {y} is {x + y}."
        m = re.fullmatch(r"What color (?:is|are) (.+)\?", q)
        if m:
            assert any(
                a == f"{x[0].upper()}{x[1:]} {'are' if p else 'is'} {c}."
                for x, c, p in W.COLORS
                if x == m.group(1)
            )
    assert {"cow", "dog", "cat", "duck"} <= seen_sounds
    assert animal_answer("cow", "sound") == "A cow says moo."
    # the story text uses the same sounds: "The cow said, "Moo!""
    for name, sound in re.findall(r'The ([a-z]+) said, "([A-Z][a-z-]+)!"', "\n".join(corpus)):
        if name in W.ANIMALS:
            assert W.ANIMALS[name][1] == sound.lower(), (name, sound)


def standalone(q: str) -> bool:
    """Questions whose answer does not depend on what came before."""
    return not re.search(r"\b(it|its|that|they|the story)\b|^(And|What about|Now)\b", q, re.IGNORECASE)


def test_same_question_same_answer_in_corpus_and_chat(kinds: list[tuple[str, str]]) -> None:
    answers: dict[str, str] = {}
    qa_docs = [d for k, d in kinds if k == "qa"]
    chats = generate_chat_examples(0, 3000) + generate_chat_examples(1, 3000)
    firsts = [[m for m in c if m["role"] != "system"][:2] for c in chats]
    firsts = [(u["content"], a["content"]) for u, a in firsts if "story" not in u["content"].lower()]
    for q, a in qa_pairs(qa_docs) + firsts:
        if standalone(q):
            assert answers.setdefault(q, a) == a, (q, answers[q], a)
    assert len(answers) > 1000


# ---------------------------------------------------------------------------------------------- chat
def test_chat_structure(chat: list[list[dict[str, str]]]) -> None:
    assert len(chat) == 5000
    assert len(generate_chat_examples(0, 7)) == 7
    for conv in chat:
        roles = [m["role"] for m in conv]
        assert set(roles) <= {"system", "user", "assistant"}
        body = roles[1:] if roles[0] == "system" else roles
        assert "system" not in body
        assert body == ["user", "assistant"] * (len(body) // 2) and body, roles
        for m in conv:
            assert set(m) == {"role", "content"}
            assert m["content"] and m["content"] == m["content"].strip()
            assert not any(tok in m["content"] for tok in SPECIAL)
            assert all(32 <= ord(ch) < 127 or ch == "\n" for ch in m["content"])
        for m in conv:
            if m["role"] == "assistant":
                first = m["content"][:1]
                assert first.isupper() or first.isdigit(), m


def test_chat_shares(chat: list[list[dict[str, str]]]) -> None:
    n = len(chat)
    system = sum(c[0]["role"] == "system" for c in chat) / n
    turns = Counter(sum(m["role"] == "user" for m in c) for c in chat)
    assert 0.17 < system < 0.23
    assert 0.72 < turns[1] / n < 0.78
    assert 0.22 < (turns[2] + turns[3]) / n < 0.28
    assert set(turns) == {1, 2, 3}


def test_chat_determinism_and_held_out_seed() -> None:
    a, b, c = (
        generate_chat_examples(0, 1000),
        generate_chat_examples(0, 1000),
        generate_chat_examples(1, 1000),
    )
    assert a == b
    seen = {repr(x) for x in a}
    shared = sum(repr(x) in seen for x in c) / len(c)
    assert shared < 0.4  # measured ~0.2: the same short fact questions can recur, the rest differs


def test_story_requests_use_the_name(chat: list[list[dict[str, str]]]) -> None:
    checked = 0
    for conv in chat:
        body = [m for m in conv if m["role"] != "system"]
        request, story = body[0]["content"], body[1]["content"]
        m = STORY_REQUEST.search(request)
        if m and request.lower().startswith(("tell me", "can you tell", "write", "please tell", "i want")):
            name = m.group(1) or m.group(2)
            assert re.search(rf"\b{name}\b", story), (request, story)
            kind = re.search(r"(?:about (?:a little |an |a )?|the )([a-z]+)", request)
            assert kind and kind.group(1) in story, (request, story)
            words = len(story.split())
            assert 40 <= words <= 125, (words, story)
            checked += 1
    assert checked > 400


def test_chat_covers_the_world(chat: list[list[dict[str, str]]]) -> None:
    users = "\n".join(m["content"] for c in chat for m in c if m["role"] == "user")
    for phrase in ("sound", "legs", "opposite", "plus", "minus", "color", "day", "story", "Hi"):
        assert phrase in users, phrase
    reading = [c for c in chat if "\n" in c[-2]["content"] or c[-2]["content"].startswith(("One ", "On a "))]
    assert len(reading) > 300
