"""Built-in training data: a deterministic, TinyStories-like English corpus and matching chat examples.

Used when ``kititans train`` is given no data. Nothing is downloaded or read from disk: simple stories,
Q/A dialogues and chat (instruction) examples are composed from the word lists, the fixed world
knowledge base and the sentence templates in :mod:`kititans.data.builtin_words`, driven by
``random.Random(seed)``. The knowledge base never depends on the seed, so every fact (a cow says moo,
3 plus 4 is 7, ...) is stated the same way in the pretraining text and in the chat answers, and a model
tuned on one seed's chat examples can answer another seed's (same facts, other combinations).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from types import SimpleNamespace

from kititans.data import builtin_words as W

__all__ = ["BUILTIN_CORPUS_VERSION", "animal_answer", "article", "generate_chat_examples", "generate_corpus"]

BUILTIN_CORPUS_VERSION: int = 1
"""Bumped whenever the generated text changes (corpora and tokenizers are cached by it)."""

Pair = tuple[str, str]
_NAMES = (*W.FEMALE, *W.MALE, *W.NEUTRAL)
_GENDER = {**{n: "f" for n in W.FEMALE}, **{n: "m" for n in W.MALE}, **{n: "n" for n in W.NEUTRAL}}
_PRONOUNS = {
    "f": ("she", "her", "her", "was", "girl"),
    "m": ("he", "him", "his", "was", "boy"),
    "n": ("they", "them", "their", "were", "kid"),
}
_ANIMAL_KEYS = tuple(W.ANIMALS)
_SHAPE_KEYS = tuple(W.STORY_SHAPES)


def article(phrase: str) -> str:
    """``phrase`` with "a" or "an" in front ("an orange ball", "a unicorn", "an hour")."""
    low = phrase.lower()
    vowel = low[:1] in ("a", "e", "i", "o", "u") and not low.startswith(("uni", "use", "one", "eu"))
    return ("an " if vowel or low.startswith(("hour", "honest")) else "a ") + phrase


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _count(k: int, sing: str, plural: str) -> str:
    return f"{k} {sing if k == 1 else plural}"


class Person:
    """A character: name and pronoun forms, used in templates as ``{a.He}``, ``{a.his}``, ``{a.was}``."""

    __slots__ = ("He", "His", "he", "him", "his", "kind", "name", "role", "was")

    def __init__(self, name: str, gender: str, role: str = "") -> None:
        self.he, self.him, self.his, self.was, self.kind = _PRONOUNS[gender]
        self.name, self.role = name, role
        self.He, self.His = _cap(self.he), _cap(self.his)


class NP:
    """A noun phrase and its forms: ``n``, ``pl``, ``bare`` (with adjective), ``a``/``A``, ``the``/``The``."""

    __slots__ = ("A", "Sound", "The", "a", "adj", "bare", "n", "name", "pl", "sound", "the")

    def __init__(self, n: str, pl: str = "", adj: str = "", sound: str = "", name: str = "") -> None:
        self.n, self.pl, self.adj, self.sound, self.name = n, pl or n + "s", adj, sound, name
        self.bare = f"{adj} {n}" if adj else n
        self.a, self.the = article(self.bare), "the " + self.bare
        self.A, self.The, self.Sound = _cap(self.a), _cap(self.the), _cap(sound)


def _place(rng: random.Random, key: str) -> SimpleNamespace:
    the, at, to, sights, hides, acts = W.PLACES[key][:6]
    p = SimpleNamespace(key=key, the=the, The=_cap(the), at=at, At=_cap(at), to=to, sight=rng.choice(sights))
    p.hide, p.hide2 = rng.sample(hides, 2)
    p.act, p.act2 = rng.sample(acts, 2)
    return p


def _kids(rng: random.Random, k: int) -> list[Person]:
    return [Person(n, _GENDER[n]) for n in rng.sample(_NAMES, k)]


def _adult(rng: random.Random) -> Person:
    name, role, gender = rng.choice(W.ADULTS)
    return Person(name, gender, role)


def _fill(template: str, ctx: dict[str, object]) -> str:
    s = template.format(**ctx)
    if "{" in s:  # scenes (help, indoor play) are templates themselves
        s = s.format(**ctx)
    return _cap(s)


# ---------------------------------------------------------------------------------------------- stories
def _story_ctx(rng: random.Random, place_key: str, fear: Sequence[str]) -> dict[str, object]:
    a, b, c = _kids(rng, 3)
    g = _adult(rng)
    (c1, c2), (t1, t2) = rng.sample(W.COLOR_ADJ, 2), rng.sample(W.TOYS, 2)
    loud = [k for k in W.PLACES[place_key][6] if W.ANIMALS[k][1]] or ["bird"]
    ani = rng.choice(loud)
    ctx: dict[str, object] = {key: rng.choice(options) for key, options in W.STORY_CHOICES.items()}
    ctx.update(a=a, b=b, c=c, g=g, h=rng.choice((b, g)), place=_place(rng, place_key))
    ctx.update(food=NP(*rng.choice(W.FOODS)), pet=NP(rng.choice(W.PET_KINDS), name=rng.choice(W.PET_NAMES)))
    ctx.update(toy=NP(t1, adj=c1), toy2=NP(t2, adj=c2), ani=NP(ani, sound=W.ANIMALS[ani][1] or ""))
    ctx["fear"] = SimpleNamespace(thing=fear[0], attempt=fear[1], did=fear[2], why=fear[3])
    ctx["act"] = SimpleNamespace(**dict(zip(("inf", "past", "more"), rng.choice(W.INDOOR))))
    ctx["help"] = SimpleNamespace(**dict(zip(("problem", "act", "thanks"), rng.choice(W.HELPS))))
    return ctx


def _story(rng: random.Random) -> str:
    """One story of 80-250 words (usually 90-160), in one to three paragraphs."""
    shape = rng.choice(_SHAPE_KEYS)
    places, p_intro, slots, endings = W.STORY_SHAPES[shape]
    fear = rng.choice(W.FEARS)
    place_key = fear[4] if shape == "brave" else rng.choice(places or tuple(W.PLACES))
    ctx = _story_ctx(rng, place_key, fear)
    chunks: list[list[str]] = [[]]
    if rng.random() < p_intro:
        chunks[0].append(_fill(rng.choice(W.INTRO_FIRST), ctx))
        second = rng.choice(W.INTRO_SECOND)
        if second and "{age}" not in chunks[0][0]:
            chunks[0].append(_fill(second, ctx))
    at = len(chunks[0]) or 1  # scene details go after the introduction, or after the first sentence
    outdoor = W.PLACES[place_key][7] and shape != "rainy"
    pool = W.DETAILS + W.DETAILS_OUTDOOR if outdoor else W.DETAILS
    pool = pool if chunks[0] else tuple(t for t in pool if t.startswith("{a.name}"))  # name before pronouns
    details = rng.sample(pool, len(pool))
    n_details = rng.choice((0, 1, 1, 2))
    for i, slot in enumerate(slots):
        t = rng.choice(slot)
        if t is not None:
            if i and len(chunks[-1]) > 2 and rng.random() < 0.15:
                chunks.append([])
            chunks[-1].append(_fill(t, ctx))
    for _ in range(n_details):
        chunks[0].insert(at, _fill(details.pop(), ctx))
    ending = [_fill(endings[i], ctx) for i in sorted(rng.sample(range(len(endings)), rng.choice((1, 1, 2))))]
    if rng.random() < 0.4:
        chunks.append(ending)
    else:
        chunks[-1].extend(ending)
    while details and sum(len(s.split()) for ch in chunks for s in ch) < 80:
        chunks[0].insert(at, _fill(details.pop(), ctx))
    return "\n\n".join(" ".join(ch) for ch in chunks if ch)


# ---------------------------------------------------------------------------------------------- knowledge Q/A
Fact = tuple[list[Pair], list[Pair]]  # (standalone questions, follow-up questions), each with its answer


def animal_answer(key: str, fact: str) -> str | None:
    """The canonical answer about an animal (``("cow", "sound")`` -> "A cow says moo."), None if unknown."""
    _pl, sound, legs, home, food, baby, gives, fly = W.ANIMALS[key]
    a = article(key)
    n_legs = None if legs is None else W.NUMBER_WORDS[legs] if legs else "no"
    answers = {
        "sound": sound and f"{_cap(a)} says {sound}.",
        "legs": n_legs and f"{_cap(a)} has {n_legs} legs.",
        "home": f"{_cap(a)} lives {home}.",
        "food": f"{_cap(a)} eats {food}.",
        "baby": baby and f"A baby {key} is called {article(baby)}.",
        "gives": gives and f"{_cap(a)} gives us {gives}.",
        "fly": None if fly is None else f"Yes, {a} can fly." if fly else f"No, {a} can't fly.",
    }
    return answers[fact]


def _fact(firsts: Sequence[str], follows: Sequence[str], answer: str, **fields: object) -> Fact:
    return [(q.format(**fields), answer) for q in firsts], [(q.format(**fields), answer) for q in follows]


def _yes_no(question: str, answer: str, yes: bool) -> Pair:
    return question, ("Yes, " if yes else "No, ") + answer[0].lower() + answer[1:]


def _animal_facts(key: str) -> list[Fact]:
    plural, sound, legs = W.ANIMALS[key][:3]
    group = []
    for fact, (full, follow) in W.ANIMAL_Q.items():
        ans = animal_answer(key, fact)
        if ans:
            group.append(_fact(full, follow, ans, a=article(key), pl=plural, n=key, sound=sound))
            asked = ((legs, 6 if legs == 4 else 4) if legs else (4,)) if fact == "legs" else ()
            for k in asked:  # "Does a cow have four legs?" (yes) and "... six legs?" (no)
                q = f"Does {article(key)} have {W.NUMBER_WORDS[k]} legs?"
                group[-1][0].append(_yes_no(q, ans, k == legs))
    return group


def _build_kb() -> dict[str, list[list[Fact]]]:
    """The fixed knowledge base as groups of facts per kind; a topic takes up to three facts of a group."""
    colors, uses, opposites, after, before, count, bigger, days, add, sub = ([] for _ in range(10))
    for i, (x, color, plural) in enumerate(W.COLORS):
        be, ans = ("are" if plural else "is"), f"{_cap(x)} {'are' if plural else 'is'} {color}."
        colors.append(_fact(W.COLOR_Q, ("And {x}?", "What about {x}?"), ans, x=x, be=be))
        wrong = W.COLOR_ADJ[(i * 3 + 1) % len(W.COLOR_ADJ)]
        for c in (color, wrong if wrong != color else "purple"):
            colors[-1][0].append(_yes_no(f"{_cap(be)} {x} {c}?", ans, c == color))
    for x, use, plural in W.USES:
        be = "are" if plural else "is"
        uses.append(_fact(W.USE_Q, ("What about {x}?",), f"{_cap(x)} {be} for {use}.", x=x, be=be))
    for w, o in W.OPPOSITES + tuple((o, w) for w, o in W.OPPOSITES):
        opposites.append(_fact(W.OPP_Q, ("And the opposite of {w}?",), f"The opposite of {w} is {o}.", w=w))
    for x in range(21):
        if x < 20:
            after.append(_fact(W.AFTER_Q, W.AFTER_Q, f"The number after {x} is {x + 1}.", x=x))
        if x > 0:
            before.append(_fact(W.BEFORE_Q, W.BEFORE_Q, f"The number before {x} is {x - 1}.", x=x))
        if 3 <= x <= 10:
            ans = "Sure! " + ", ".join(map(str, range(1, x + 1))) + "."
            count.append(_fact(W.COUNT_Q, ("Now count to {x}.",), ans, x=x))
        for y in range(x):
            ans = f"{x} is bigger than {y}."
            bigger += [_fact(W.BIGGER_Q, W.BIGGER_Q, ans, x=u, y=v) for u, v in ((x, y), (y, x))]
    for i, d in enumerate(W.DAYS):
        nxt, prev = W.DAYS[(i + 1) % 7], W.DAYS[i - 1]
        nxt_d = _fact(W.DAY_AFTER_Q, ("And what day comes after {d}?",), f"{nxt} comes after {d}.", d=d)
        prev_d = _fact(W.DAY_BEFORE_Q, ("And what day comes before {d}?",), f"{prev} comes before {d}.", d=d)
        nxt_d[0].append((f"If today is {d}, what day is tomorrow?", f"If today is {d}, tomorrow is {nxt}."))
        q = f"If today is {d}, what day was yesterday?"
        prev_d[0].append((q, f"If today is {d}, yesterday was {prev}."))
        days += [nxt_d, prev_d]
    week = "The days of the week are " + ", ".join(W.DAYS[:6]) + ", and Sunday."
    days.append(_fact(W.WEEK_Q, W.WEEK_Q, week))
    days.append(_fact(W.WEEK_LEN_Q, W.WEEK_LEN_Q, "There are seven days in a week."))
    for x in range(11):
        for y in range(11):
            add.append(_fact(W.ADD_Q, ("And {x} plus {y}?",), f"{x} plus {y} is {x + y}.", x=x, y=y))
            if y <= x:
                sub.append(_fact(W.SUB_Q, ("And {x} minus {y}?",), f"{x} minus {y} is {x - y}.", x=x, y=y))
    hot_q = (("Is {x} hot or cold?",), ("What about {x}?",))
    hot = [_fact(*hot_q, f"{_cap(x)} is {t}.", x=x) for x, t in W.HOT_COLD]
    shapes = [
        [_fact((f"How many {p} does {{x}} have?",), ("And {x}?",), f"{_cap(x)} has {W.NUMBER_WORDS[k]} {p}.", x=x)
         for x, k in W.SHAPES]
        for p in ("sides", "corners")
    ]  # fmt: skip
    wear = [_fact(("What do you wear {w}?",), ("And {w}?",), f"You wear {x} {w}.", w=w) for w, x in W.WEAR]
    return {
        "animal": [_animal_facts(k) for k in _ANIMAL_KEYS],
        "color": [colors], "use": [uses], "opposite": [opposites], "number": [after, before, count, bigger], "day": [days],
        "math": [add, sub], "misc": [hot, *shapes, wear],
    }  # fmt: skip


_KB = _build_kb()
_KB_WEIGHTS = dict(animal=30, color=12, opposite=10, use=10, math=14, number=8, day=6, misc=6, word=6)


def _qa(rng: random.Random, kind: str = "", group: list[Fact] | None = None) -> list[Pair]:
    """Up to three question/answer pairs on one topic; the first stands alone, later ones may be follow-ups."""
    if group is None:
        kind = kind or rng.choices(tuple(_KB_WEIGHTS), tuple(_KB_WEIGHTS.values()))[0]
        if kind == "word":
            return _qa_word_problem(rng)
        group = rng.choice(_KB[kind])
    facts = rng.sample(group, min(3, len(group)))
    return [rng.choice(one if i == 0 or rng.random() < 0.4 else more) for i, (one, more) in enumerate(facts)]


def _qa_word_problem(rng: random.Random) -> list[Pair]:
    a, b = _kids(rng, 2)
    out: list[Pair] = []
    for _ in range(3):
        sing, plural = rng.choice(W.FOODS)
        x = rng.randint(1, 9)
        if rng.random() < 0.5:
            y = rng.randint(1, 9)
            q = f"{a.name} has {_count(x, sing, plural)}. {b.name} gives {a.him} {y} more."
            q += f" How many {plural} does {a.name} have now?"
            out.append((q, f"{a.name} has {x + y} {plural} now."))
        else:
            x, left = x + 1, rng.randint(0, x)
            q = f"{a.name} has {x} {plural}. {a.name} eats {x - left}. How many {plural} does {a.name} have left?"
            out.append((q, f"{a.name} has {_count(left, sing, plural) if left else 'no ' + plural} left."))
    return out


# ---------------------------------------------------------------------------------------------- reading comprehension
def _rc(rng: random.Random, n_extra: int) -> tuple[str, list[Pair]]:
    """A short story (a first sentence and ``n_extra`` more) and questions answered in it."""
    (a, b), g, key = _kids(rng, 2), _adult(rng), rng.choice(W.RC_PLACES)
    place = _place(rng, key)
    w, t, pet = rng.choice(W.WEATHER[:6]), rng.choice(("morning", "afternoon")), rng.choice(W.PET_KINDS[:3])
    comp = rng.choice(
        (f"{a.his} friend {b.name}", f"{a.his} {g.role}", f"{a.his} {pet} {rng.choice(W.PET_NAMES)}")
    )
    first = rng.choice((f"One {w} {t}, {a.name} went {place.to} with {comp}.",
                        f"On a {w} {t}, {a.name} and {comp} went {place.to}."))  # fmt: skip
    base = [(f"Where did {a.name} go?", f"{a.name} went {place.to}."), (f"Who went with {a.name}?", f"{_cap(comp)} went with {a.name}."),
            ("What was the weather like?", f"It was {w}.")]  # fmt: skip
    color, toy, ani = rng.choice(W.COLOR_ADJ), rng.choice(W.TOYS), W.ANIMALS[rng.choice(W.PLACES[key][6])][0]
    k, food, feel = W.NUMBER_WORDS[rng.randint(2, 6)], rng.choice(W.FOODS)[1], rng.choice(W.RC_FEELINGS)
    find, adj = rng.choice(W.RC_FINDS)
    found = article(f"{adj} {find}")
    pool = [
        (f"{a.name} brought {a.his} {color} {toy}.", [(f"What did {a.name} bring?", f"{a.name} brought {a.his} {color} {toy}."),
                                                      (f"What color was {a.name}'s {toy}?", f"{a.name}'s {toy} was {color}.")]),
        (f"{place.At}, they {place.act}.", [(f"What did they do {place.at}?", f"They {place.act}.")]),
        (f"{a.name} saw {k} {ani}.", [(f"How many {ani} did {a.name} see?", f"{a.name} saw {k} {ani}.")]),
        (f"Then they ate {food}.", [("What did they eat?", f"They ate {food}.")]),
        (f"{a.name} found {found} {place.hide}.", [(f"What did {a.name} find?", f"{a.name} found {found}."),
                                                   (f"Where did {a.name} find the {find}?", f"{a.name} found the {find} {place.hide}.")]),
        (rng.choice((f"At the end of the day, {a.name} felt {feel}.", f"{a.name} felt {feel} at the end of the day.")),
         [(f"How did {a.name} feel?", f"{a.name} felt {feel}.")]),
    ]  # fmt: skip
    chosen = sorted(rng.sample(range(len(pool)), n_extra))
    extra = [p for i in chosen for p in pool[i][1]]
    qa = [*rng.sample(extra, min(len(extra), 3)), *rng.sample(base, 2)]
    rng.shuffle(qa)
    return " ".join([first] + [pool[i][0] for i in chosen]), qa


# ---------------------------------------------------------------------------------------------- dialogue documents
def _quoted(speaker: str, text: str, rng: random.Random) -> str:
    """``Mia asked, "...?"`` or ``"...," said Tom.``"""
    verb = "asked" if text.endswith("?") else "said"
    if text.endswith(("?", "!")) or rng.random() < 0.5:
        return f'{speaker} {verb}, "{text}"'
    return f'"{text[:-1]}," {verb} {speaker}.'


def _doc_qa_list(rng: random.Random) -> str:
    blocks: list[str] = []
    for _ in range(rng.randint(3, 7)):
        pairs = _qa(rng)
        n = 1 + (rng.random() < 0.3) + (rng.random() < 0.1)
        blocks += [f"Question: {q}\nAnswer: {a}" for q, a in pairs[:n]]
    return "\n\n".join(blocks)


def _doc_conversation(rng: random.Random) -> str:
    """A child asks an adult (or a friend) questions about things around them."""
    (a, b), g, key = _kids(rng, 2), _adult(rng), rng.choice(tuple(W.PLACES))
    place = _place(rng, key)
    friend = rng.random() < 0.3
    who, other = (b.name, b.name) if friend else (g.name, f"{a.his} {g.role}")
    day = f"{rng.choice(W.WEATHER)} {rng.choice(W.TIMES)}"
    lines = [rng.choice((f"{a.name} and {other} were {place.at}.", f"One {day}, {a.name} went {place.to} with {other}.",
                         f"{a.name} liked to ask questions."))]  # fmt: skip
    topics = []
    animals = [k for k in W.PLACES[key][6] if W.ANIMALS[k][1]]
    if animals and rng.random() < 0.7:
        ani = rng.choice(animals)
        lines.append(f"{a.name} saw {article(ani)}.")
        topics.append(_qa(rng, group=_KB["animal"][_ANIMAL_KEYS.index(ani)]))
    topics += [_qa(rng) for _ in range(max(1, rng.randint(1, 3) - len(topics)))]
    for pairs in topics:
        for j, (q, ans) in enumerate(pairs[: rng.randint(1, 3)]):
            then = "Then " if j and rng.random() < 0.3 else ""
            asker = a.He if j and rng.random() < 0.5 else then + a.name
            lines += [_quoted(asker, q, rng), _quoted(who, ans, rng)]
    lines.append(rng.choice((f'"Thank you, {who}!" said {a.name}.', f"{a.name} liked learning new things.",
                             f"{a.name} smiled. Now {a.he} knew so many things!")))  # fmt: skip
    return " ".join(lines)


def _doc_rc(rng: random.Random) -> str:
    story, qa = _rc(rng, rng.randint(3, 5))
    return story + "\n\n" + "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in qa[: rng.randint(2, 4)])


_DIALOGUES = {"qa": _doc_qa_list, "conversation": _doc_conversation, "reading": _doc_rc}


def _documents(seed: int) -> Iterator[tuple[str, str]]:
    """Endless ``(kind, text)`` documents; kind is "story", "qa", "conversation" or "reading".

    Stories are chosen whenever they are at most 70% of the bytes so far, so the mix holds at any length.
    """
    rng = random.Random(f"kititans-builtin-corpus-{seed}")
    total = story_bytes = 0
    while True:
        if story_bytes <= 0.7 * total:
            kind, doc = "story", _story(rng)
            story_bytes += len(doc)
        else:
            kind = rng.choices(tuple(_DIALOGUES), (35, 25, 40))[0]
            doc = _DIALOGUES[kind](rng)
        total += len(doc)  # ASCII only, so characters == UTF-8 bytes
        yield kind, doc


def generate_corpus(seed: int = 0, target_bytes: int = 6_000_000) -> list[str]:
    """Documents (stories and Q/A dialogues, plain ASCII text) whose total UTF-8 size is >= ``target_bytes``.

    Stops at the first document that reaches the target; the same seed gives an identical list (and a
    smaller target a prefix of it). About 70% of the bytes are stories, 30% dialogues (Q/A lists,
    conversations with questions, reading comprehension).
    """
    docs: list[str] = []
    total = 0
    for _kind, doc in _documents(seed):
        if total >= target_bytes:
            break
        docs.append(doc)
        total += len(doc)
    return docs


# ---------------------------------------------------------------------------------------------- chat
def _mini_story(rng: random.Random, name: str, kind: str, gender: str) -> tuple[str, list[Pair]]:
    """A 40-120 word story about ``name`` the ``kind`` (an animal, girl, boy or kid) and Q/A about it."""
    p, animal = Person(name, gender), W.ANIMALS.get(kind)
    place = _place(rng, rng.choice(W.RC_PLACES))
    fear, (fn, fpl), k2 = rng.choice(W.FEARS), rng.choice(W.FOODS), rng.choice(_ANIMAL_KEYS)
    f: dict[str, object] = {key: rng.choice(options) for key, options in W.MINI_CHOICES.items()}
    f.update(
        N=name, p=p, k=kind, ka=article(kind), k2a=article(k2), fear=fear[0], did=fear[2], fpl=fpl, fn=fn
    )
    f.update(home=animal[3] if animal else rng.choice(W.MINI_HOMES), food=animal[4] if animal else fpl)
    f.update(
        sound=(animal and animal[1]) or "", N2=rng.choice([n for n in (*_NAMES, *W.PET_NAMES) if n != name])
    )
    f.update(toy=f"{rng.choice(W.COLOR_ADJ)} {rng.choice(W.TOYS)}", at=place.at, to=place.to, hide=place.hide)
    f.update(
        act=place.act, sight=place.sight, num=W.NUMBER_WORDS[rng.randint(2, 5)], Sound=_cap(str(f["sound"]))
    )
    parts = [rng.choice(W.MINI_INTRO)]
    qa = [
        ("What was the {k}'s name?", "The {k}'s name was {N}."),
        ("Who is the story about?", "The story is about {ka} named {N}."),
    ]
    if "{home}" not in parts[0] and rng.random() < 0.6:
        parts.append("{p.He} lived {home}.")
    if "{home}" in " ".join(parts):
        qa.append(("Where did {N} live?", "{N} lived {home}."))
    if rng.random() < 0.6:
        parts.append("{N} loved to eat {food}.")
        qa.append(("What did {N} like to eat?", "{N} liked to eat {food}."))
    if f["sound"] and rng.random() < 0.5:
        parts.append('Every morning, {N} said, "{Sound}!"')
        qa.append(("What did {N} say every morning?", '{N} said, "{Sound}!"'))
    extras = rng.sample(W.MINI_EXTRA, len(W.MINI_EXTRA))
    if rng.random() < 0.5:
        parts.append(extras.pop())
    plot, plot_qa = W.MINI_PLOTS[rng.choice(tuple(W.MINI_PLOTS))]
    parts += [plot, rng.choice(W.MINI_END)]
    qa += [*plot_qa, ("How did {N} feel at the end?", "{N} felt {feel}.")]
    if rng.random() < 0.3:
        parts.append(rng.choice(("It was a very good day.", "The end.")))
    while len(" ".join(parts).split()) < 45 and extras:  # templates have fewer words than the text
        parts.insert(rng.randint(1, len(parts) - 2), extras.pop())
    return " ".join(_cap(s.format(**f)) for s in parts), [(q.format(**f), a.format(**f)) for q, a in qa]


def _chat_story(rng: random.Random) -> list[Pair]:
    if rng.random() < 0.3:
        name = rng.choice(_NAMES)
        gender = _GENDER[name]
        kind = _PRONOUNS[gender][4]
    else:
        kind, name = rng.choice(_ANIMAL_KEYS), rng.choice((*_NAMES, *W.PET_NAMES))
        gender = _GENDER.get(name) or rng.choice("fm")
    req = rng.choice(W.STORY_REQ_NAMED if rng.random() < 0.8 else W.STORY_REQ_FREE)
    story, qa = _mini_story(rng, name, kind, gender)
    prefix = rng.choice(
        ("", "", "", "Sure! ", "Here is a short story.\n\n", f"Here is a story about {name}.\n\n")
    )
    return [(req.format(N=name, k=kind, ka=article(kind)), prefix + story), *rng.sample(qa, 2)]


def _chat_rc(rng: random.Random) -> list[Pair]:
    story, qa = _rc(rng, rng.randint(1, 3))
    return [(rng.choice(W.RC_ASK).format(story=story, q=qa[0][0]), qa[0][1]), *qa[1:3]]


def _chat_talk(rng: random.Random) -> list[Pair]:
    """Small talk; in longer conversations a greeting followed by questions."""
    return [rng.choice(W.SMALL_TALK if rng.random() < 0.6 else W.GREETINGS), *_qa(rng)[:2]]


def _casual(rng: random.Random, q: str) -> str:
    """Now and then write a question the way people type it: lower case, no question mark."""
    if rng.random() < 0.05 and "\n" not in q and q[:1].isupper() and q.split()[0] not in _NAMES:
        return q[0].lower() + q[1:].rstrip("?.")
    return q


def generate_chat_examples(seed: int = 0, n: int = 5000) -> list[list[dict[str, str]]]:
    """``n`` chat conversations in the same small world (and with the same facts) as :func:`generate_corpus`.

    Each is a list of ``{"role", "content"}`` messages: an optional system message (~20%), then
    user/assistant turns (~75% single-turn, ~25% two or three turns), ending with the assistant.
    The same seed gives identical output; another seed gives mostly different conversations.
    """
    rng = random.Random(f"kititans-builtin-chat-{seed}")
    kinds = (_qa, _chat_story, _chat_rc, _chat_talk, _qa_word_problem)
    weights = (50, 18, 20, 8, 4)
    out: list[list[dict[str, str]]] = []
    for _ in range(n):
        r = rng.random()
        turns = 1 if r < 0.75 else 2 if r < 0.9 else 3
        pairs = rng.choices(kinds, weights)[0](rng)[:turns]
        if len(pairs) > 1 and rng.random() < 0.2:
            pairs[-1] = (rng.choice(W.THANKS_USER), rng.choice(W.THANKS_REPLY))
        msgs = [{"role": "system", "content": rng.choice(W.SYSTEM_PROMPTS)}] if rng.random() < 0.2 else []
        for q, a in pairs:
            msgs.append({"role": "user", "content": _casual(rng, q).strip()})
            msgs.append({"role": "assistant", "content": a.strip()})
        out.append(msgs)
    return out
