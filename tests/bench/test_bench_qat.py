"""`kititans bench RUN --with QATRUN...` on the debug model: two short QAT runs measured at their targets
against RUN's fp32 reference, each row right after the PTQ row of its level, marked in Markdown and HTML;
the one-line errors for runs that cannot be compared. About 60 s after the shared debug run."""

from __future__ import annotations

import json
import shutil

import pytest

from kititans.cli import main
from kititans.quantize.qat import parse_target
from kititans.train.qat import QatSpec, qat, qat_config

pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def bench(debug_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-qat")
    run = root / "debug"
    shutil.copytree(debug_run, run, ignore=shutil.ignore_patterns("export", "bench"))
    qruns = []
    for target in ("gguf:q4_0", "onnx:int4"):
        out = root / f"debug-qat-{target.replace(':', '-')}"
        spec = QatSpec(run, parse_target(target), out, steps=4)
        qat(spec, qat_config(spec, [("train.batch_size", 4), ("train.eval_batches", 2)]), progress=False)
        qruns.append(out)
    # the user's path end to end for one more: `kititans qat` -> `kititans export` -> `bench --with` (reused)
    cli_run = root / "debug-qat-cli"
    qat_argv = ["qat", str(run), "--target", "gguf:q4_k_m", "--steps", "3", "--batch-size", "4"]
    assert main([*qat_argv, "--set", "train.eval_batches=2", "--out", str(cli_run), "-q"]) == 0
    assert main(["export", str(cli_run), "--format", "gguf", "--quant", "q4_k_m"]) == 0
    qruns.append(cli_run)
    argv = ["bench", str(run), "--runtimes", "torch:fp32", "--trials", "1", "--prompt-tokens", "16"]
    argv += [
        "--gen-tokens",
        "4",
        "--ppl-ctx",
        "128",
        "--ppl-chunks",
        "4",
        "--out",
        str(root / "report"),
        "-q",
    ]
    argv += ["--with", *map(str, qruns)]
    code = main(argv)
    return code, json.loads((root / "report" / "bench.json").read_text()), root / "report", qruns


def test_qat_rows_sit_beside_their_ptq_rows(bench):
    code, report, _, qruns = bench
    assert code == 0
    keys = [r["key"] for r in report["results"]]
    names = [q.resolve().name for q in qruns]
    # the PTQ pairs of both targets were added to torch:fp32, each followed by its QAT row
    assert keys == [
        "torch:fp32",
        "llamacpp:q4_0",
        f"llamacpp:q4_0@{names[0]}",
        "onnx:int4",
        f"onnx:int4@{names[1]}",
        "llamacpp:q4_k_m",
        f"llamacpp:q4_k_m@{names[2]}",
    ]
    rows = {r["key"]: r for r in report["results"]}
    for key, name in zip([k for k in keys if "@" in k], names):
        r = rows[key]
        assert r["status"] == "ok" and r["qat"]["name"] == name and r["qat"]["base_is_bench_run"]
        assert r["artifact"].startswith(str(qruns[names.index(name)]))  # exported into the QAT run's dir
        q = r["quality"]
        assert q["tokens"] == rows["torch:fp32"]["quality"]["tokens"]  # the same scored tokens
        assert q["kld_mean"] > 0 and 0.5 < q["same_top"] <= 1
        assert q["ppl_base"] == pytest.approx(rows["torch:fp32"]["quality"]["ppl_base"])  # RUN's reference
    assert [w["target"] for w in report["with"]] == ["gguf:q4_0", "onnx:int4", "gguf:q4_k_m"]
    cli = rows[f"llamacpp:q4_k_m@{names[2]}"]
    assert cli["export"]["reused"] and cli["export"]["manifest"]  # the file `kititans export` wrote
    # the QAT model scores on the device what it scored in training: the GGUF holds its trained blocks
    assert json.loads((qruns[2] / "export" / "model.q4_k_m.gguf.json").read_text())["qat_handoff"] is True


def test_reports_mark_qat_rows(bench):
    _, _, out, _ = bench
    md = (out / "bench.md").read_text()
    assert "| llamacpp | q4_0 QAT |" in md and "| onnx | int4 QAT |" in md
    assert "QAT rows (gguf:q4_0)" in md
    html = (out / "bench.html").read_text()
    assert "q4_0 QAT" in html
    if "<svg" in html:  # matplotlib installed: the quality plots draw QAT points as stars with a legend entry
        assert "stars: QAT runs" in html and "llamacpp QAT" in html


def test_with_refuses_runs_it_cannot_compare(bench, debug_run, tmp_path, capsys):
    _, _, _, qruns = bench
    argv = ["bench", str(debug_run), "--runtimes", "torch:fp32", "--no-quality", "-q", "--out", str(tmp_path)]
    assert main([*argv, "--with", str(debug_run)]) == 2
    assert "not a QAT run" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(qruns[0], other, ignore=shutil.ignore_patterns("export", "checkpoints"))
    tok = other / "tokenizer.model"
    tok.write_bytes(tok.read_bytes() + b"\0")  # another tokenizer file (only its hash is compared here)
    assert main([*argv, "--with", str(other)]) == 2
    err = capsys.readouterr().err
    assert "tokenizer differs" in err and err.count("\n") == 1
