"""`kititans distill gen` against real endpoints on 127.0.0.1: `kititans serve` of an SFT'd debug run as teacher
(and user model and judge), a generation killed with SIGKILL and resumed without duplicates, filters that fire,
a full disk, stock llama-server where it is built; a stub server only to inject faults (429, 500, no choices)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CLI

from kititans.cli import main
from kititans.data.chatdata import read_chat_data

LOOSE = ["--max-repeat", "1", "--keep-truncated", "--near-dup", "0", "--min-chars", "1", "-q"]
PROMPTS = ["What does a cow say?", "Tell me about the sun.", "Where do birds live?", "Why is the sky blue?",
           "What is a cat?", "How do fish swim?", "What is rain?", "Who is Tom?"]  # fmt: skip


def records(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()]


def test_gen_multi_turn_with_user_model_and_judge(teacher_url, write_lines, tmp_path, capsys):
    """Topics + personas: the same endpoint plays the user, the teacher answers, the judge scores; the file
    is what `kititans sft` reads, with provenance on every record."""
    topics = write_lines("topics.txt", ["# a comment", "farm animals", "the weather", "", "boats"])
    personas = tmp_path / "personas.yaml"
    personas.write_text(
        "system_prompts:\n  - You are a kind assistant.\npersonas:\n  - name: kid\n    description: A child.\n"
    )
    out = tmp_path / "chats.jsonl"
    args = ["distill", "gen", "--teacher", teacher_url, "--seeds", str(topics), "--personas", str(personas),
            "--turns", "2", "--max-tokens", "16", "--user-max-tokens", "12", "--judge", teacher_url,
            "--n", "3", "--concurrency", "3", "--out", str(out), *LOOSE]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{out}: 3 conversations" in printed and "tokens/s" in printed
    recs = records(out)
    assert len(recs) == 3
    for r in recs:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["system", "user", "assistant", "user", "assistant"], roles
        assert r["messages"][0]["content"] == "You are a kind assistant." and r["persona"] == "kid"
        assert r["teacher"]["url"] == teacher_url and r["teacher"]["model"] == "teacher"
        assert r["user_model"]["url"] == teacher_url and r["sampling"]["max_tokens"] == 16
        assert "language:" not in " ".join(r["filters"]) and "duplicate" in r["filters"]
        assert "score" in r["judge"] and r["usage"]["teacher_tokens"] > 0
    assert len(read_chat_data([str(out)])) == 3  # the SFT reader takes the file as it is
    stats = json.loads((tmp_path / "chats.jsonl.stats").read_text())
    assert stats["kept"] == 3
    # a re-run has nothing left to do and writes nothing twice
    assert main(args) == 0
    assert "0 new" in capsys.readouterr().out and len(records(out)) == 3


def test_killed_generation_resumes_without_duplicates(teacher_url, write_lines, tmp_path):
    prompts = write_lines("prompts.txt", PROMPTS)
    out = tmp_path / "c.jsonl"
    cmd = [*CLI, "distill", "gen", "--teacher", teacher_url, "--seeds", str(prompts), "--seeds-as", "prompts",
           "--max-tokens", "24", "--concurrency", "2", "--out", str(out), *LOOSE]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or out.read_bytes().count(b"\n") < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = records(out)
    assert 2 <= len(first) < len(PROMPTS), "killed too late to test a resume"
    with open(out, "ab") as f:  # what a kill in the middle of a write leaves
        f.write(b'{"id": "half a rec')
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    done = records(out)  # every line whole JSON
    ids = [r["id"] for r in done] + [r["id"] for r in records(tmp_path / "c.jsonl.rejected")]
    assert len(ids) == len(set(ids)) == len(PROMPTS)
    assert [r["id"] for r in done[: len(first)]] == [r["id"] for r in first]  # kept records never rewritten


def test_filters_fire_and_are_counted(teacher_url, write_lines, tmp_path, capsys):
    """--language ja against an English teacher: every chat is rejected as language, and counted."""
    prompts = write_lines("p.txt", PROMPTS[:3])
    out = tmp_path / "ja.jsonl"
    args = ["distill", "gen", "--teacher", teacher_url, "--seeds", str(prompts), "--seeds-as", "prompts",
            "--language", "ja", "--max-tokens", "16", "--out", str(out), *LOOSE]  # fmt: skip
    assert main(args) == 0
    assert "language 3" in capsys.readouterr().out
    assert out.read_text() == ""
    rejected = records(tmp_path / "ja.jsonl.rejected")
    assert [r["reason"] for r in rejected] == ["language"] * 3 and all(r["messages"] for r in rejected)
    assert json.loads((tmp_path / "ja.jsonl.stats").read_text())["rejected"] == {"language": 3}


def test_retries_429_and_500_then_recovers(stub, write_lines, tmp_path, capsys):
    stub.plan = [(429, {"Retry-After": "1"}, {"error": {"message": "slow down"}}),
                 (500, {}, {"error": {"message": "boom"}}), (503, {}, "not json")]  # fmt: skip
    seeds = write_lines("s.txt", ["hello there"])
    out = tmp_path / "o.jsonl"
    t0 = time.monotonic()
    args = ["distill", "gen", "--teacher", stub.url, "--seeds", str(seeds), "--seeds-as", "prompts",
            "--backoff", "0.05", "--out", str(out), "-q"]  # fmt: skip
    assert main(args) == 0
    assert len(records(out)) == 1 and len(stub.seen) == 4
    assert stub.seen[1] - stub.seen[0] >= 0.95  # Retry-After: 1 was honoured (the backoff alone is 0.05 s)
    assert "3 retried" in capsys.readouterr().out and time.monotonic() - t0 < 30


@pytest.mark.parametrize("case", ["no_choices", "unreachable", "empty_seeds", "auth"])
def test_bad_teacher_or_seeds_is_one_line(case, stub, write_lines, tmp_path, capsys):
    seeds = write_lines("s.txt", [] if case == "empty_seeds" else ["hi", "ho"])
    url = stub.url
    if case == "no_choices":
        stub.plan = [(200, {}, {"id": "x", "choices": []})]
    elif case == "auth":
        stub.plan = [(401, {}, {"error": {"message": "Incorrect API key provided"}})]
    elif case == "unreachable":
        stub.close()  # nothing listens on its port any more
    out = tmp_path / "o.jsonl"
    args = ["distill", "gen", "--teacher", url, "--seeds", str(seeds), "--seeds-as", "prompts",
            "--retries", "2", "--backoff", "0.01", "--concurrency", "1", "--out", str(out), "-q"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    expect = {"no_choices": "returned no choices", "unreachable": "failed after 3 attempts",
              "empty_seeds": "the seeds file is empty", "auth": "HTTP 401"}[case]  # fmt: skip
    assert expect in err, err
    if case == "unreachable":
        assert url in err and "unreachable" in err
    if case == "no_choices":
        assert out.read_text() == ""


def test_full_disk_keeps_whole_records(stub, write_lines, tmp_path):
    """A file-size limit (EFBIG, as ENOSPC: the write fails part way) stops the run with one line; the output
    ends with its last whole record, and a re-run with room continues it."""
    seeds = write_lines("s.txt", [f"question number {i} about farms and boats" for i in range(40)])
    out = tmp_path / "o.jsonl"
    cmd = [*CLI, "distill", "gen", "--teacher", stub.url, "--seeds", str(seeds), "--seeds-as", "prompts",
           "--concurrency", "1", "--near-dup", "0", "--out", str(out), "-q"]  # fmt: skip

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))

    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("error: cannot write") and "re-run to continue" in err[-1]
    partial = records(out)  # whole JSON lines only
    assert 0 < len(partial) < 40 and out.stat().st_size <= 3000
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert len({r["id"] for r in records(out)}) == 40


def llama_server() -> str | None:
    return os.environ.get("KITITANS_LLAMA_SERVER") or shutil.which("llama-server")


@pytest.mark.slow
@pytest.mark.skipif(llama_server() is None, reason="stock llama-server not built (set KITITANS_LLAMA_SERVER)")
def test_gen_against_stock_llama_server(teacher_run, write_lines, tmp_path):
    import socket

    gguf = tmp_path / "t.gguf"
    assert main(["export", str(teacher_run), "--format", "gguf", "--out", str(gguf)]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([llama_server(), "-m", str(gguf), "--port", str(port), "--jinja", "-c", "256",
                             "-np", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        out = tmp_path / "l.jsonl"
        seeds = write_lines("p.txt", PROMPTS[:4])
        args = ["distill", "gen", "--teacher", f"http://127.0.0.1:{port}", "--seeds", str(seeds),
                "--seeds-as", "prompts", "--turns", "2", "--max-tokens", "16", "--retries", "8", *LOOSE,
                "--out", str(out)]  # fmt: skip
        assert main(args) == 0  # the retries ride out the model load (503 "Loading model")
        assert len(read_chat_data([str(out)])) == 4
    finally:
        proc.terminate()
        proc.wait(20)
