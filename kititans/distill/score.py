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
            drop the leading BOS are aligned); sent with vLLM's return_tokens_as_token_ids, so strings are
            "token_id:N" where the server knows it, else they map by piece / decoded text when that names
            one id only (a shared string goes to the rest mass); the echoed token's string must be one of
            the prompt id's own (the tokenizer check)
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


def token_strings(tok: Any, i: int) -> set[str]:
    """The strings an endpoint may send for id i: "token_id:i" (vLLM's return_tokens_as_token_ids), the piece,
    the piece with its word-start mark as a space, the id decoded alone, a byte piece's character."""
    piece = tok.id_to_piece(i)
    out = {f"token_id:{i}", piece, piece.replace("\u2581", " "), tok.decode([i])}
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        out.add(bytes([int(piece[3:5], 16)]).decode("utf-8", "replace"))
    return out


def piece_table(tok: Any) -> dict[str, int]:
    """String -> id for the strings of token_strings that name one id only (others are ambiguous: dropped)."""
    table: dict[str, int] = {}
    ambiguous: set[str] = set()
    for i in range(tok.vocab_size):
        for s in token_strings(tok, i) - {f"token_id:{i}"}:
            if s in table and table[s] != i:
                ambiguous.add(s)
            table.setdefault(s, i)
    for s in ambiguous:
        del table[s]
    return table


def to_id(token: Any, table: dict[str, int]) -> int | None:
    s = str(token)
    if s.startswith("token_id:"):
        try:
            return int(s[9:])
        except ValueError:
            return None
    return table.get(s)


def row(entry: Any, k: int) -> tuple[list[int], list[float], float, set[int]]:
    """One position's {token id: logprob or {logprob, ...}} -> (top-k ids, their log-probs, log of the rest
    mass, every id in the dict)."""
    pairs: list[tuple[float, int]] = []
    for key, val in (entry or {}).items():
        lp = val.get("logprob") if isinstance(val, dict) else val
        tid = int(key) if str(key).lstrip("-").isdigit() else None
        if tid is not None and isinstance(lp, (int, float)) and math.isfinite(lp):
            pairs.append((float(lp), tid))
    pairs.sort(reverse=True)
    top = pairs[:k]
    mass = sum(math.exp(lp) for lp, _ in top)
    rest = math.log(max(1.0 - mass, 1e-12)) if top else 0.0
    return [t for _, t in top], [lp for lp, _ in top], rest, {t for _, t in pairs}


def pack(ids: list[int], mask: list[int], rows: list[Any], k: int) -> Scored:
    """The Scored record of a conversation from its id-keyed rows."""
    n = len(ids)
    tk = np.full((n, k), -1, dtype=np.int32)
    lp = np.full((n, k), -np.inf, dtype=np.float32)
    rest = np.zeros(n, dtype=np.float32)
    for i in range(1, n):
        t, p, r, _ = row(rows[i], k)
        tk[i, : len(t)], lp[i, : len(p)], rest[i] = t, p, r
    return Scored(np.asarray(ids, np.int32), np.asarray(mask, np.uint8), tk, lp, rest)


def _echo_rows(
    lp: dict[str, Any], ids: list[int], tok: Any, table: dict[str, int]
) -> tuple[list[Any], float]:
    """Echo's string-keyed rows -> id-keyed rows aligned with ids, and the share of prompt tokens whose echoed
    string is one of ours for that id (does the endpoint tokenize as we do?)."""
    top, tokens, chosen = lp["top_logprobs"], lp.get("tokens") or [], lp.get("token_logprobs") or []
    shift = 0 if len(top) > len(ids) else 1  # one row per prompt token plus the completion's; BOS dropped: -1
    rows: list[Any] = [None] * len(ids)
    agree = 0
    for i in range(max(shift, 1), len(ids)):
        j = i - shift
        d: dict[int, float] = {}
        for s, v in (top[j] or {}).items():
            tid = to_id(s, table)
            if tid is not None and isinstance(v, (int, float)):
                d[tid] = max(float(v), d.get(tid, -math.inf))
        if j < len(chosen) and isinstance(chosen[j], (int, float)):
            d[ids[i]] = float(chosen[j])  # the echoed token is ids[i]: its log-prob exactly
        rows[i] = d
        agree += j < len(tokens) and str(tokens[j]) in token_strings(tok, ids[i])
    return rows, agree / max(len(ids) - 1, 1)


async def ask(ep: Endpoint, ids: list[int], k: int, protocol: str, tok: Any, table: dict[str, int]) -> Any:
    """(id-keyed rows aligned with `ids`, tokenizer agreement), or None when this protocol gave no rows."""
    body: dict[str, Any] = {"model": ep.model, "prompt": ids, "max_tokens": 1, "temperature": 0}
    if protocol == "vllm":
        body["prompt_logprobs"] = k
    else:  # token_id:N strings where the server knows vLLM's flag; others ignore it
        body.update({"echo": True, "logprobs": k, "return_tokens_as_token_ids": True})
    data = await ep.request("POST", "/completions", body)
    choice = (data.get("choices") or [{}])[0] if isinstance(data, dict) else {}
    if protocol == "vllm":
        rows = choice.get("prompt_logprobs") or data.get("prompt_logprobs")
        if not isinstance(rows, list) or len(rows) < len(ids):
            return None
        rows = rows[: len(ids)]
        agree = sum(str(ids[i]) in (rows[i] or {}) for i in range(1, len(ids))) / max(len(ids) - 1, 1)
        return rows, agree
    lp = choice.get("logprobs") if isinstance(choice, dict) else None
    top = lp.get("top_logprobs") if isinstance(lp, dict) else None
    if not isinstance(top, list) or len(top) < len(ids) - 1:
        return None
    return _echo_rows(lp, ids, tok, table)


async def detect(ep: Endpoint, ids: list[int], k: int, tok: Any, table: dict[str, int]) -> str:
    """Which protocol the endpoint answers, or one line saying it returns no prompt log-probs."""
    said = []
    for protocol in ("vllm", "echo"):
        try:
            if await ask(ep, ids, k, protocol, tok, table) is not None:
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
                    m["protocol"] = await detect(ep, ids, cfg.top_k, tok, table)
                try:
                    got = await ask(ep, ids, cfg.top_k, m["protocol"], tok, table)
                except HttpError as e:
                    if e.status != 400:
                        raise
                    return None  # e.g. longer than the teacher's context: counted as skipped
            if got is None:
                raise EndpointError(f"{cfg.teacher.url} stopped returning prompt log-probs ({c.where})")
            rows, agree = got
            if agree < MIN_AGREE:
                raise KititansError(
                    f"{cfg.teacher.url} does not tokenize {c.where} as {cfg.tokenizer} does ({agree:.0%} of the "
                    "tokens agree): serve a teacher with this tokenizer, or use sequence-level distillation "
                    "(`kititans distill gen`)"
                )
            return pack(ids, mask, rows, cfg.top_k)

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
