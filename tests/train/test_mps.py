"""Apple silicon: train, SFT-eval and generate on MPS (these run on a Mac with MPS and skip elsewhere)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kititans.device import mps_available
from kititans.train.pretrain import pretrain
from tests.conftest import make_config

pytestmark = pytest.mark.skipif(
    not mps_available(),
    reason="needs Apple silicon with MPS (torch.backends.mps.is_available() is false here)",
)


def test_training_on_mps_reports_its_memory_and_generates(tmp_path):
    out = tmp_path / "mps"
    cfg = make_config(out, **{"train.steps": 6, "train.eval_every": 3, "train.log_every": 1,
                              "train.device": "mps", "train.seq_len": 64, "optim.warmup_steps": 1,
                              "data.builtin_bytes": 200_000})  # fmt: skip
    result = pretrain(cfg, progress=False)
    assert result.step == 6 and result.val_loss is not None
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert all(r["mem_kind"] == "mps_driver" and r["mps_allocated_mb"] > 0 for r in logged)
    r = subprocess.run(
        [sys.executable, "-m", "kititans", "generate", str(out), "--device", "mps", "--prompt", "Once",
         "--temperature", "0", "--max-tokens", "8"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
