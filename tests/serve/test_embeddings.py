"""`/v1/embeddings` for encoder artifacts through the openai client (its default encoding_format is base64):
the vectors equal `kititans embed`'s (run dir, GGUF, ONNX; CoreML on macOS), concurrent requests are batched
into one call of the encoder, and a language-model route answers a clear 400. About 10 s (exports: slow)."""

from __future__ import annotations

import json
import platform
import threading

import numpy as np
import pytest

from kititans.cli import main
from kititans.export import ExportOptions, export_model
from tests.serve.conftest import client, start

openai = pytest.importorskip("openai", reason="the serve tests talk to the server with the openai client")

TEXTS = ["How do I reset my password?", "The little robot found a red ball in the garden.", "x",
         "Once upon a time there was a girl who loved to read stories about the sea."]  # fmt: skip


def cli_embed(capsys, path) -> np.ndarray:
    """What `kititans embed PATH --text ...` prints: one JSON vector per line (6 decimals)."""
    capsys.readouterr()
    assert main(["embed", str(path), *[a for t in TEXTS for a in ("--text", t)]]) == 0
    return np.array([json.loads(ln) for ln in capsys.readouterr().out.splitlines()], dtype=np.float32)


def check_served(path, capsys) -> None:
    want = cli_embed(capsys, path)
    s = start(path)
    try:
        c = client(s)
        out = c.embeddings.create(model=s.info.id, input=TEXTS)  # base64 on the wire
        got = np.array([d.embedding for d in out.data], dtype=np.float32)
        assert [d.index for d in out.data] == [0, 1, 2, 3] and out.usage.prompt_tokens > len(TEXTS)
        assert (got * want).sum(1).min() >= 0.9999, path
        assert np.abs(got - want).max() < 1e-5  # the same vectors, printed to 6 decimals
        floats = c.embeddings.create(model=s.info.id, input=TEXTS[0], encoding_format="float")
        assert float(np.dot(floats.data[0].embedding, got[0])) >= 0.9999  # alone vs in a batch of 4
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=s.info.id, messages=[{"role": "user", "content": "hi"}])
        assert e.value.body["code"] == "not_a_language_model"
    finally:
        s.close()


def test_run_dir_embeddings_equal_kititans_embed_and_batch_across_requests(encoder_run, capsys):
    enc = encoder_run[0]
    check_served(enc, capsys)
    s = start(enc)
    calls = []
    embed = s.engine.rt.embed_batch
    s.engine.rt.embed_batch = lambda rows: (calls.append(len(rows)), embed(rows))[1]
    try:
        c, gate, results = client(s), threading.Barrier(6), {}

        def ask(i: int) -> None:
            gate.wait()
            results[i] = c.embeddings.create(model=s.info.id, input=[TEXTS[i % 4], TEXTS[(i + 1) % 4]])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        alone = c.embeddings.create(model=s.info.id, input=TEXTS).data
        for i, r in results.items():
            got = np.array([d.embedding for d in r.data])
            want = np.array([alone[i % 4].embedding, alone[(i + 1) % 4].embedding])
            assert (got * want).sum(1).min() >= 0.9999
        assert len(results) == 6 and max(calls) > 2  # rows of several requests went in one batch
        tokens = c.embeddings.create(model=s.info.id, input=[[1, 5, 9, 13]], dimensions=16)
        assert len(tokens.data[0].embedding) == 16
        assert abs(np.linalg.norm(tokens.data[0].embedding) - 1) < 1e-5
    finally:
        s.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fmt", "quant", "needs"), [("gguf", "f32", "llama_cpp"), ("onnx", "fp32", "onnxruntime")]
)
def test_exported_encoders_serve_like_kititans_embed(encoder_run, capsys, fmt, quant, needs):
    pytest.importorskip(needs)
    path = export_model(encoder_run[0], fmt, quant, options=ExportOptions(progress=False)).path
    check_served(path, capsys)


@pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML runs only on macOS")
def test_coreml_encoder_serves_like_kititans_embed(encoder_run, capsys):
    path = export_model(encoder_run[0], "coreml", "fp16", options=ExportOptions(progress=False)).path
    check_served(path, capsys)


def test_search_route_over_an_index(encoder_run, tmp_path, capsys):
    """`kititans serve ENCODER --index DIR`: POST /v1/search answers what `kititans search --index` ranks
    (the query embedded in the engine thread), bad bodies get a 400, and a server without --index a 404."""
    import httpx

    from kititans.retrieval.index import build_index, load_index
    from kititans.retrieval.search import Searcher
    from kititans.retrieval.settings import encoder_of
    from kititans.runtimes import load_runtime

    enc = encoder_run[0]
    rt = load_runtime(enc)
    docs = [{"source": f"d{i}.txt", "text": t} for i, t in enumerate(TEXTS)]
    build_index(tmp_path / "idx", encoder_of(rt, enc.name), docs, passage_tokens=32, stride=16)
    want = Searcher(load_index(tmp_path / "idx"), encoder_of(rt, enc.name)).search(
        "reset password", "hybrid", 3
    )
    s = start(enc, index=str(tmp_path / "idx"))
    try:
        r = httpx.post(
            s.url + "/v1/search", json={"query": ["reset password", "robot"], "top_k": 3}, timeout=60
        )
        data = r.json()["data"]
        assert r.status_code == 200 and {d["query_index"] for d in data} == {0, 1}
        got = [(d["document"], d["source"]) for d in data if d["query_index"] == 0]
        assert got == [(h.doc, h.source) for h in want]
        assert [d["score"] for d in data if d["query_index"] == 0] == pytest.approx([h.score for h in want])
        r = httpx.post(s.url + "/v1/search", json={"query": "x", "mode": "psychic"}, timeout=60)
        assert r.status_code == 400 and "'mode' must be one of" in r.json()["error"]["message"]
    finally:
        s.close()
    s = start(enc)
    try:
        r = httpx.post(s.url + "/v1/search", json={"query": "x"}, timeout=60)
        assert r.status_code == 404 and r.json()["error"]["code"] == "no_index"
    finally:
        s.close()
