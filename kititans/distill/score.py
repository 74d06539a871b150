"""`kititans distill score`: the teacher's top-k log-probabilities at every token of given chats, from an
endpoint that returns prompt log-probs, into a teacher-scores folder (kititans/distill/scores.py).

Each conversation is rendered with the chat template of --tokenizer (the student's, which must be the served
teacher's) and sent as token ids (`prompt: [ids]`, so the endpoint scores exactly these tokens) to
POST /v1/completions, asking, in this order:
  vLLM      {"prompt_logprobs": k, "max_tokens": 1}: choices[0].prompt_logprobs (or the top level's), one
            {token_id: {logprob, rank, decoded_token}} per prompt token, the first None; the prompt token
            itself is in each dict, which checks that the endpoint tokenizes as we do
  OpenAI    {"echo": true, "logprobs": k, "max_tokens": 1}: choices[0].logprobs {tokens, token_logprobs,
            top_logprobs [{token: logprob}]} over prompt + completion (llama-cpp-python style servers that
            drop the leading BOS are aligned); token strings map to ids by "token_id:N" or by the piece
An endpoint that answers neither is refused in one line.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kititans.distill.client import Endpoint, EndpointConfig, EndpointError, HttpError, open_client
from kititans.distill.scores import FORMAT, VERSION, Scored, read_manifest, save_manifest, write_shard
from kititans.errors import KititansError
from kititans.files import sha256_file

MIN_AGREE = 0.9  # share of prompt tokens the endpoint must echo back as ours


@dataclass
class ScoreConfig:
    teacher: EndpointConfig
    sources: list[str]
    tokenizer: Path
    out: Path
    top_k: int = 20
    max_tokens: int = 0  # 0: send whole conversations; else keep their first N tokens
    concurrency: int = 4
    shard_records: int = 256
    format: str = "auto"


@dataclass
class ScoreReport:
    out: Path
    records: int
    new: int
    tokens: int
    skipped: int
    protocol: str
    seconds: float


def piece_table(tok: Any) -> dict[str, int]:
    """Token strings an endpoint may send for our ids: "token_id:N", the piece, the piece with spaces."""
    table: dict[str, int] = {}
    ambiguous: set[str] = set()
    for i in range(tok.vocab_size):
        piece = tok.id_to_piece(i)
        for s in {piece, piece.replace("\u2581", " ")}:
            if s in table and table[s] != i:
                ambiguous.add(s)
            table.setdefault(s, i)
    for s in ambiguous:
        del table[s]
    return table


def to_id(token: Any, table: dict[str, int]) -> int | None:
    if isinstance(token, int):
        return token
    s = str(token)
    if s.startswith("token_id:"):
        try:
            return int(s[9:])
        except ValueError:
            return None
    return table.get(s)


def row(entry: Any, k: int, table: dict[str, int] | None) -> tuple[list[int], list[float], float, set[int]]:
    """One position's dict -> (top-k ids, their log-probs, log of the rest mass, every id in the dict).
    Keys are token ids (vLLM, table None) or token strings (echo)."""
    pairs: list[tuple[float, int]] = []
    for key, val in (entry or {}).items():
        lp = val.get("logprob") if isinstance(val, dict) else val
        if table is None:
            tid = int(key) if str(key).lstrip("-").isdigit() else None
        else:
            tid = to_id(key, table)
        if tid is not None and isinstance(lp, (int, float)) and math.isfinite(lp):
            pairs.append((float(lp), tid))
    pairs.sort(reverse=True)
    top = pairs[:k]
    mass = sum(math.exp(lp) for lp, _ in top)
    rest = math.log(max(1.0 - mass, 1e-12)) if top else 0.0
    return [t for _, t in top], [lp for lp, _ in top], rest, {t for _, t in pairs}


def pack(
    ids: list[int], mask: list[int], rows: list[Any], k: int, table: dict[str, int] | None
) -> tuple[Scored, float]:
    """The Scored record of a conversation, and the share of its tokens the rows name as present."""
    n = len(ids)
    tk = np.full((n, k), -1, dtype=np.int32)
    lp = np.full((n, k), -np.inf, dtype=np.float32)
    rest = np.zeros(n, dtype=np.float32)
    agree = 0
    for i in range(1, n):
        t, p, r, present = row(rows[i], k, table)
        tk[i, : len(t)], lp[i, : len(p)], rest[i] = t, p, r
        agree += ids[i] in present
    scored = Scored(np.asarray(ids, np.int32), np.asarray(mask, np.uint8), tk, lp, rest)
    return scored, agree / max(n - 1, 1)


async def ask(ep: Endpoint, ids: list[int], k: int, protocol: str) -> list[Any] | None:
    """The per-prompt-token rows of one request, aligned with `ids` (None: this protocol gave none)."""
    body: dict[str, Any] = {"model": ep.model, "prompt": ids, "max_tokens": 1, "temperature": 0}
    body.update({"prompt_logprobs": k} if protocol == "vllm" else {"echo": True, "logprobs": k})
    data = await ep.request("POST", "/completions", body)
    choice = (data.get("choices") or [{}])[0] if isinstance(data, dict) else {}
    if protocol == "vllm":
        rows = choice.get("prompt_logprobs") or data.get("prompt_logprobs")
        return rows[: len(ids)] if isinstance(rows, list) and len(rows) >= len(ids) else None
    lp = choice.get("logprobs") if isinstance(choice, dict) else None
    top = lp.get("top_logprobs") if isinstance(lp, dict) else None
    if not isinstance(top, list) or len(top) < len(ids) - 1:
        return None
    tokens = lp.get("tokens") or []
    # one row per prompt token plus the completion's; a server that drops the leading BOS sends one less
    shift = 0 if len(top) > len(ids) else 1
    rows = [None] * shift + top[: len(ids) - shift]
    for i in range(shift, len(ids)):  # the echoed token itself: present in its row, as vLLM does
        if isinstance(rows[i], dict) and i - shift < len(tokens) and tokens[i - shift] not in rows[i]:
            lps = lp.get("token_logprobs") or []
            if i - shift < len(lps) and isinstance(lps[i - shift], (int, float)):
                rows[i] = {**rows[i], tokens[i - shift]: lps[i - shift]}
    return rows


async def detect(ep: Endpoint, ids: list[int], k: int) -> str:
    """Which protocol the endpoint answers, or one line saying it returns no prompt log-probs."""
    said = []
    for protocol in ("vllm", "echo"):
        try:
            if await ask(ep, ids, k, protocol) is not None:
                return protocol
            said.append(f"{protocol}: no per-token log-probs in the answer")
        except HttpError as e:
            said.append(f"{protocol}: {str(e).split(': ', 1)[-1]}")
    raise EndpointError(
        f"{ep.cfg.url} returns no prompt log-probabilities ({'; '.join(said)}): serve the teacher with vLLM "
        "(prompt_logprobs) or an endpoint that answers completions with echo + logprobs"
    )


def _sources_digest(sources: list[str]) -> dict[str, str]:
    from kititans.data.readers import expand_sources

    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in expand_sources(list(sources))}


def _start_manifest(cfg: ScoreConfig, tok: Any, sha: str) -> dict[str, Any]:
    sources = _sources_digest(cfg.sources)
    if (cfg.out / "manifest.json").is_file():
        m = read_manifest(cfg.out)
        same = (m["sources"], m["tokenizer_sha256"], m["top_k"]) == (sources, sha, cfg.top_k)
        if not same:
            raise KititansError(
                f"{cfg.out} holds scores of other inputs (sources, tokenizer or --top-k differ): use another --out"
            )
        return m
    return {"format": FORMAT, "version": VERSION, "tokenizer_sha256": sha, "vocab_size": tok.vocab_size,
            "top_k": cfg.top_k, "max_tokens": cfg.max_tokens, "sources": sources, "teacher": {},
            "protocol": None, "records_done": 0, "skipped": 0, "shards": []}  # fmt: skip


async def _score(cfg: ScoreConfig, progress: bool) -> ScoreReport:
    from tqdm import tqdm

    from kititans.data.chat import render_conversation
    from kititans.data.chatdata import read_chat_data
    from kititans.data.tokenizer import Tokenizer

    tok = Tokenizer.load(cfg.tokenizer)
    m = _start_manifest(cfg, tok, sha256_file(tok.model_path))
    convs = read_chat_data(cfg.sources, cfg.format)
    table = piece_table(tok)
    t0, new, done0 = time.perf_counter(), 0, m["records_done"]
    async with open_client(cfg.concurrency, cfg.teacher.timeout) as client:
        ep = Endpoint(cfg.teacher, client, "teacher")
        m["teacher"] = {"url": cfg.teacher.url, "model": await ep.resolve_model()}
        sem = asyncio.Semaphore(cfg.concurrency)

        async def one(c: Any) -> Scored | None:
            ids, mask = render_conversation(tok, c.messages)
            if cfg.max_tokens:
                ids, mask = ids[: cfg.max_tokens], mask[: cfg.max_tokens]
            async with sem:
                if m["protocol"] is None:
                    m["protocol"] = await detect(ep, ids, cfg.top_k)
                try:
                    rows = await ask(ep, ids, cfg.top_k, m["protocol"])
                except HttpError as e:
                    if e.status != 400:
                        raise
                    return None  # e.g. longer than the teacher's context: counted as skipped
            if rows is None:
                raise EndpointError(f"{cfg.teacher.url} stopped returning prompt log-probs ({c.where})")
            scored, agree = pack(ids, mask, rows, cfg.top_k, None if m["protocol"] == "vllm" else table)
            if agree < MIN_AGREE:
                raise KititansError(
                    f"{cfg.teacher.url} does not tokenize {c.where} as {cfg.tokenizer} does ({agree:.0%} of the "
                    "tokens agree): serve a teacher with this tokenizer, or use sequence-level distillation "
                    "(`kititans distill gen`)"
                )
            return scored

        cfg.out.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=len(convs), initial=done0, unit="conv", desc="distill score", disable=not progress)
        with bar:
            for start in range(done0, len(convs), cfg.shard_records):
                block = convs[start : start + cfg.shard_records]
                if m["protocol"] is None and block:  # detect once before fanning out
                    first = await one(block[0])
                    rest = await asyncio.gather(*(one(c) for c in block[1:]))
                    got = [first, *rest]
                else:
                    got = list(await asyncio.gather(*(one(c) for c in block)))
                items = [g for g in got if g is not None]
                if items:
                    name = f"shard-{len(m['shards']):05d}.safetensors"
                    tokens = write_shard(cfg.out / name, items)
                    m["shards"].append({"file": name, "records": len(items), "tokens": tokens})
                m["records_done"] = start + len(block)
                m["skipped"] += len(got) - len(items)
                save_manifest(cfg.out, m)
                new += len(items)
                bar.update(len(block))
    return ScoreReport(cfg.out, sum(s["records"] for s in m["shards"]), new,
                       sum(s["tokens"] for s in m["shards"]), m["skipped"], m["protocol"] or "-",
                       time.perf_counter() - t0)  # fmt: skip


def score(cfg: ScoreConfig, progress: bool = True) -> ScoreReport:
    if not 1 <= cfg.top_k <= 100:
        raise KititansError(f"--top-k must be from 1 to 100, got {cfg.top_k}")
    if cfg.concurrency < 1 or cfg.shard_records < 1:
        raise KititansError("--concurrency and --shard-records must be >= 1")
    return asyncio.run(_score(cfg, progress))
