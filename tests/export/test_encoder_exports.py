"""The encoder through the shared export / runtime / bench machinery: GGUF as llama.cpp's non-causal
`llama-embed` with mean pooling (run by llama.cpp's embedding API, ours and llama-cpp-python's own `Llama`),
ONNX with pooling and normalisation in the graph (run by a bare onnxruntime session), every artifact checked
against PyTorch by cosine similarity, and `kititans bench` on the encoder run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kititans.cli import main
from kititans.embedding import embed_texts, token_rows
from kititans.export import export_model
from kititans.runtimes.base import load_runtime

TEXTS = [
    "How do I reset my password?",
    "The little robot found a red ball in the garden.",
    "x",
    "Once upon a time there was a girl who loved to read stories about the sea and its fish.",
]


@pytest.fixture(scope="module")
def enc(encoder_run):
    return encoder_run[0]


@pytest.fixture(scope="module")
def reference(enc):
    return embed_texts(load_runtime(enc), TEXTS, batch_size=1)


@pytest.mark.parametrize(("quant", "floor"), [("f32", 0.99999), ("q8_0", 0.9995)])
def test_gguf_is_llama_embed_and_llamacpp_gives_our_vectors(enc, reference, quant, floor):
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    res = export_model(enc, "gguf", quant, options=_quiet())
    fields = gguf.GGUFReader(str(res.path)).fields

    def value(key):
        f = fields[key]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]][0]

    assert value("general.architecture") == "llama-embed"
    assert int(value("llama-embed.pooling_type")) == 1  # MEAN
    assert bool(value("llama-embed.attention.causal")) is False
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(res.path)).tensors}
    assert res.manifest["modelfile"] is None  # no Ollama chat Modelfile for an encoder
    rt = load_runtime(res.path)
    assert rt.task == "embed"
    got = embed_texts(rt, TEXTS, batch_size=len(TEXTS))  # several sequences in one llama_decode
    assert (got * reference).sum(1).min() >= floor
    one = embed_texts(rt, TEXTS, batch_size=1)
    assert (got * one).sum(1).min() >= 0.99999  # batching sequences together changes nothing


def test_llama_cpp_python_embed_api_loads_the_gguf_as_it_is(enc, reference):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export_model(enc, "gguf", "f32", options=_quiet()).path
    llm = llama_cpp.Llama(str(path), embedding=True, n_ctx=128, verbose=False, use_extra_bufts=False)
    got = np.asarray([llm.embed(t, normalize=True) for t in TEXTS], dtype=np.float32)
    assert got.shape == reference.shape  # pooled by llama.cpp (the GGUF's pooling type), one vector per text
    assert (got * reference).sum(1).min() >= 0.9999


@pytest.mark.parametrize(("quant", "floor"), [("fp32", 0.99999), ("int8", 0.999), ("int4", 0.99)])
def test_onnx_pools_and_normalises_in_the_graph(enc, reference, quant, floor):
    ort = pytest.importorskip("onnxruntime")
    res = export_model(enc, "onnx", quant, options=_quiet())
    assert res.manifest["onnx"]["kind"] == "embed"
    assert res.manifest["check"]["min_cosine"] >= floor  # the exporter's own check, padded batch vs torch
    sess = ort.InferenceSession(str(res.path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in sess.get_outputs()] == ["sentence_embedding", "last_hidden_state"]
    codec = load_runtime(res.path).codec
    rows = token_rows(codec, TEXTS, 128)
    ids = np.zeros((len(rows), max(map(len, rows))), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    emb, hidden = sess.run(None, {"input_ids": ids, "attention_mask": mask})
    assert hidden.shape[:2] == ids.shape
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert (emb * reference).sum(1).min() >= floor


def test_lm_verbs_refuse_encoder_artifacts_and_embed_reads_them(enc, capsys):
    path = export_model(enc, "onnx", "fp32", options=_quiet()).path
    assert main(["generate", str(path), "--prompt", "hi"]) == 2
    assert "embedding model" in capsys.readouterr().err
    assert main(["embed", str(path), "--text", "hello there"]) == 0
    vec = json.loads(capsys.readouterr().out)
    assert abs(np.linalg.norm(vec) - 1.0) < 1e-4


def test_bench_measures_embeddings_per_second_and_cosine(enc, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "bench"
    args = ["bench", str(enc), "--runtimes", "torch:fp32,onnx:int8", "--trials", "1", "--out", str(out)]
    assert main([*args, "--quiet"]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["task"] == "embed" and report["eval"]["pairs"] >= 2
    rows = {r["key"]: r for r in report["results"]}
    assert all(r["status"] == "ok" for r in rows.values()), rows
    for r in rows.values():
        assert r["speed"]["batch"]["1"]["median"] > 0 and r["speed"]["batch"]["32"]["median"] > 0
        assert 0.0 <= r["quality"]["retrieval_at1"] <= 1.0
    assert rows["torch:fp32"]["quality"]["cosine_min"] == 1.0
    assert rows["onnx:int8"]["quality"]["cosine_min"] >= 0.999
    md = (out / "bench.md").read_text()
    assert "emb/s b32" in md and "cosine mean" in md


def _quiet():
    from kititans.export import ExportOptions

    return ExportOptions(progress=False)


@pytest.mark.parametrize(("quant", "floor"), [("fp16", 0.999), ("int4", 0.95)])
def test_coreml_package_is_validated_by_spec_weights_and_cosine(enc, quant, floor):
    pytest.importorskip("coremltools")
    from kititans.export.coreml_meta import read_package_metadata

    res = export_model(enc, "coreml", quant, options=_quiet())
    v = res.manifest["validation"]
    assert v["problems"] == []
    assert v["spec"]["inputs"] == {"input_ids": "int32", "attention_mask": "int32"}
    assert v["spec"]["outputs"] == ["embedding"]
    assert v["weights"]["missing"] == [] and v["weights"]["max_relative_error"] <= v["weights"]["bound"]
    assert v["check"]["min_cosine"] >= floor  # the package's own weights, fp16 compute, against fp32 torch
    if quant == "int4":
        assert any("constexpr_blockwise_shift_scale" in h for h in v["ops"].values())
    meta = read_package_metadata(res.path)
    assert json.loads(meta["user_defined"]["kititans.state_layout"])["kind"] == "embed"
    assert (res.path.parent / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.macos
@pytest.mark.skipif(__import__("platform").system() != "Darwin", reason="Core ML runs only on macOS")
def test_coreml_runtime_embeds_like_torch_on_macos(enc, reference):
    path = export_model(enc, "coreml", "fp16", options=_quiet()).path
    got = embed_texts(load_runtime(path), TEXTS)
    assert (got * reference).sum(1).min() >= 0.999
