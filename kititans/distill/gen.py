"""`kititans distill gen`: multi-turn conversations written by a teacher behind an OpenAI-compatible endpoint.

The teacher plays the assistant. The user side comes from the seed (a prompt, or opening messages) and, for a
topic or for every later turn, from the user model (`--user-model`, default: the teacher's endpoint) playing a
persona. Conversations run concurrently (asyncio, at most --concurrency in flight, each one request at a
time), pass the filters (kititans/distill/filters.py), optionally get a judge's 1-10 score, and are appended
to --out as `messages` records (the format `kititans sft` reads) with their provenance.

Resumable: every task has a stable id (seed id + sample number). A re-run reads the ids already kept (--out) or
rejected by a filter (OUT.rejected) and skips them; the duplicate filters are rebuilt from the kept records.
A conversation that failed on a request error is not recorded, so the next run retries it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kititans.distill import judge as J
from kititans.distill.client import Endpoint, EndpointConfig, EndpointError, HttpError, Reply, open_client
from kititans.distill.filters import FilterConfig, Filters
from kititans.distill.records import Appender, read_records, repair
from kititans.distill.seeds import Cast, Persona, Seed, Seeds
from kititans.errors import KititansError
from kititans.files import write_json

LANGUAGES = {"ja": "Japanese", "en": "English", "zh": "Chinese", "ko": "Korean", "fr": "French",
             "de": "German", "es": "Spanish", "ru": "Russian", "it": "Italian", "pt": "Portuguese"}  # fmt: skip
FATAL_STATUS = {401, 403, 404, 405}
GIVE_UP = 10  # with --n and no --per-seed: stop after this many rejections per conversation wanted
MAX_EARLY_ERRORS = 10  # request errors before any conversation succeeded: a misconfiguration, stop


@dataclass
class GenConfig:
    teacher: EndpointConfig
    seeds: Seeds
    out: Path
    user: EndpointConfig | None = None  # default: the teacher's endpoint
    judge: EndpointConfig | None = None
    cast: Cast = field(default_factory=Cast)
    turns: tuple[int, int] = (1, 1)
    n: int | None = None  # conversations to keep (default: per_seed per seed)
    per_seed: int | None = None  # conversations per seed at most (default: 1, or as many passes as --n needs)
    concurrency: int = 8
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    user_temperature: float = 1.0
    user_max_tokens: int = 128
    language: str | None = None
    filters: FilterConfig = field(default_factory=FilterConfig)
    min_judge: int = 0
    seed: int = 0


@dataclass
class Task:
    id: str
    seed: Seed
    sample: int


@dataclass
class Chat:
    messages: list[dict[str, str]]
    finish: list[str | None]
    persona: Persona | None
    teacher_tokens: int = 0
    user_tokens: int = 0


@dataclass
class GenReport:
    out: Path
    kept: int  # in the file, this run's and earlier runs'
    new: int
    counts: Counter[str]  # this run: kept and each rejection reason
    tokens: int  # completion tokens (teacher + user model) this run
    seconds: float
    requests: int = 0
    retried: int = 0
    done: bool = True  # False: the seeds ran out before --n

    @property
    def conversations_per_min(self) -> float:
        return 60 * sum(self.counts.values()) / max(self.seconds, 1e-9)


def sidecar(out: Path, name: str) -> Path:
    """OUT.rejected / OUT.stats: suffixes `kititans sft` and `kititans data` do not read as data."""
    return out.with_name(f"{out.name}.{name}")


def parse_turns(text: str) -> tuple[int, int]:
    lo, _, hi = str(text).partition("-")
    try:
        a, b = int(lo), int(hi or lo)
    except ValueError:
        raise KititansError(f"--turns must be N or LO-HI (e.g. 2-6), got {text!r}") from None
    if not 1 <= a <= b:
        raise KititansError(f"--turns must be at least 1 and LO <= HI, got {text!r}")
    return a, b


def tasks(seeds: Seeds, per_seed: int | None, skip: set[str]) -> Iterator[Task]:
    """Pass after pass over the seeds (sample 0, 1, ...): `per_seed` passes, or endless (None)."""
    sample = 0
    while per_seed is None or sample < per_seed:
        for s in seeds.items:
            tid = f"{s.id}-{sample}"
            if tid not in skip:
                yield Task(tid, s, sample)
        sample += 1


# ------------------------------------------------------------------------------------------ one chat
def _user_system(persona: Persona | None, topic: str, language: str | None) -> str:
    lang = f" in {LANGUAGES.get(language, language)}" if language else ""
    who = f" You are this person: {persona.description}" if persona else ""
    about = f" The conversation is about: {topic}" if topic else ""
    return (
        "You play the user in a conversation with an AI assistant." + who + about + " Write only the "
        f"user's next message{lang}: no role labels, no quotes, no explanation; one to three sentences."
    )


def clean_user_text(text: str) -> str:
    text = text.strip()
    for label in ("User:", "user:", "USER:", "ユーザー:", "ユーザー："):
        if text.startswith(label):
            text = text[len(label) :].strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'「":
        text = text[1:-1].strip()
    return text


class Conversation:
    """Runs one task: user and assistant turns through the endpoints."""

    def __init__(self, run: Generator, task: Task):
        self.run, self.task, c = run, task, run.cfg
        self.rng = random.Random(f"{c.seed}:{task.id}")
        self.turns = self.rng.randint(*c.turns)
        cast = c.cast
        self.system = self.rng.choice(cast.system_prompts) if cast.system_prompts else None
        self.persona = self.rng.choice(cast.personas) if cast.personas else None

    def _sampling(self, temperature: float, max_tokens: int, top_p: float = 1.0) -> dict[str, Any]:
        out: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens}
        if top_p < 1.0:
            out["top_p"] = top_p
        out["seed"] = self.rng.randrange(1 << 31)
        return out

    async def _user(self, chat: Chat) -> str:
        c, seed = self.run.cfg, self.task.seed
        topic = seed.text if seed.kind == "topic" else ""
        msgs = [{"role": "system", "content": _user_system(self.persona, topic, c.language)}]
        msgs.append({"role": "user", "content": "Write your first message to the assistant."})
        flip = {"user": "assistant", "assistant": "user"}
        msgs += [
            {"role": flip[m["role"]], "content": m["content"]} for m in chat.messages if m["role"] in flip
        ]
        reply = await self.run.user.chat(msgs, self._sampling(c.user_temperature, c.user_max_tokens))
        chat.user_tokens += reply.completion_tokens or 0
        return clean_user_text(reply.text)

    async def run_chat(self) -> Chat:
        c, seed = self.run.cfg, self.task.seed
        msgs: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        if seed.kind == "messages":
            msgs = [dict(m) for m in seed.messages]
            if self.system and msgs[0]["role"] != "system":
                msgs.insert(0, {"role": "system", "content": self.system})
        elif seed.kind == "prompt":
            msgs.append({"role": "user", "content": seed.text})
        chat = Chat(msgs, [], self.persona)
        for turn in range(self.turns):
            if turn > 0 or seed.kind == "topic":
                text = await self._user(chat)
                msgs.append({"role": "user", "content": text})
                if not text:
                    break  # the user model had nothing to say: the "empty" filter rejects the chat
            reply: Reply = await self.run.teacher.chat(
                msgs, self._sampling(c.temperature, c.max_tokens, c.top_p)
            )
            chat.teacher_tokens += reply.completion_tokens or 0
            msgs.append({"role": "assistant", "content": reply.text.strip()})
            chat.finish.append(reply.finish_reason)
        return chat


# ------------------------------------------------------------------------------------------ the run
class Generator:
    def __init__(self, cfg: GenConfig):
        self.cfg = cfg
        self.filters = Filters(cfg.filters)
        self.kept_before, self.rejected_before = 0, Counter()
        self.done: set[str] = set()
        self.counts: Counter[str] = Counter()
        self.tokens = 0
        self.fatal: BaseException | None = None
        self.errors: list[str] = []
        self.workers: list[asyncio.Task] = []

    def load_previous(self) -> None:
        """Ids already kept or rejected, and the duplicate filters rebuilt from the kept records."""
        out, rej = self.cfg.out, sidecar(self.cfg.out, "rejected")
        repair(out)
        repair(rej)
        for rec in read_records(out):
            if "id" in rec and isinstance(rec.get("messages"), list):
                self.done.add(str(rec["id"]))
                self.filters.dedup(rec["messages"])
                self.kept_before += 1
        for rec in read_records(rej):
            self.done.add(str(rec.get("id")))
            self.rejected_before[str(rec.get("reason"))] += 1

    def target(self) -> int:
        c = self.cfg
        return c.n if c.n is not None else len(c.seeds) * (c.per_seed or 1)

    def rejected(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "kept")

    @property
    def kept(self) -> int:
        return self.kept_before + self.counts["kept"]

    def record(self, task: Task, chat: Chat, score: J.Score | None) -> dict[str, Any]:
        c = self.cfg
        rec: dict[str, Any] = {"id": task.id, "messages": chat.messages, "seed_id": task.seed.id}
        rec["sample"] = task.sample
        rec["persona"] = chat.persona.name if chat.persona else None
        rec["teacher"] = {"url": c.teacher.url, "model": self.teacher.model}
        if self.user_used:
            rec["user_model"] = {"url": self.user.cfg.url, "model": self.user.model}
        rec["sampling"] = {"temperature": c.temperature, "top_p": c.top_p, "max_tokens": c.max_tokens,
                           "user_temperature": c.user_temperature, "user_max_tokens": c.user_max_tokens,
                           "seed": c.seed}  # fmt: skip
        rec["language"] = c.language
        rec["filters"] = self.filters.applied()
        if score is not None:
            rec["judge"] = {"score": score.value, "model": self.judge.model if self.judge else None}
        rec["usage"] = {"teacher_tokens": chat.teacher_tokens, "user_tokens": chat.user_tokens}
        return rec

    async def one(self, task: Task, out: Appender, rej: Appender) -> None:
        try:
            chat = await Conversation(self, task).run_chat()
        except HttpError as e:
            finished = sum(v for k, v in self.counts.items() if k != "request_error")
            if e.status in FATAL_STATUS or (not finished and len(self.errors) + 1 >= MAX_EARLY_ERRORS):
                raise
            self.errors.append(str(e))
            self.counts["request_error"] += 1
            return
        self.tokens += chat.teacher_tokens + chat.user_tokens
        if self.kept >= self.target():
            return  # enough kept meanwhile: not recorded, a later run with a larger --n redoes it
        reason = self.filters.check(chat.messages, chat.finish)
        score = None
        if reason is None and self.judge is not None:
            score = await J.judge(self.judge, chat.messages)
            if self.cfg.min_judge and (score.value is None or score.value < self.cfg.min_judge):
                self.filters.counts["kept"] -= 1
                reason = "judge"
        if reason is None:
            out.write(self.record(task, chat, score))
            self.counts["kept"] += 1
        else:
            rej.write({"id": task.id, "seed_id": task.seed.id, "reason": reason, "messages": chat.messages})
            self.counts[reason] += 1

    async def worker(self, it: Iterator[Task], out: Appender, rej: Appender, bar: Any) -> None:
        while self.fatal is None and self.kept < self.target():
            if self.rejected() > GIVE_UP * self.target() + 100:
                return  # the filters reject nearly everything: stop cycling through the seeds
            task = next(it, None)
            if task is None:
                return
            try:
                await self.one(task, out, rej)
            except (EndpointError, HttpError, KititansError) as e:
                self.fatal = self.fatal or e
                for w in self.workers:  # the others stop now, not after their own retries
                    if w is not asyncio.current_task():
                        w.cancel()
                return
            bar.update(self.kept - bar.n)
            elapsed = max(time.perf_counter() - self.t0, 1e-9)
            bar.set_postfix(rejected=self.rejected(), tok_s=f"{self.tokens / elapsed:,.0f}", refresh=False)

    async def main(self, progress: bool) -> GenReport:
        from tqdm import tqdm

        c = self.cfg
        self.load_previous()
        self.t0 = time.perf_counter()
        async with open_client(c.concurrency + 2, c.teacher.timeout) as client:
            self.teacher = Endpoint(c.teacher, client, "teacher")
            await self.teacher.resolve_model()
            ucfg = c.user or c.teacher
            self.user = self.teacher if ucfg is c.teacher else Endpoint(ucfg, client, "user-model")
            await self.user.resolve_model()
            self.user_used = c.turns[1] > 1 or any(s.kind == "topic" for s in c.seeds.items)
            self.judge = Endpoint(c.judge, client, "judge") if c.judge else None
            if self.judge is not None:
                await self.judge.resolve_model()
            it = tasks(c.seeds, c.per_seed if c.n is not None else (c.per_seed or 1), self.done)
            bar = tqdm(total=self.target(), initial=min(self.kept, self.target()), unit="conv",
                       desc="distill gen", disable=not progress, dynamic_ncols=True)  # fmt: skip
            with bar, Appender(c.out, "conversations") as out, Appender(sidecar(c.out, "rejected")) as rej:
                self.workers = [
                    asyncio.create_task(self.worker(it, out, rej, bar)) for _ in range(c.concurrency)
                ]
                try:
                    for r in await asyncio.gather(*self.workers, return_exceptions=True):
                        if isinstance(r, Exception):
                            raise r  # a failure outside the request/record path: not swallowed
                finally:
                    for w in self.workers:
                        w.cancel()
                    self.write_stats()
            if self.fatal is not None:
                raise KititansError(
                    f"{self.fatal} ({self.kept} conversations in {c.out}; re-run to continue)"
                )
            reqs = sum(e.requests for e in {self.teacher, self.user, self.judge} if e is not None)
            retried = sum(e.retried for e in {self.teacher, self.user, self.judge} if e is not None)
        return GenReport(c.out, self.kept, self.counts["kept"], self.counts, self.tokens,
                         time.perf_counter() - self.t0, reqs, retried, self.kept >= self.target())  # fmt: skip

    def write_stats(self) -> None:
        total = self.rejected_before + Counter({k: v for k, v in self.counts.items() if k != "kept"})
        write_json(
            sidecar(self.cfg.out, "stats"),
            {"kept": self.kept, "rejected": dict(total), "this_run": dict(self.counts),
             "filters": self.filters.applied(), "tokens_this_run": self.tokens,
             "seconds_this_run": round(time.perf_counter() - self.t0, 3),
             "request_errors": self.errors[-5:]},
        )  # fmt: skip


def generate(cfg: GenConfig, progress: bool = True) -> GenReport:
    """Run (or continue) a generation; see the module docstring."""
    if cfg.concurrency < 1:
        raise KititansError(f"--concurrency must be >= 1, got {cfg.concurrency}")
    if cfg.n is not None and cfg.n < 1:
        raise KititansError(f"--n must be >= 1, got {cfg.n}")
    if cfg.per_seed is not None and cfg.per_seed < 1:
        raise KititansError(f"--per-seed must be >= 1, got {cfg.per_seed}")
    if cfg.out.suffix.lower() not in (".jsonl", ".json"):
        raise KititansError(f"--out {cfg.out}: use a .jsonl name (the chat format `kititans sft` reads)")
    return asyncio.run(Generator(cfg).main(progress))
