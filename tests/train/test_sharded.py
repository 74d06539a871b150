"""Sharded checkpoints (train/sharded.py): every rank writes its optimizer shard; any world size and
parallelism resumes it and continues exactly as an uninterrupted run (2 gloo ranks, the debug preset)."""

from __future__ import annotations

import json

import pytest

from kititans.train import sharded
from kititans.train.checkpoints import find_latest
from tests.train.test_distributed import close, data, kititans, losses, one_rank, train_args  # noqa: F401

pytestmark = pytest.mark.skipif(
    not __import__("torch").distributed.is_gloo_available(), reason="torch was built without gloo"
)


def val_losses(run) -> list[float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [r["val_loss"] for r in rows if "val_loss" in r]


def _shards(folder):
    return sorted(p.name for p in folder.glob("optimizer-*.safetensors"))


def test_fsdp_shards_resume_on_one_process(data, one_rank, tmp_path):  # noqa: F811
    out = tmp_path / "fsdp"
    r = kititans(*train_args(data, out, "--steps", "5", "--nproc", "2", "--parallel", "fsdp"))
    assert r.returncode == 0, r.stderr
    step = find_latest(out)
    assert _shards(step) == [sharded.shard_name(0, 2), sharded.shard_name(1, 2)]
    assert not (step / "optimizer.safetensors").exists()
    index = json.loads((step / sharded.INDEX).read_text())
    assert index["world"] == 2 and index["format"] == sharded.FORMAT
    # each rank wrote about half of the state (FSDP2 shards dim 0), not a full copy
    sizes = [(step / n).stat().st_size for n in _shards(step)]
    assert max(sizes) < 0.7 * sum(sizes), sizes
    # the run's top level is the consolidated model directory, with no optimizer files
    assert (out / "model.safetensors").is_file() and not list(out.glob("optimizer*"))
    r = kititans("train", "--resume", out, "--steps", "10", "-q")  # 1 process, grad-accum 2
    assert r.returncode == 0, r.stderr
    close(losses(out), losses(one_rank["adamw"]), 1e-5)
    assert _shards(find_latest(out)) == [sharded.shard_name(0, 1)]


def test_one_process_and_old_format_resume_on_two_fsdp_ranks(data, one_rank, tmp_path):  # noqa: F811
    """A run saved by one process in the gathered format (every run before sharding) resumes sharded on 2
    FSDP2 ranks; that sharded checkpoint resumes on 2 DDP ranks."""
    out = tmp_path / "one"
    args = ("--steps", "4", "--grad-accum", "2", "--set", "train.checkpoint_shards=false")
    assert kititans(*train_args(data, out, *args)).returncode == 0
    assert (find_latest(out) / "optimizer.safetensors").is_file() and not _shards(find_latest(out))
    r = kititans(
        "train",
        "--resume",
        out,
        "--steps",
        "7",
        "--nproc",
        "2",
        "--parallel",
        "fsdp",
        "--set",
        "train.checkpoint_shards=true",
        "-q",
    )  # fmt: skip  (the saved run said false)
    assert r.returncode == 0, r.stderr
    assert _shards(find_latest(out)) == [sharded.shard_name(0, 2), sharded.shard_name(1, 2)]
    r = kititans("train", "--resume", out, "--steps", "10", "--nproc", "2", "--parallel", "ddp", "-q")
    assert r.returncode == 0, r.stderr
    close(losses(out), losses(one_rank["adamw"]), 1e-5)
    # the final eval, its batches split across the 2 ranks and reduced, equals one process's
    close(val_losses(out)[-1:], val_losses(one_rank["adamw"])[-1:], 1e-5)


def test_sharded_resume_with_another_model_or_a_lost_shard_ends_in_one_line(data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert kititans(*train_args(data, out, "--steps", "2")).returncode == 0
    r = kititans("train", "--resume", out, "--steps", "4", "--set", "model.dim=64", "-q")
    assert r.returncode == 2 and "the resumed model differs from the saved one" in r.stderr
    assert "Traceback" not in r.stderr
    step = find_latest(out)
    piece = step / sharded.shard_name(0, 1)
    piece.write_bytes(piece.read_bytes()[:100])  # a damaged shard
    r = kititans("train", "--resume", out, "--steps", "4", "-q")
    assert r.returncode == 2 and "unreadable" in r.stderr and "Traceback" not in r.stderr, r.stderr
