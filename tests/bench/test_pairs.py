"""Pair selection, statistics, artifact accounting and worker failure handling (no model runs; a few s)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from kititans.bench.pairs import DEFAULTS, QUANTS, Pair, artifact_path, resolve_quant, select_pairs
from kititans.errors import KititansError


def test_runtime_levels_match_the_exporters():
    from kititans.export import coreml, gguf, onnx

    assert set(QUANTS["llamacpp"]) == set(gguf.QUANTS)
    assert set(QUANTS["onnx"]) == set(onnx.QUANTS)
    assert set(QUANTS["genai"]) == set(onnx.GENAI_PRECISION)
    assert set(QUANTS["coreml"]) == set(coreml.QUANTS)
    assert set(QUANTS["torch"]) == {"fp32", "bf16", "fp16"}
    for rt, levels in DEFAULTS.items():
        assert set(levels) <= set(QUANTS[rt])


def test_aliases_map_to_each_runtimes_names():
    assert resolve_quant("torch", "f16") == "fp16" and resolve_quant("llamacpp", "fp16") == "f16"
    assert resolve_quant("llamacpp", "q4") == "q4_k_m" and resolve_quant("onnx", "q4") == "int4"
    assert resolve_quant("onnx", "Q8") == "int8" and resolve_quant("torch", "q8_0") is None


def test_select_pairs():
    pairs = select_pairs(["torch", "llamacpp"], ["f16", "q8_0", "q4_k_m"])
    assert [p.key for p in pairs] == ["torch:fp16", "llamacpp:f16", "llamacpp:q8_0", "llamacpp:q4_k_m"]
    assert [p.key for p in select_pairs(["llamacpp"])] == [f"llamacpp:{q}" for q in DEFAULTS["llamacpp"]]
    explicit = select_pairs(["onnx:q4", "torch:fp32", "onnx:int4", "llamacpp"], ["q4_0"])
    assert [p.key for p in explicit] == ["onnx:int4", "torch:fp32", "llamacpp:q4_0"]  # no duplicates
    assert [p.key for p in select_pairs(["torch"], gpu=True)] == ["torch:fp32", "torch:bf16", "torch:fp16"]
    everything = select_pairs(None)  # every runtime available here, coreml only on macOS
    assert Pair("torch", "fp32") in everything
    if sys.platform != "darwin":
        assert all(p.runtime != "coreml" for p in everything)


@pytest.mark.parametrize(
    "runtimes,quants,message",
    [
        (["llamacpp:q3"], None, "llamacpp has no quantization 'q3'"),
        (["tensorrt"], None, "unknown runtime 'tensorrt'"),
        (["torch"], ["q4_0"], "no selected runtime (torch) has quantization 'q4_0'"),
    ],
)
def test_select_pairs_errors(runtimes, quants, message):
    with pytest.raises(KititansError, match=message.replace("(", r"\(").replace(")", r"\)")):
        select_pairs(runtimes, quants)


def test_artifact_paths(tmp_path):
    assert artifact_path(tmp_path, Pair("torch", "bf16")) == tmp_path
    assert artifact_path(tmp_path, Pair("llamacpp", "q4_0")) == tmp_path / "export" / "model.q4_0.gguf"
    assert artifact_path(tmp_path, Pair("onnx", "int4")) == tmp_path / "export" / "onnx" / "int4"
    assert artifact_path(tmp_path, Pair("genai", "int4")) == tmp_path / "export" / "onnx-genai" / "int4"
    assert artifact_path(tmp_path, Pair("coreml", "int8")) == tmp_path / "export" / "model.int8.mlpackage"


def test_summarize():
    from kititans.bench.speed import summarize

    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 10.0 and s["n"] == 4
    assert s["q1"] == pytest.approx(1.75) and s["q3"] == pytest.approx(4.75) and s["samples"] == [3, 1, 2, 10]
    assert summarize([5.0])["stdev"] == 0.0


def test_formatting():
    from kititans.bench.report import drift, fmt, kld

    assert [fmt(x) for x in (12345.6, 123.4, 12.34, 1.234, 0.01234, 0.0000417, None)] == [
        "12,346",
        "123",
        "12.3",
        "1.23",
        "0.0123",
        "4.17e-05",
        "–",
    ]
    assert drift(-0.0001) == "0.000" and drift(0.53) == "+0.530" and kld(-2e-6) == "<1e-5"


def test_onnx_lookup_tables_are_not_read_per_token(tmp_path):
    """An initializer read only by Gather (an embedding) is file size but not per-token traffic."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from kititans.bench.artifact import onnx_weight_bytes

    emb = numpy_helper.from_array(np.zeros((100, 8), np.float32), "emb")
    w = numpy_helper.from_array(np.zeros((8, 100), np.float32), "w")
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"]), helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100])],
        [emb, w],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    assert onnx_weight_bytes(tmp_path) == (2 * 3200, 3200)


def test_peak_memory_is_this_process_own():
    """A child started from a big parent reports its own peak (getrusage would carry the parent's over)."""
    import subprocess

    big = np.ones(200 * 2**20 // 8)  # 200 MiB in this process
    code = "from kititans.bench.device import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
    assert child < 150 * 2**20 and big.sum() > 0


def test_a_worker_past_its_time_limit_is_a_failed_pair(tmp_path):
    from kititans.bench.harness import run_worker

    job = {"mode": "measure", "runtime": "torch", "quant": "fp32", "artifact": str(tmp_path), "speed": None}
    res = run_worker(job, tmp_path, "slow", timeout=0.05, on_event=lambda e: None)
    assert res["status"] == "failed" and res["reason"].startswith("timed out after")


def test_a_worker_failure_keeps_its_one_line_reason(tmp_path):
    from kititans.bench.harness import run_worker

    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    job = {"mode": "measure", "runtime": "llamacpp", "quant": "f16", "artifact": str(tmp_path / "bad.gguf")}
    events = []
    res = run_worker(job, tmp_path, "bad", timeout=120, on_event=events.append)
    assert res["status"] == "failed" and "\n" not in res["reason"] and res["reason"]
    assert [e["stage"] for e in events][:2] == ["import", "load"]
    assert json.loads(Path(tmp_path / "bad.result.json").read_text())["status"] == "failed"
