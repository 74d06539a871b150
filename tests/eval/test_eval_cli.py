"""`kititans eval`: every artifact of a run on the same items (flips, continuation KLD, lm-eval's own results
per artifact, JSON + Markdown + HTML), and bad input in one line with nothing written."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tests.eval.conftest import TASKS

pytestmark = pytest.mark.usefixtures("offline")

FAST = ["--include-path", str(TASKS), "--no-builtin-tasks"]


def kititans(*args: str) -> int:
    from kititans.cli import main

    return main(list(args))


def snapshot(run: Path) -> tuple:
    """What an evaluation could have written in RUN: its entries and RUN/eval's files."""
    ev = run / "eval"
    files = sorted((str(p), p.stat().st_mtime_ns) for p in ev.rglob("*")) if ev.exists() else []
    return sorted(p.name for p in run.iterdir()), files


def test_sweep_scores_every_artifact_on_the_same_items(lite, capsys):
    rc = kititans(
        "eval", str(lite), "--tasks", "kt_mc,kt_rolling", "--artifacts", "gguf:f32,gguf:q4_0,onnx:fp32",
        "--limit", "6", "-q", *FAST,
    )  # fmt: skip
    assert rc == 0
    out = lite / "eval"
    report = json.loads((out / "eval.json").read_text())
    keys = [e["key"] for e in report["artifacts"]]
    assert (
        keys == ["torch:fp32", "gguf:f32", "gguf:q4_0", "onnx:fp32"] and report["reference"] == "torch:fp32"
    )
    ref = report["artifacts"][0]
    for e in report["artifacts"]:
        assert e["tasks"]["kt_mc"]["n"] == 6 and e["items"] == 6 + 3 and e["items_per_s"] > 0
        # lm-eval's own output, per artifact
        res = json.loads((out / e["key"].replace(":", "-") / "results.json").read_text())
        assert {"results", "configs", "versions", "n-samples"} <= set(res)
        assert len((out / e["key"].replace(":", "-") / "samples_kt_mc.jsonl").read_text().splitlines()) == 6
        if e is ref:
            assert "kld" not in e and "flips" not in e["tasks"]["kt_mc"]
            continue
        f = e["tasks"]["kt_mc"]["flips"]["acc"]
        assert f["compared"] == 6
        n_ref = round(ref["tasks"]["kt_mc"]["metrics"]["acc"]["value"] * 6)
        n_art = round(e["tasks"]["kt_mc"]["metrics"]["acc"]["value"] * 6)
        assert n_art - n_ref == f["wrong_to_right"] - f["right_to_wrong"]
        assert e["kld"]["tokens"] > 20 and e["kld"]["missing"] == 0
    kld = {e["key"]: e["kld"]["kld_mean"] for e in report["artifacts"][1:]}
    assert kld["gguf:f32"] < 1e-3 and kld["onnx:fp32"] < 1e-3  # float16 storage of the reference rows
    assert kld["gguf:q4_0"] > 10 * max(kld["gguf:f32"], 1e-6)
    md = (out / "eval.md").read_text()
    assert "## kt_mc (acc)" in md and "right→wrong" in md and "gguf:q4_0" in md
    html = (out / "eval.html").read_text()
    assert "<svg" in html and "kt_rolling" in html
    assert "## kt_mc (acc)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "kt_mcq"], "unknown task 'kt_mcq'; closest: kt_mc"),
        (["--tasks", "kt_mc", "--artifacts", "gguf:q6_k"], "gguf:q6_k: no such export"),
        (["--tasks", "kt_mc", "--artifacts", "onnx"], "expected format:level"),
        (["--tasks", "kt_mc", "--artifacts", "coreml:int4"], "CoreML models run only on macOS"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(lite, capsys, args, message):
    if "coreml" in message.lower() and platform.system() == "Darwin":
        pytest.skip("CoreML runs here")
    before = snapshot(lite)
    assert kititans("eval", str(lite), *args, *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert snapshot(lite) == before


BROKEN = """task: kt_broken
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: choices
doc_to_target: label
"""


def test_a_task_lm_eval_cannot_build_is_one_line_before_any_model(tmp_path, capsys):
    """Its data file is missing: lm-eval's error in one line, before any model is loaded (the run's weights
    here are an empty file, which loading would reject) and with nothing written."""
    run, tasks = tmp_path / "run", tmp_path / "tasks"
    run.mkdir()
    tasks.mkdir()
    (run / "config.json").write_text(json.dumps({"kititans": {"family": "lite"}}))
    (run / "model.safetensors").write_bytes(b"")
    (tasks / "kt_broken.yaml").write_text(BROKEN.format(data=tasks / "missing.jsonl"))
    args = ["eval", str(run), "--tasks", "kt_broken", "--include-path", str(tasks), "--no-builtin-tasks"]
    assert kititans(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: lm-eval could not build kt_broken: ") and "\n" not in err
    assert "missing.jsonl" in err and "(--no-builtin-tasks: lm-eval's own task YAMLs are not indexed)" in err
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "model.safetensors"]


def test_an_encoder_run_is_refused(tmp_path, capsys):
    run = tmp_path / "enc"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"kititans": {"family": "encoder"}}))
    (run / "model.safetensors").write_bytes(b"")
    assert kititans("eval", str(run), "--tasks", "kt_mc", *FAST) == 2
    err = capsys.readouterr().err
    assert "is an encoder run" in err and err.count("\n") == 1
    assert not (run / "eval").exists()


def test_a_failing_artifact_leaves_nothing_half_written(lite, capsys, tmp_path):
    before = snapshot(lite)
    bad = lite / "export" / "model.q8_0.gguf"
    bad.write_bytes(b"GGUF not really")
    try:
        assert kititans("eval", str(lite), "--tasks", "kt_mc", "--artifacts", "gguf:q8_0", "-q", *FAST) == 2
    finally:
        bad.unlink()
    assert "llama.cpp could not load" in capsys.readouterr().err
    assert snapshot(lite) == before  # the torch reference was scored, but nothing of it was kept


def test_contexts_longer_than_the_model_are_cut_and_counted(lite, tmp_path):
    out = tmp_path / "ev"
    rc = kititans(
        "eval", str(lite), "--tasks", "kt_mc,kt_gen", "--max-length", "16", "--limit", "3", "--out", str(out),
        "-q", *FAST,
    )  # fmt: skip
    assert rc == 0
    e = json.loads((out / "eval.json").read_text())["artifacts"][0]
    assert e["tasks"]["kt_mc"]["truncated"] == 12  # 3 questions x 4 choices, all longer than 16 tokens
    assert e["truncated"] >= 12
    assert "| 12 |" in (out / "eval.md").read_text()


def test_tasks_without_the_eval_extra(lite, tmp_path):
    """lm_eval missing: one line naming the extra (lm_eval blocked in a child process)."""
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "from kititans.cli import main\n"
        f"sys.exit(main(['eval', {str(lite)!r}, '--tasks', 'kt_mc']))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert "pip install 'kititans[eval]'" in p.stderr
