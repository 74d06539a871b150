"""benchmarks/train_gpu.py is meant for a lent GPU that nobody here has: its dry run drives every stage at
debug size on the CPU (data prepared, training stages, DDP over 2 processes, the bench stage), so the script a
short GPU loan depends on is known to work before the loan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_writes_each_stage_json(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_gpu.py"), "dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    names = [s["name"] for s in summary["stages"]]
    assert names == ["lite125m", "titans500m", "ddp", "bench"]
    for stage in summary["stages"]:
        assert stage["status"] == "ok", stage
        assert json.loads((out / f"{stage['name']}.json").read_text())["status"] == "ok"
    for stage in summary["stages"][:3]:
        assert stage["tokens_per_s"] > 0 and stage["final_loss"] > 0 and stage["logged_steps"] == 3
    assert "| torch" in summary["stages"][3]["table"]  # the bench report's own table
    assert "MFU" in summary["caveats"] and "caveats:" in r.stdout
    assert not list(out.glob("run-*")), "weights of a stage are not results: removed"
