"""`kititans data` as a user runs it (a subprocess): one-line errors, a full disk, a kill mid-write, memory that
does not grow with the corpus."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest

from kititans.data.shards import MANIFEST

_rng = random.Random(42)
WORDS = ["".join(_rng.choices("abcdefghijklmnopqrstuvwxyz", k=_rng.randint(2, 9))) for _ in range(3000)]


def corpus(path, mb: float, seed: int = 0):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        n = 0
        while n < mb * 1e6:
            line = json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(50, 400)))}) + "\n"
            f.write(line)
            n += len(line)
    return path


def kititans(*args, env=None, **kw) -> subprocess.CompletedProcess:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kititans", *map(str, args)], capture_output=True, text=True, env=e, **kw
    )


def one_line_error(r: subprocess.CompletedProcess, pattern: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return corpus(tmp_path_factory.mktemp("c") / "small.jsonl", 1.0)


def test_bad_inputs_end_in_one_line(tmp_path, small):
    one_line_error(
        kititans("data", small, "--out", tmp_path / "a", "--append", tmp_path / "b"), "exactly one of"
    )
    one_line_error(kititans("data", small, "--append", tmp_path / "nothing"), "not a prepared dataset")
    one_line_error(
        kititans("data", "--dataset", "nobody-here/no-such-dataset", "--out", tmp_path / "h"),
        "could not stream dataset 'nobody-here/no-such-dataset'",
    )
    assert not (tmp_path / "h" / MANIFEST).exists()
    r = kititans("data", small, "--out", tmp_path / "ok", "--vocab-size", "400", "-q", "--workers", "1")
    assert r.returncode == 0, r.stderr
    one_line_error(kititans("data", small, "--out", tmp_path / "ok"), "already holds prepared shards")
    one_line_error(
        kititans("train", "--data", tmp_path / "ok", small, "--weights", "1,2", "--steps", "1"),
        "need prepared datasets only",
    )
    one_line_error(
        kititans("train", "--data", tmp_path / "ok", tmp_path / "ok", "--weights", "1,2,3", "--steps", "1"),
        "--weights has 3 values for 2 data sources",
    )


def _fsize_limit(limit: int):
    def setup() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return setup


def test_a_full_disk_commits_nothing(tmp_path, small):
    out = tmp_path / "full"
    r = kititans(
        "data",
        small,
        "--out",
        out,
        "--vocab-size",
        "400",
        "--workers",
        "1",
        "--shard-mb",
        "4",
        preexec_fn=_fsize_limit(150_000),
    )
    one_line_error(r, "no space left while writing")
    assert not (out / MANIFEST).exists() and not list(out.glob("*.bin")) and not list(out.glob("hashes-*"))


def test_killed_run_leaves_no_dataset_and_reruns_cleanly(tmp_path):
    big = corpus(tmp_path / "big.jsonl", 12.0, seed=1)
    out = tmp_path / "ds"
    args = ("data", big, "--out", out, "--vocab-size", "400", "--workers", "1", "--shard-mb", "0.5", "-q")
    p = subprocess.Popen([sys.executable, "-m", "kititans", *map(str, args)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("train-*.bin"))) < 2:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert list(out.glob("train-*.bin")), "the run was killed before it wrote a shard"
    assert not (out / MANIFEST).exists()  # not a dataset
    r = kititans(*args)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / MANIFEST).read_text())
    listed = {s["file"] for sp in ("train", "val") for s in m["splits"][sp]["shards"]}
    assert {p.name for p in out.glob("*.bin")} == listed  # nothing left over from the killed run


def _peak_rss(args) -> float:
    """Peak resident MB of `kititans data` (its own process; workers are separate processes)."""
    code = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, sys.executable, "-m", "kititans", *map(str, args)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(r.stdout.split()[-1]) / 1024


def test_memory_does_not_grow_with_the_corpus(tmp_path):
    rss = {}
    for mb in (2, 16):
        src = corpus(tmp_path / f"c{mb}.jsonl", mb, seed=mb)
        rss[mb] = _peak_rss(
            [
                "data",
                src,
                "--out",
                tmp_path / f"d{mb}",
                "--vocab-size",
                "500",
                "--workers",
                "1",
                "--tokenizer-sample-mb",
                "1",
                "-q",
            ]
        )
    assert rss[16] < rss[2] + 25, rss  # 8x the text, the same memory (the hash set adds ~0.4 MB here)
