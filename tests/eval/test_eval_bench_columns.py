"""`kititans bench --tasks`: accuracy and flips as columns of the bench table (bench calls eval)."""

from __future__ import annotations

import json

import pytest

from tests.eval.conftest import TASKS

pytestmark = pytest.mark.usefixtures("offline")


def bench_row(runtime, quant, artifact):
    return {
        "runtime": runtime,
        "quant": quant,
        "key": f"{runtime}:{quant}",
        "status": "ok",
        "artifact": str(artifact),
    }


def test_accuracy_columns_in_the_bench_table(lite, tmp_path):
    pytest.importorskip("llama_cpp")
    from kititans.bench.report import headers, result_cells
    from kititans.eval.bench import add_accuracy

    report = {
        "settings": {"prompt_tokens": [8], "gen_tokens": 4, "threads": 0},
        "results": [
            bench_row("torch", "fp32", lite),
            bench_row("llamacpp", "q4_0", lite / "export" / "model.q4_0.gguf"),
            bench_row("genai", "int4", tmp_path),  # no eval backend: no accuracy, no failure
            {"runtime": "onnx", "quant": "int4", "key": "onnx:int4", "status": "failed", "reason": "x"},
        ],
    }
    add_accuracy(
        report, lite, ["kt_mc"], limit=4, include_path=[TASKS], out=tmp_path / "ev", builtin_tasks=False
    )
    head = headers(report)
    assert head[-2:] == ["kt_mc %", "kt_mc flips"]
    torch_row, q4_row, genai_row, _ = report["results"]
    assert torch_row["accuracy"]["tasks"]["kt_mc"]["n"] == 4
    assert "flips" in q4_row["accuracy"]["tasks"]["kt_mc"] and q4_row["accuracy"]["kld"]["tokens"] > 0
    assert "accuracy" not in genai_row
    cells = result_cells(report, q4_row)
    assert len(cells) == len(head)
    assert " ± " in cells[-2] and " / " in cells[-1]
    assert result_cells(report, genai_row)[-2:] == ["–", "–"]
    assert report["accuracy"]["reference"] == "torch:fp32"
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["tasks"] == ["kt_mc"]


@pytest.mark.slow
def test_bench_command_with_tasks(lite, tmp_path, capsys):
    """The whole command: bench's pairs measured in their workers, then scored on the task (~1 min)."""
    pytest.importorskip("llama_cpp")
    from kititans.cli import main

    out = tmp_path / "bench"
    rc = main(
        ["bench", str(lite), "--runtimes", "torch:fp32,llamacpp:q4_0", "--no-quality", "--trials", "1",
         "--warmup", "0", "--prompt-tokens", "8", "--gen-tokens", "4", "--tasks", "kt_mc", "--limit", "4",
         "--include-path", str(TASKS), "--out", str(out), "-q"]
    )  # fmt: skip
    assert rc == 0
    md = (out / "bench.md").read_text()
    assert "kt_mc %" in md and "kt_mc flips" in md
    assert (out / "eval" / "eval.html").is_file()
