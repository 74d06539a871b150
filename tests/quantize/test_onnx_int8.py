"""The two ONNX int8 levels: `int8` (MatMulNBits 8-bit blocks, weight-only) and `int8_dynamic`
(quantize_dynamic, activations quantized per call), exported from the shared debug run and measured in ONNX
Runtime against the fp32 model; the weight-only level keeps more (it is `int8` because it measured better).
About 25 s after the shared debug run."""

from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exports(debug_run, tmp_path_factory):
    from kititans.export import ExportOptions, export_model

    out = tmp_path_factory.mktemp("onnx-int8")
    return {
        q: export_model(debug_run, "onnx", q, out / q, ExportOptions(progress=False))
        for q in ("fp32", "int8", "int8_dynamic")
    }


def test_levels_ops_and_manifest(exports):
    ops = {q: r.manifest["onnx"]["ops"] for q, r in exports.items()}
    assert ops["int8"]["com.microsoft.MatMulNBits"] == 4 * 2 + 1 and "MatMulInteger" not in ops["int8"]
    assert "MatMulInteger" in ops["int8_dynamic"] and "com.microsoft.MatMulNBits" not in ops["int8_dynamic"]
    q = exports["int8"].manifest["quantization"]
    assert (q["weights"], q["block_size"], q["symmetric"], q["accuracy_level"]) == ("int8", 32, True, 4)
    assert exports["int8_dynamic"].manifest["quantization"]["method"].endswith("quantize_dynamic")


def test_weight_only_int8_loses_less_than_dynamic(exports, debug_run, tmp_path):
    from kititans.bench.evaldata import eval_chunks
    from kititans.bench.quality import measure, write_reference
    from kititans.runtimes import load_runtime

    chunks, _ = eval_chunks(debug_run, None, 128, 6)
    ref = tmp_path / "ref.npz"
    write_reference(ref, chunks, load_runtime(str(debug_run), "torch"))
    q = {k: measure(load_runtime(str(exports[k].path), "onnx"), ref) for k in ("int8", "int8_dynamic")}
    assert q["int8"].kld_mean < q["int8_dynamic"].kld_mean
    assert q["int8"].same_top >= 0.97 and q["int8"].kld_mean < 1e-3


def test_bench_knows_both_levels():
    from kititans.bench.pairs import select_pairs

    keys = [p.key for p in select_pairs(["onnx"], ["int8", "int8_dynamic"])]
    assert keys == ["onnx:int8", "onnx:int8_dynamic"]
