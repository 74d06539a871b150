"""Training on several processes (CPU, gloo, 2 ranks, the debug preset), as a user launches it.

Loss equality: a 2-rank run and a 1-rank run with the same global batch train on the same windows, so their
losses agree to fp32 summation order (gradients are averaged across ranks instead of accumulated in one
process): 1e-5 relative with AdamW. Muon under FSDP2 computes Newton-Schulz on sharded DTensors in bf16, whose
partial sums round differently from the whole matrix: agreement to 2e-3 there.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest

from kititans.train.checkpoints import committed, find_latest

pytestmark = pytest.mark.skipif(
    not __import__("torch").distributed.is_gloo_available(), reason="torch was built without gloo"
)


def kititans(*args, timeout=600, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "kititans", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        **kw,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "data"
    r = kititans("data", "--builtin-mb", "0.6", "--vocab-size", "512", "--out", out, "--workers", "1", "-q")
    assert r.returncode == 0, r.stderr
    return out


def train_args(data, out, *extra):
    return [
        "train", "--preset", "debug", "--data", data, "--seq-len", "64", "--batch-size", "4",
        "--set", "train.log_every=1", "--set", "train.eval_every=100", "--set", "train.compile=off",
        "--set", "train.dtype=fp32", "--set", "optim.warmup_steps=1", "--set", "optim.schedule=constant",
        "--set", "train.report=false", "--out", out, "-q", *map(str, extra),
    ]  # fmt: skip


def losses(run) -> list[float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def close(a, b, rel):
    assert len(a) == len(b)
    assert all(abs(x - y) <= rel * abs(y) for x, y in zip(a, b)), list(zip(a, b))


@pytest.fixture(scope="module")
def one_rank(data, tmp_path_factory):
    """The reference: 1 process, micro-batch 4 x 2 accumulation = the 2-rank global batch of 8."""
    runs = {}
    for opt in ("adamw", "muon"):
        out = tmp_path_factory.mktemp("ref") / opt
        r = kititans(*train_args(data, out, "--steps", "10", "--grad-accum", "2", "--optimizer", opt))
        assert r.returncode == 0, r.stderr
        runs[opt] = out
    return runs


@pytest.mark.parametrize(
    "parallel, opt, rel",
    [  # the default run keeps one of each wrapper and each optimizer; the other two pairs are slow
        ("ddp", "adamw", 1e-5),
        pytest.param("fsdp", "adamw", 1e-5, marks=pytest.mark.slow),
        pytest.param("ddp", "muon", 1e-5, marks=pytest.mark.slow),
        ("fsdp", "muon", 2e-3),
    ],
)
def test_two_ranks_equal_one_rank_at_every_step(data, one_rank, tmp_path, parallel, opt, rel):
    out = tmp_path / parallel
    r = kititans(
        *train_args(data, out, "--steps", "10", "--nproc", "2", "--parallel", parallel, "--optimizer", opt)
    )
    assert r.returncode == 0, r.stderr
    close(losses(out), losses(one_rank[opt]), rel)
    meta = json.loads((out / "config.json").read_text())["kititans"]
    assert meta["run"]["train"]["global_batch"] == 8 and meta["step"] == 10


def test_titans_under_fsdp2_equals_one_rank(data, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "fsdp"
    titans = ("--preset", "titans-debug", "--steps", "6")
    assert kititans(*train_args(data, ref, *titans, "--grad-accum", "2")).returncode == 0
    r = kititans(*train_args(data, out, *titans, "--nproc", "2", "--parallel", "fsdp"))
    assert r.returncode == 0, r.stderr
    close(losses(out), losses(ref), 1e-5)


def test_resume_two_ranks_onto_one(data, one_rank, tmp_path):
    out = tmp_path / "res"
    r = kititans(*train_args(data, out, "--steps", "5", "--nproc", "2", "--parallel", "fsdp"))
    assert r.returncode == 0, r.stderr
    state = json.loads((find_latest(out) / "state.json").read_text())
    assert state["world_size"] == 2 and state["parallel"] == "fsdp" and state["step"] == 5
    r = kititans(
        "train", "--resume", out, "--steps", "10", "-q"
    )  # 1 rank: grad-accum 2 from the global batch
    assert r.returncode == 0, r.stderr
    close(losses(out), losses(one_rank["adamw"]), 1e-5)


def test_bad_setups_end_in_one_line(data, tmp_path):
    cases = [
        (train_args(data, tmp_path / "a", "--steps", "2", "--parallel", "fsdp"), "needs several processes"),
        (train_args(data, tmp_path / "b", "--steps", "2", "--nproc", "2", "--global-batch", "6"),
         "does not divide into micro-batches of 4 on 2 rank(s)"),
    ]  # fmt: skip
    for args, msg in cases:
        r = kititans(*args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    ok = tmp_path / "ok"
    assert kititans(*train_args(data, ok, "--steps", "2")).returncode == 0
    r = kititans("train", "--resume", ok, "--steps", "4", "--set", "model.dim=64", "-q")
    assert r.returncode == 2 and "the resumed model differs from the saved one (dim: 256 -> 64)" in r.stderr
    code = (
        "import sys; sys.modules['wandb'] = None; from kititans.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, *map(str, train_args(data, tmp_path / "w", "--log", "wandb"))],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "pip install 'kititans[wandb]'" in r.stderr and "Traceback" not in r.stderr


def _start(args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kititans", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _wait_rows(run, n, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run} did not reach {n} metric rows")


def test_a_dead_rank_stops_the_others_with_one_line(data, tmp_path):
    out = tmp_path / "dead"
    p = _start(
        train_args(data, out, "--steps", "5000", "--nproc", "2", "--parallel", "ddp", "--save-every", "5")
    )
    _wait_rows(out, 12)
    victim = next(c for c in psutil.Process(p.pid).children(recursive=True) if c.environ().get("RANK") == "1")
    victim.kill()
    _, err = p.communicate(timeout=120)  # no hang: gloo sees the closed connection at the next collective
    assert p.returncode == 2, err
    assert "lost its peers" in err and "rank 1 exited with code -9" in err and "Traceback" not in err
    assert find_latest(out) is not None  # the last committed checkpoint is intact and resumable
    assert (
        kititans(
            "train",
            "--resume",
            out,
            "--steps",
            str(json.loads((find_latest(out) / "state.json").read_text())["step"] + 2),
            "-q",
        ).returncode
        == 0
    )


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(data, one_rank, tmp_path):
    out = tmp_path / "term"
    p = _start(train_args(data, out, "--steps", "10", "--grad-accum", "2", "--save-every", "1000"))
    _wait_rows(out, 3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "SIGTERM: saving a checkpoint" in err, err
    stopped = json.loads((find_latest(out) / "state.json").read_text())["step"]
    assert 3 <= stopped < 10
    assert kititans("train", "--resume", out, "-q").returncode == 0
    close(losses(out), losses(one_rank["adamw"]), 1e-5)


def test_sigkill_at_random_moments_never_loses_a_checkpoint(data, one_rank, tmp_path):
    """Kill -9 anywhere (often while a checkpoint is written: one is saved every 2 steps), resume, repeat."""
    out, rng = tmp_path / "kill", random.Random(0)
    args = train_args(data, out, "--steps", "10", "--grad-accum", "2", "--save-every", "2", "--keep", "2")
    p = _start(args)
    for _ in range(3):
        _wait_rows(out, 1)
        time.sleep(rng.uniform(0.0, 0.6))
        p.kill()
        p.wait()
        if find_latest(out) is not None:
            assert all((c / "state.json").is_file() for c in committed(out / "checkpoints"))
            p = _start(["train", "--resume", out, "-q"])
        else:  # killed before the first commit: start over
            subprocess.run(["rm", "-rf", str(out)], check=True)
            p = _start(args)
    p.communicate(timeout=300)
    assert p.returncode == 0
    close(losses(out), losses(one_rank["adamw"]), 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_compile_and_activation_checkpointing_compose(data, tmp_path, parallel):
    """torch.compile (20-120 s on this CPU) and activation checkpointing under both wrappers."""
    ref, out = tmp_path / "ref", tmp_path / parallel
    assert kititans(*train_args(data, ref, "--steps", "4", "--grad-accum", "2")).returncode == 0
    r = kititans(
        *train_args(
            data,
            out,
            "--steps",
            "4",
            "--nproc",
            "2",
            "--parallel",
            parallel,
            "--set",
            "train.compile=on",
            "--set",
            "train.activation_checkpointing=true",
        ),
        timeout=900,
    )
    assert r.returncode == 0, r.stderr
    close(losses(out), losses(ref), 1e-4)  # inductor fuses differently: fp32 agreement to 1e-4


def test_a_tied_head_is_broadcast_under_every_name():
    """A multi-rank resume loads strictly by every parameter name; a tied head is saved once, so rank 0 adds
    its other name before the broadcast (an FSDP2 resume of lite-42m failed on `lm_head.weight`)."""
    from kititans.models.spec import get_family
    from kititans.train.state import _with_tied_names

    spec = get_family("lite")
    model = spec.build(spec.make_config("debug", {"tie_embeddings": True}))
    saved = {n: t for n, t in model.state_dict().items() if n != "lm_head.weight"}
    full = _with_tied_names(model, saved)
    assert (
        set(full) == set(model.state_dict()) and full["lm_head.weight"] is saved["model.embed_tokens.weight"]
    )
