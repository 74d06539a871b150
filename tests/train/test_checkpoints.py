"""Committed checkpoints: step folders, the latest pointer, pruning, the best one, the refreshed top level,
and the reports and trackers a run writes."""

from __future__ import annotations

import json
import os

import pytest

from kititans.checkpoint import load_checkpoint
from kititans.train.checkpoints import committed, find_latest, load_for_resume
from kititans.train.pretrain import pretrain
from tests.conftest import make_config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "run"
    cfg = make_config(
        out,
        **{
            "train.steps": 12,
            "train.save_every": 3,
            "train.eval_every": 3,
            "train.keep": 2,
            "train.keep_best": True,
            "train.log": "tensorboard",
            "data.builtin_bytes": 400_000,
        },
    )
    pytest.importorskip("tensorboard")
    pretrain(cfg, progress=False)
    return out


def test_step_folders_latest_and_pruning(run):
    root = run / "checkpoints"
    names = [p.name for p in committed(root)]
    best = (root / "best").read_text().strip()
    assert (root / "latest").read_text().strip() == "step-00000012" == names[-1]
    assert set(names) == {"step-00000009", "step-00000012", best}  # the newest 2 and the best
    vals = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in vals if "val_loss" in r}
    assert best == f"step-{min(val, key=val.get):08d}"
    state = json.loads((root / "step-00000012" / "state.json").read_text())
    assert state["step"] == 12 and state["tokens"] == 12 * 8 * 128 and state["data"]["next_step"] == 12


def test_top_level_is_the_latest_checkpoint(run):
    latest = find_latest(run)
    for name in ("model.safetensors", "config.json", "tokenizer.model"):
        assert os.path.samefile(run / name, latest / name)  # hard links: no second copy of the weights
    assert load_checkpoint(run).meta["step"] == 12 and not (run / "train_state").exists()


def test_a_stale_pointer_or_half_written_folder_is_skipped(run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    root = copy / "checkpoints"
    (root / ".step-00000015.tmp-123").mkdir()  # a crash while writing: hidden, ignored
    (root / "latest").write_text("step-00000099\n")  # a pointer to nothing
    assert find_latest(copy).name == "step-00000012"
    (root / "step-00000012" / "state.json").unlink()  # a folder missing a file is not a checkpoint
    assert find_latest(copy).name == "step-00000009"
    assert load_for_resume(copy).step == 9


def test_metrics_rows_and_the_report(run):
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert all({"time", "tokens", "tokens_per_s", "lr", "grad_norm"} <= set(r) for r in train)
    assert [r["tokens"] for r in train] == sorted(r["tokens"] for r in train)
    assert all(r["mem_kind"] == "cpu_rss" and r["peak_mem_mb"] > 10 for r in train)  # peak per logged row
    html = (run / "report" / "training.html").read_text()
    assert "<svg" in html and "best val loss" in html
    assert (run / "report" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_has_the_same_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "val/val_loss"} <= tags
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    events = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert events.keys() == loss.keys() and all(abs(events[s] - loss[s]) < 1e-5 for s in loss)


def test_wandb_offline_and_trackio_log_the_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    pretrain(
        make_config(
            out,
            **{"train.steps": 4, "train.log": "wandb", "data.builtin_bytes": 400_000, "train.log_every": 2},
        ),
        progress=False,
    )
    run_id = (out / "wandb_id").read_text().strip()
    assert any(run_id in p.name for p in (out / "wandb").glob("offline-run-*")) and wandb
    trackio = pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("TRACKIO_PROJECT", "kititans-test")
    out = tmp_path / "tio"
    pretrain(
        make_config(
            out,
            **{"train.steps": 4, "train.log": "trackio", "data.builtin_bytes": 400_000, "train.log_every": 2},
        ),
        progress=False,
    )
    logs = trackio.SQLiteStorage.get_logs("kititans-test", "tio")
    assert [r["step"] for r in logs if "loss" in r] == [2, 4]


def test_report_command(run, capsys):
    from kititans.cli import main

    assert main(["report", str(run)]) == 0
    assert "training.html" in capsys.readouterr().out
    assert main(["report", str(run.parent / "nothing")]) == 2


def test_a_format_1_run_still_resumes(run, tmp_path):
    """Runs saved before committed checkpoints (train_state/ next to the weights) resume, then move on."""
    import shutil

    from kititans.checkpoint import save_train_state
    from kititans.config import RunConfig
    from kititans.models.spec import get_family
    from kititans.train.optim import build_optimizer

    old = tmp_path / "old"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("checkpoints", "report", "tensorboard"))
    ckpt = load_checkpoint(old)
    opt = build_optimizer(ckpt.model, get_family("lite"), RunConfig().optim)
    save_train_state(old, {"step": 12, "optimizer": opt.state_dict(), "scaler": None})
    cfg = RunConfig.from_dict(json.loads((old / "config.json").read_text())["kititans"]["run"])
    cfg.out, cfg.train.steps, cfg.train.log = str(old), 14, "none"
    cfg.data.sources = [str(run / "data")]
    result = pretrain(cfg, resume=True, progress=False)
    assert result.step == 14 and not (old / "train_state").exists()
    assert find_latest(old).name == "step-00000014"
