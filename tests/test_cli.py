"""The CLI as a user runs it: help texts, one-line errors, nothing half-written, generate and chat."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kititans.cli import COMMANDS, build_parser, main


def kititans(*args, input=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "kititans", *args],
        capture_output=True,
        text=True,
        input=input,
        cwd=cwd,
        timeout=300,
    )


def test_help_lists_every_verb_and_each_has_examples(capsys):
    r = kititans("--help")
    assert r.returncode == 0
    verbs = [v for v in COMMANDS if v in build_parser().format_help()]
    assert {"data", "tokenizer", "train", "generate", "chat"} <= set(verbs)
    for verb in verbs:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0
        assert "examples:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--preset", "tinyy"], "unknown preset 'tinyy'"),
        (["train", "--set", "optim.lrr=1"], "did you mean 'optim.lr'"),
        (["train", "--optimizer", "sgd"], "invalid choice"),
        (["generate", "no/such/run", "--prompt", "x"], "no such model"),
        (["train", "--data", "no_such_dir", "--out", "OUT"], "no such file or directory"),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, message):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    r = kititans(*args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bad_corpus_leaves_nothing_behind(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02\x03")
    r = kititans(
        "train", "--preset", "debug", "--data", str(tmp_path / "bin.txt"), "--out", str(tmp_path / "run")
    )
    assert r.returncode == 2 and "looks like a binary file" in r.stderr
    leftovers = (
        [p for p in (tmp_path / "run").rglob("*") if p.is_file()] if (tmp_path / "run").exists() else []
    )
    assert leftovers == []


def test_a_warmup_the_run_never_finishes_is_refused_before_any_data_is_prepared(tmp_path):
    run = tmp_path / "run"
    r = kititans(
        "train", "--preset", "debug", "--set", "optim.warmup_steps=20", "--steps", "2", "--out", str(run)
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.warmup_steps 20 >= train.steps 2" in lines[0], r.stderr
    assert not run.exists() or not any(p.is_file() for p in run.rglob("*"))  # no data, tokenizer or shards


def test_dry_run_prints_the_parameter_table():
    r = kititans("train", "--preset", "lite-42m", "--dry-run")
    assert r.returncode == 0
    assert "embedding" in r.stdout and "feed-forward" in r.stdout and "(43.66M)" in r.stdout


def test_generate_and_chat(debug_run):
    r = kititans(
        "generate",
        str(debug_run),
        "--prompt",
        "Once upon a time",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--stats",
    )
    assert r.returncode == 0 and r.stdout.startswith("Once upon a time") and len(r.stdout) > 20
    assert "tok/s" in r.stderr
    r = kititans(
        "chat", str(debug_run), "--max-tokens", "8", "--seed", "0", input="Hi!\n/reset\nHello\n/quit\n"
    )
    assert r.returncode == 0 and r.stdout.count("> ") == 2 and "(history cleared)" in r.stderr


def test_python_dash_m_version():
    r = kititans("--version")
    assert r.returncode == 0 and r.stdout.startswith("kititans ")


def test_stages_run_alone_and_are_reused(tmp_path):
    r = kititans("tokenizer", "--vocab-size", "512", "--builtin-mb", "0.4", "--out", str(tmp_path / "tok"))
    assert r.returncode == 0 and "exact round-trip" in r.stdout, r.stderr
    r = kititans(
        "data", "--builtin-mb", "0.4", "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "shards")
    )
    assert r.returncode == 0 and "train tokens" in r.stdout, r.stderr
    r = kititans(
        "train",
        "--preset",
        "debug",
        "--data",
        str(tmp_path / "shards"),
        "--steps",
        "6",
        "--compile",
        "off",
        "--set",
        "train.eval_every=3",
        "--out",
        str(tmp_path / "run"),
        "-q",
    )
    assert r.returncode == 0 and "val loss" in r.stdout, r.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file() and not (tmp_path / "run" / "data").exists()
    r = kititans("data", "--builtin-mb", "0.4", "--out", str(tmp_path / "shards"))
    assert r.returncode == 2 and "already holds prepared shards" in r.stderr
