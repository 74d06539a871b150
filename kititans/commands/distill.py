"""kititans distill: learn from a teacher. Three forms:

kititans distill gen ...            teacher-written chats from an OpenAI-compatible endpoint (-> kititans sft)
kititans distill score ...          teacher top-k log-probs of given chats from an endpoint that returns them
kititans distill RUN --teacher T    logit distillation from a KiTitans teacher run (or --teacher-scores DIR)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from kititans.commands.common import add_reset_schedule
from kititans.errors import KititansError

HELP = "distillation: teacher-written chats (gen), teacher log-probs (score), logit distillation (RUN)"
EXAMPLES = """  kititans distill gen --teacher http://127.0.0.1:8080/v1 --seeds topics.txt --personas personas.yaml \\
      --turns 2-6 --n 5000 --concurrency 16 --language ja --out chats.jsonl   # resumable: re-run to continue
  kititans sft runs/base --data chats.jsonl                                  # then the usual SFT
  kititans distill score chats.jsonl --teacher http://127.0.0.1:8000/v1 --tokenizer runs/base --out scored/
  kititans distill runs/student --teacher-scores scored/                     # train on the stored log-probs
  kititans distill runs/student --teacher runs/big --alpha 0.5 --temperature 2   # logit KD, same tokenizer

each form has its own flags: kititans distill gen --help, kititans distill score --help, kititans distill RUN --help"""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="gen | score | RUN", help="what to do (see the examples)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the flags of that form")


def _parser(prog: str, description: str, examples: str) -> argparse.ArgumentParser:
    from kititans.cli import Parser

    return Parser(
        prog=prog,
        description=f"{description}\n\nexamples:\n{examples}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# ---------------------------------------------------------------------------------------------- gen
GEN_EXAMPLES = """  kititans distill gen --teacher http://127.0.0.1:8080/v1 --seeds topics_ja.txt --personas personas.yaml \\
      --turns 2-6 --n 50000 --concurrency 16 --language ja --out chats_ja.jsonl
  kititans distill gen --teacher http://127.0.0.1:8080/v1 --seeds prompts.txt --seeds-as prompts --out chats.jsonl
  kititans distill gen --teacher https://api.example.com/v1 --teacher-model big --api-key "$KEY" \\
      --user-model http://127.0.0.1:8081/v1 --seeds openings.jsonl --judge http://127.0.0.1:8080/v1 --out c.jsonl
  kititans distill gen --teacher http://127.0.0.1:8080/v1 --corpus docs/ --corpus-every 10 --n 1000 --out c.jsonl

Output: one {"messages": [...], "id", "seed_id", "teacher", "sampling", "filters", "judge"?, ...} record per
line (the format `kititans sft --data` reads); OUT.rejected holds what the filters dropped and why, OUT.stats
the counts. Killed or failed? Run the same command again: it continues without duplicates."""


def gen_parser() -> argparse.ArgumentParser:
    p = _parser(
        "kititans distill gen",
        "teacher-written multi-turn chats from an OpenAI-compatible endpoint",
        GEN_EXAMPLES,
    )
    e = p.add_argument_group("endpoints")
    e.add_argument("--teacher", required=True, metavar="URL", help="the teacher's base URL (…/v1)")
    e.add_argument("--teacher-model", help="model name to send (default: the first of GET /v1/models)")
    e.add_argument("--api-key", default=os.environ.get("KITITANS_TEACHER_KEY") or os.environ.get("OPENAI_API_KEY"),
                   help="Bearer key for every endpoint (default: $KITITANS_TEACHER_KEY, else $OPENAI_API_KEY)")  # fmt: skip
    e.add_argument("--user-model", metavar="URL", help="who plays the user (default: the teacher's endpoint)")
    e.add_argument("--user-model-name", help="model name for --user-model")
    e.add_argument("--judge", metavar="URL", help="score each kept chat 1-10 with this endpoint")
    e.add_argument("--judge-model", help="model name for --judge")
    e.add_argument("--min-judge", type=int, default=0, help="reject chats the judge scores below this")
    e.add_argument("--concurrency", type=int, default=8, help="conversations in flight (default 8)")
    e.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    e.add_argument("--retries", type=int, default=5, help="retries per request on errors/429/5xx (default 5)")
    e.add_argument("--backoff", type=float, default=1.0, help="first retry wait in s, doubling (default 1)")
    s = p.add_argument_group("seeds and cast")
    s.add_argument("--seeds", metavar="FILE", help="topics/prompts (.txt, one per line) or openings (.jsonl)")
    s.add_argument(
        "--seeds-as", choices=["topics", "prompts"], default="topics", help="how .txt lines are used"
    )
    s.add_argument("--corpus", nargs="+", metavar="SRC", help="draw topics from these documents")
    s.add_argument("--corpus-every", type=int, default=1, help="use every N-th corpus document (default 1)")
    s.add_argument("--personas", metavar="YAML", help="system_prompts and user personas")
    s.add_argument(
        "--system", action="append", metavar="TEXT", help="an assistant system prompt (repeatable)"
    )
    s.add_argument("--turns", default="1", help="user+assistant exchanges per chat: N or LO-HI (default 1)")
    s.add_argument("--n", type=int, help="conversations to keep (default: one per seed)")
    s.add_argument("--per-seed", type=int, help="conversations per seed at most (default: as --n needs)")
    s.add_argument(
        "--language", help="language code (ja, en, ...): the user model writes in it, filter keeps it"
    )
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.7, help="teacher temperature (default 0.7)")
    g.add_argument("--top-p", type=float, default=1.0, help="teacher top_p (default 1: off)")
    g.add_argument("--max-tokens", type=int, default=512, help="teacher tokens per turn (default 512)")
    g.add_argument("--user-temperature", type=float, default=1.0, help="user model temperature (default 1)")
    g.add_argument(
        "--user-max-tokens", type=int, default=128, help="user model tokens per turn (default 128)"
    )
    g.add_argument("--seed", type=int, default=0, help="base of every request's seed (default 0)")
    f = p.add_argument_group("filters")
    f.add_argument("--min-chars", type=int, default=2, help="shortest assistant reply kept (default 2)")
    f.add_argument("--max-chars", type=int, default=20000, help="longest assistant reply kept")
    f.add_argument(
        "--max-repeat", type=float, default=0.5, help="repeated 10-char windows share (default 0.5)"
    )
    f.add_argument("--near-dup", type=float, default=0.85, help="MinHash Jaccard threshold; 0 = off")
    f.add_argument("--min-language-share", type=float, default=0.6, help="letters in --language's script")
    f.add_argument("--keep-truncated", action="store_true", help="keep replies cut by --max-tokens")
    f.add_argument("--no-refusal-filter", action="store_true", help="keep replies that refuse")
    p.add_argument("--out", required=True, type=Path, help="output .jsonl (appended to; resumable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def run_gen(argv: list[str]) -> int:
    from kititans.distill.client import EndpointConfig
    from kititans.distill.filters import FilterConfig
    from kititans.distill.gen import GenConfig, generate, parse_turns
    from kititans.distill.seeds import Seeds, load_cast

    a = gen_parser().parse_args(argv)

    def endpoint(url: str, model: str | None) -> EndpointConfig:
        return EndpointConfig(url, a.api_key, model, a.timeout, a.retries, a.backoff)

    cfg = GenConfig(
        teacher=endpoint(a.teacher, a.teacher_model),
        seeds=Seeds(a.seeds, a.seeds_as, a.corpus, a.corpus_every),
        out=a.out,
        user=endpoint(a.user_model, a.user_model_name) if a.user_model else None,
        judge=endpoint(a.judge, a.judge_model) if a.judge else None,
        cast=load_cast(a.personas, a.system),
        turns=parse_turns(a.turns), n=a.n, per_seed=a.per_seed, concurrency=a.concurrency,
        temperature=a.temperature, top_p=a.top_p, max_tokens=a.max_tokens,
        user_temperature=a.user_temperature, user_max_tokens=a.user_max_tokens, language=a.language,
        filters=FilterConfig(a.language, a.min_language_share, a.min_chars, a.max_chars, a.max_repeat,
                             not a.no_refusal_filter, a.keep_truncated, a.near_dup),
        min_judge=a.min_judge, seed=a.seed,
    )  # fmt: skip
    if a.user_model_name and not a.user_model:
        cfg.user = endpoint(a.teacher, a.user_model_name)
    r = generate(cfg, progress=not a.quiet)
    rejected = {k: v for k, v in r.counts.items() if k != "kept" and v}
    print(
        f"{r.out}: {r.kept} conversations ({r.new} new: {sum(r.counts.values())} finished in {r.seconds:.1f} s, "
        f"{r.conversations_per_min:.1f}/min, {r.tokens / max(r.seconds, 1e-9):,.0f} tokens/s; "
        f"{r.requests} requests, {r.retried} retried)"
    )
    print("rejected: " + (", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) or "none"))
    if not r.done:
        print("the seeds ran out before --n: add seeds, raise --per-seed, or relax the filters")
    print(f"next: kititans sft RUN --data {r.out}")
    return 0


# ---------------------------------------------------------------------------------------------- score
SCORE_EXAMPLES = """  kititans distill score chats.jsonl --teacher http://127.0.0.1:8000/v1 --tokenizer runs/student --out scored/
  kititans distill score data/*.jsonl --teacher http://gpu:8000/v1 --top-k 20 --concurrency 16 --out scored/
  kititans distill runs/student --teacher-scores scored/          # then train on them

The endpoint must serve a teacher with the student's tokenizer and return prompt log-probs: vLLM
(prompt_logprobs) or completions with echo + logprobs. Resumable: re-run the same command to continue."""


def score_parser() -> argparse.ArgumentParser:
    p = _parser(
        "kititans distill score", "teacher top-k log-probs of given chats, from an endpoint", SCORE_EXAMPLES
    )
    p.add_argument("data", nargs="+", help="chat files/dirs/globs (any format `kititans sft` reads)")
    p.add_argument("--teacher", required=True, metavar="URL", help="the endpoint's base URL (…/v1)")
    p.add_argument("--teacher-model", help="model name to send (default: the first of GET /v1/models)")
    p.add_argument(
        "--api-key", default=os.environ.get("KITITANS_TEACHER_KEY") or os.environ.get("OPENAI_API_KEY")
    )
    p.add_argument(
        "--tokenizer", required=True, type=Path, help="the student run (its tokenizer renders the chats)"
    )
    p.add_argument("--format", default="auto", help="chat data format (default: detected)")
    p.add_argument("--top-k", type=int, default=20, help="log-probs kept per token (default 20)")
    p.add_argument("--max-tokens", type=int, default=0, help="keep the first N tokens of each chat (0: all)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--shard-records", type=int, default=256, help="conversations per shard (default 256)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--retries", type=int, default=5, help="retries per request")
    p.add_argument("--out", required=True, type=Path, help="the scores folder (resumable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def run_score(argv: list[str]) -> int:
    from kititans.distill.client import EndpointConfig
    from kititans.distill.score import ScoreConfig, score

    a = score_parser().parse_args(argv)
    ep = EndpointConfig(a.teacher, a.api_key, a.teacher_model, a.timeout, a.retries)
    cfg = ScoreConfig(
        ep, a.data, a.tokenizer, a.out, a.top_k, a.max_tokens, a.concurrency, a.shard_records, a.format
    )
    r = score(cfg, progress=not a.quiet)
    print(
        f"{r.out}: {r.records} conversations, {r.tokens:,} tokens scored ({r.new} new in {r.seconds:.1f} s, "
        f"protocol {r.protocol}, {r.skipped} skipped)"
    )
    print(f"next: kititans distill {a.tokenizer} --teacher-scores {r.out}")
    return 0


# ---------------------------------------------------------------------------------------------- train
TRAIN_EXAMPLES = """  kititans distill runs/student --teacher runs/big --steps 2000        # -> runs/student-distill
  kititans distill runs/new --preset tiny --teacher runs/big --alpha 0.5 --temperature 2   # from scratch
  kititans distill runs/student --teacher runs/big --chat chats.jsonl  # on SFT data (assistant tokens)
  kititans distill runs/student --teacher-scores scored/               # stored teacher log-probs
  kititans distill runs/student-distill --resume --steps 4000 --reset-schedule   # longer: a new schedule

RUN is the student: an existing run (read only; the result goes to --out, default RUN-distill), or a new
directory with --preset (a student trained from scratch with the teacher's tokenizer). The teacher must share
the student's tokenizer; for any other teacher use sequence-level distillation (kititans distill gen)."""

TRAIN_FLAGS = {"optimizer": "optim.name", "lr": "optim.lr", "muon_lr": "optim.muon_lr", "steps": "train.steps",
               "batch_size": "train.batch_size", "seq_len": "train.seq_len", "device": "train.device",
               "dtype": "train.dtype", "compile": "train.compile", "reset_schedule": "train.reset_schedule"}  # fmt: skip


def train_parser() -> argparse.ArgumentParser:
    p = _parser(
        "kititans distill RUN", "logit distillation from a KiTitans teacher (same tokenizer)", TRAIN_EXAMPLES
    )
    p.add_argument("run", metavar="RUN", help="the student run, or a new run directory with --preset")
    p.add_argument("--teacher", type=Path, help="the teacher run directory (Lite or Titans)")
    p.add_argument("--teacher-scores", type=Path, help="a folder from `kititans distill score`")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term, 0..1 (default 0.5)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature T (default 1)")
    p.add_argument("--teacher-dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="the frozen teacher's weights (auto: bf16 on CUDA, fp16 on MPS, fp32 on CPU)")  # fmt: skip
    p.add_argument("--teacher-device", help="run the teacher here (default: the student's device)")
    p.add_argument("--preset", help="train a new student of this preset from scratch into RUN")
    p.add_argument("--tokenizer", type=Path, help="a new student's tokenizer (with --teacher-scores only)")
    p.add_argument("--chat", nargs="+", help="chat files: distil on SFT data (assistant tokens)")
    p.add_argument(
        "--data", nargs="+", help="pretraining data: files or prepared shards (default: the run's)"
    )
    p.add_argument("--out", type=Path, help="the new run directory (default RUN-distill; RUN with --preset)")
    p.add_argument("--optimizer", choices=["adamw", "muon"])
    p.add_argument("--lr", type=float)
    p.add_argument("--muon-lr", type=float)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--device", help="auto (cuda > mps > cpu), cpu, cuda, mps")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", choices=["auto", "on", "off"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    p.add_argument(
        "--resume", action="store_true", help="continue the distillation run (RUN-distill, --out or RUN)"
    )
    add_reset_schedule(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def resolve_train(a: argparse.Namespace) -> tuple[Any, Any, bool]:
    from kititans.checkpoint import read_meta
    from kititans.config import parse_set
    from kititans.models.spec import find_preset
    from kititans.train.distill import DistillSpec, distill_config, resume_spec

    layers: list[tuple[str, Any]] = parse_set(a.set)
    layers += [(k, getattr(a, f)) for f, k in TRAIN_FLAGS.items() if getattr(a, f) is not None]
    if a.data:
        layers.append(("data.sources", a.data))
    if a.chat:
        layers.append(("sft.data", a.chat))
    run = Path(a.run)
    if a.resume:
        own = run.is_dir() and isinstance(read_meta(run).get("distill"), dict)
        spec, cfg = resume_spec(a.out or (run if own else run.with_name(run.name + "-distill")), layers)
        return spec, cfg, True
    fresh = a.preset is not None
    if not fresh and not (run / "config.json").is_file():
        raise KititansError(f"{run} is not a run directory: pass --preset NAME to train a new student there")
    out = a.out or (run if fresh else run.with_name(run.name + "-distill"))
    spec = DistillSpec(run, out, a.teacher, a.teacher_scores, a.alpha, a.temperature, a.teacher_dtype,
                       a.teacher_device, fresh, list(a.chat or []), a.tokenizer)  # fmt: skip

    def hints(family: str | None, preset: str) -> tuple[str, list[tuple[str, Any]]]:
        s, p = find_preset(preset, family)
        return s.name, list(p.train.items())

    pre = [("preset", a.preset)] if fresh else []
    return spec, distill_config(spec, pre + layers, hints), False


def run_train(argv: list[str]) -> int:
    from kititans.train.distill import distill

    a = train_parser().parse_args(argv)
    spec, cfg, resume = resolve_train(a)
    r = distill(spec, cfg, resume=resume, progress=not a.quiet)
    mins, secs = divmod(int(r.seconds), 60)
    teacher = spec.teacher or spec.scores
    print(
        f"\nrun: {r.run_dir}  (distilled from {teacher}, a={spec.alpha}, T={spec.temperature}; step "
        f"{r.step}/{r.total_steps}, {r.tokens:,} tokens in {mins}m{secs:02d}s)"
    )
    if r.val_loss is not None:
        print(f"val loss: {r.val_loss:.4f}")
    if r.interrupted:
        print(f"interrupted; continue with: kititans distill {r.run_dir} --resume")
    return 130 if r.interrupted else 0


# ---------------------------------------------------------------------------------------------- dispatch
def run(args: argparse.Namespace) -> int:
    if args.target == "gen":
        return run_gen(args.rest)
    if args.target == "score":
        return run_score(args.rest)
    return run_train([args.target, *args.rest])
