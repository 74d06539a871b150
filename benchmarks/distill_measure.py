"""Distillation measurements (docs/distill.md), every stage through the real CLI, scaled to a shared 2-core CPU:

  teacher   a wider/deeper Lite (--teacher-layers, --teacher-dim) pretrained --teacher-steps on the built-in corpus,
            then SFT'd on the built-in dialogues and served by `kititans serve`
  student   the `debug` shape (or --student-preset) with the teacher's tokenizer

sequence level: the student base SFT'd on N teacher-written chats (`kititans distill gen` from prompts of the
built-in dialogues) vs on the built-in dialogues, at equal training tokens; assistant-token loss on held-out
teacher chats, the end-token rate of replies to held-out prompts, a pairwise win rate judged by the teacher
endpoint (both orders, so position bias cancels); generation throughput at concurrency 1 and --concurrency.
logit level: the student trained from scratch alone vs with `kititans distill --teacher` at equal tokens: val loss,
seconds per step.

    python benchmarks/distill_measure.py --work /tmp/dm --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

JUDGE_CHARS = 300
CLI = [sys.executable, "-c", "from kititans.cli import main; raise SystemExit(main())"]


def sh(*args: str, quiet: bool = True) -> str:
    t0 = time.perf_counter()
    r = subprocess.run([*CLI, *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed: kititans {' '.join(args)}\n{r.stderr[-2000:]}")
    print(f"[{time.perf_counter() - t0:6.0f} s] kititans {' '.join(args)[:150]}", flush=True)
    return r.stdout


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def prompts_file(path: Path, seed: int, n: int) -> list[str]:
    from kititans.data.builtin import generate_chat_examples

    seen, out = set(), []
    for c in generate_chat_examples(seed, n * 4):
        u = next(m["content"] for m in c if m["role"] == "user")
        if u not in seen and "\n" not in u:
            seen.add(u)
            out.append(u)
        if len(out) == n:
            break
    path.write_text("".join(p + "\n" for p in out), encoding="utf-8")
    return out


def serve(run: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([*CLI, "serve", str(run), "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    while True:
        line = p.stderr.readline()
        if not line:
            raise SystemExit("serve exited")
        if " at http" in line:
            import threading

            threading.Thread(target=p.stderr.read, daemon=True).start()
            return p, line.split(" at ")[1].strip()


async def replies(url: str, prompts: list[str], max_tokens: int) -> list[tuple[str, str | None, float]]:
    from kititans.distill.client import Endpoint, EndpointConfig, open_client

    async with open_client(2, 300) as client:
        ep = Endpoint(EndpointConfig(url), client)
        await ep.resolve_model()
        out = []
        for p in prompts:  # one at a time: also the single-request speed
            t0 = time.perf_counter()
            r = await ep.chat(
                [{"role": "user", "content": p}], {"temperature": 0.0, "max_tokens": max_tokens}
            )
            out.append((r.text, r.finish_reason, time.perf_counter() - t0, r.completion_tokens or 0))
        return out


async def win_rate(judge_url: str, prompts: list[str], a: list[str], b: list[str]) -> dict[str, int]:
    from kititans.distill.client import Endpoint, EndpointConfig, HttpError, open_client
    from kititans.distill.judge import compare

    counts = {"a": 0, "b": 0, "tie": 0, "none": 0}
    async with open_client(2, 300) as client:
        ep = Endpoint(EndpointConfig(judge_url), client, "judge")
        await ep.resolve_model()
        for p, x, y in zip(prompts, a, b):
            x, y = x[:JUDGE_CHARS], y[:JUDGE_CHARS]  # a small judge's context holds both answers
            try:
                first = await compare(ep, p, x, y)
                second = await compare(ep, p, y, x)  # swapped: a verdict that follows the position cancels
            except HttpError:  # still longer than the judge's context
                counts["too_long"] = counts.get("too_long", 0) + 2
                continue
            second = {"a": "b", "b": "a"}.get(second or "", second)
            for v in (first, second):
                counts[v or "none"] += 1
    return counts


def heldout_loss(run: Path, chats: Path) -> float:
    import torch

    from kititans.checkpoint import load_checkpoint
    from kititans.data.chatdata import read_chat_data
    from kititans.models.spec import autocast_dtype
    from kititans.train.sft import collate, encode_conversations, evaluate_assistant

    ckpt = load_checkpoint(run)
    examples, _ = encode_conversations(ckpt.tokenizer, read_chat_data([str(chats)]), 256)
    pad = ckpt.tokenizer.pad_id if ckpt.tokenizer.pad_id >= 0 else ckpt.tokenizer.eos_id
    batches = [collate(examples[i : i + 8], pad, 255) for i in range(0, len(examples), 8)]
    cpu = torch.device("cpu")
    return evaluate_assistant(ckpt.model, batches, cpu, autocast_dtype(cpu, torch.float32))


def logit_stage(
    a: argparse.Namespace, w: Path, tb: Path, base: Path, common: list[str], data: list[str]
) -> dict[str, Any]:
    """The student trained from scratch with `kititans distill --teacher` vs alone (`base`), equal tokens."""
    kd = w / "student-kd"
    if not (kd / "model.safetensors").exists():
        sh("distill", str(kd), "--preset", "debug", "--teacher", str(tb), "--steps", str(a.student_steps),
           "--alpha", "0.5", "--temperature", "1", "--teacher-dtype", "fp32", *common, *data)  # fmt: skip
    ma, mk = metrics(base), metrics(kd)
    sps = lambda m: m[-1]["time"] / max(m[-1]["step"], 1)  # noqa: E731
    out = {
        "alone_val_loss": [r["val_loss"] for r in ma if "val_loss" in r][-1],
        "kd_val_loss": [r["val_loss"] for r in mk if "val_loss" in r][-1],
        "alone_tokens": ma[-2].get("tokens") or [r for r in ma if "tokens" in r][-1]["tokens"],
        "kd_tokens": [r for r in mk if "tokens" in r][-1]["tokens"],
        "alone_s_per_step": sps([r for r in ma if "time" in r]),
        "kd_s_per_step": sps([r for r in mk if "time" in r]),
    }
    print(json.dumps(out), flush=True)
    return out


def seq_stage(a: argparse.Namespace, w: Path, teacher: Path, base: Path, common: list[str]) -> dict[str, Any]:
    """Teacher-written chats -> SFT vs the built-in dialogues at equal tokens; throughput; judged win rate."""
    res: dict[str, Any] = {}
    train_p = prompts_file(w / "prompts.txt", 101, a.n_chats)
    held_p = [p for p in prompts_file(w / "held.txt", 202, a.held_out * 2) if p not in set(train_p)][
        : a.held_out
    ]
    (w / "held.txt").write_text("".join(p + "\n" for p in held_p))
    proc, url = serve(teacher)
    try:
        gen = ["--teacher", url, "--seeds-as", "prompts", "--max-tokens", str(a.max_tokens), "--temperature",
               "0.8", "--near-dup", "0", "--max-repeat", "0.8", "-q"]  # fmt: skip
        t0 = time.perf_counter()
        out = sh("distill", "gen", *gen, "--seeds", str(w / "prompts.txt"), "--out", str(w / "chats.jsonl"),
                 "--concurrency", str(a.concurrency))  # fmt: skip
        res["gen"] = {"stdout": out.strip(), "seconds": time.perf_counter() - t0}
        one = sh("distill", "gen", *gen, "--seeds", str(w / "held.txt"), "--out", str(w / "held.jsonl"),
                 "--concurrency", "1")  # fmt: skip
        res["gen_concurrency_1"] = one.strip()
        single = asyncio.run(replies(url, held_p[:20], a.max_tokens))
        res["teacher_single_request"] = {
            "tokens_per_s": sum(r[3] for r in single) / sum(r[2] for r in single),
            "requests": len(single),
        }
        n_tokens = json.loads((w / "chats.jsonl.stats").read_text())
        res["gen_stats"] = n_tokens
        # the two students
        s_chats = w / "sft-teacher-chats"
        if not (s_chats / "model.safetensors").exists():
            sh("sft", str(base), "--data", str(w / "chats.jsonl"), "--out", str(s_chats), "--steps",
               str(a.sft_steps), *common)  # fmt: skip
        tokens = [r for r in metrics(s_chats) if "tokens" in r][-1]["tokens"]
        s_builtin = w / "sft-builtin"
        if not (s_builtin / "model.safetensors").exists():
            steps = a.sft_steps
            for _ in range(3):  # equal tokens: SFT batches are padded to their longest example
                sh("sft", str(base), "--out", str(s_builtin), "--steps", str(steps), *common)
                got = [r for r in metrics(s_builtin) if "tokens" in r][-1]["tokens"]
                if abs(got - tokens) / tokens < 0.05:
                    break
                steps = max(1, round(steps * tokens / got))
                import shutil

                shutil.rmtree(s_builtin)
        res["seq"] = {"tokens": {"teacher_chats": tokens,
                                 "builtin": [r for r in metrics(s_builtin) if "tokens" in r][-1]["tokens"]}}  # fmt: skip
        for name, run in (("teacher_chats", s_chats), ("builtin", s_builtin)):
            res["seq"][f"{name}_heldout_teacher_loss"] = heldout_loss(run, w / "held.jsonl")
        answers = {}
        for name, run in (("teacher_chats", s_chats), ("builtin", s_builtin)):
            p2, url2 = serve(run)
            try:
                got = asyncio.run(replies(url2, held_p, a.max_tokens))
            finally:
                p2.terminate()
                p2.wait()
            answers[name] = [g[0] for g in got]
            res["seq"][f"{name}_end_token_rate"] = sum(g[1] == "stop" for g in got) / len(got)
        res["seq"]["win_rate_judged_by_teacher"] = asyncio.run(
            win_rate(url, held_p, answers["teacher_chats"], answers["builtin"])
        )
        (w / "answers.json").write_text(json.dumps(answers, indent=1, ensure_ascii=False))
    finally:
        proc.terminate()
        proc.wait()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--teacher-layers", type=int, default=4)
    ap.add_argument("--teacher-dim", type=int, default=256)
    ap.add_argument("--student-steps", type=int, default=300)
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--n-chats", type=int, default=300)
    ap.add_argument("--held-out", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--skip-logit", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (1: a busy shared CPU)")
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # kititans serve's torch threads
    w = a.work
    w.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}, "load_start": os.getloadavg()}
    common = ["--set=train.compile=off", "--set=train.dtype=fp32", "--set=train.report=false", "-q",
              f"--set=train.threads={a.threads}"]  # fmt: skip
    data = ["--set=data.builtin_bytes=1500000"]
    tb = w / "teacher-base"
    if not (tb / "model.safetensors").exists():
        sh("train", "--preset", "debug", "--steps", str(a.teacher_steps), "--out", str(tb), *common, *data,
           f"--set=model.n_layers={a.teacher_layers}", f"--set=model.dim={a.teacher_dim}")  # fmt: skip
    teacher = w / "teacher"
    if not (teacher / "model.safetensors").exists():
        sh("sft", str(tb), "--out", str(teacher), "--steps", str(a.sft_steps), *common)
    base = w / "student-alone"
    if not (base / "model.safetensors").exists():
        sh("train", "--preset", "debug", "--steps", str(a.student_steps), "--out", str(base),
           "--set", f"tokenizer.path={tb}", *common, *data)  # fmt: skip
    res["teacher"] = {
        "val_loss": metrics(tb)[-1].get("val_loss"),
        "sft_val_loss": metrics(teacher)[-1].get("val_loss"),
    }
    if not a.skip_logit:
        res["logit"] = logit_stage(a, w, tb, base, common, data)
    res.update(seq_stage(a, w, teacher, base, common))
    res["load_end"] = os.getloadavg()
    a.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
