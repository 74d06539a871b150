"""ONNX export of the trained debug model, run back in onnxruntime: greedy decode equals PyTorch, batches
with left padding, int8/int4 agreement, manifest, unsupported combinations. About 60 s (exports ~4 s each)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from kititans.bench.quality import chunk_logprobs, compare, make_chunks, targets  # noqa: E402
from kititans.checkpoint import load_checkpoint  # noqa: E402
from kititans.data.builtin import generate_corpus  # noqa: E402
from kititans.errors import KititansError, UnsupportedExport  # noqa: E402
from kititans.export import ExportOptions, export_model  # noqa: E402
from kititans.generate import Generation, SamplingConfig  # noqa: E402
from kititans.runtimes import load_runtime  # noqa: E402
from kititans.runtimes.onnx import OnnxRuntime  # noqa: E402

PROMPT = "Once upon a time, a little girl named Mia"


@pytest.fixture(scope="module")
def exports(debug_run, tmp_path_factory) -> dict[str, Path]:
    """fp32 / int8 / int4 exports (opset 23), written once for the module."""
    out = tmp_path_factory.mktemp("onnx")
    return {
        q: export_model(debug_run, "onnx", q, out / q, ExportOptions(progress=False)).path
        for q in ("fp32", "int8", "int4")
    }


@pytest.fixture(scope="module")
def ckpt(debug_run):
    return load_checkpoint(debug_run)


def greedy(rt, ids, n=32):
    gen = Generation(rt, ids, SamplingConfig(temperature=0, max_tokens=n), stop_ids=())
    return list(gen)


def test_fp32_greedy_and_logits_equal_pytorch(exports, ckpt, debug_run):
    rt = load_runtime(exports["fp32"])  # detected from the folder: onnx
    assert isinstance(rt, OnnxRuntime) and rt.context_length == ckpt.config.context_length
    ids = [rt.codec.bos_id, *rt.codec.encode(PROMPT)]
    ours = greedy(rt, ids)
    assert ours == greedy(load_runtime(debug_run), ids) and len(ours) == 32
    # every position's logits (prompt + the 32 decode steps, through the cache) against one full forward
    rt.reset()
    seq = ids + ours
    got = [rt.forward(ids, all_logits=True)] + [rt.forward([t], all_logits=True) for t in ours[:-1]]
    with torch.no_grad():
        ref = ckpt.model(torch.tensor([seq[:-1]]))[0].numpy()
    assert np.abs(np.concatenate(got) - ref).max() < 1e-4
    assert rt.n_past == len(seq) - 1


def test_batch_of_two_with_left_padding(exports, ckpt):
    rt = OnnxRuntime(exports["fp32"])
    a = [ckpt.tokenizer.bos_id, *ckpt.tokenizer.encode("The cat sat on the mat and looked")]
    b = [ckpt.tokenizer.bos_id, *ckpt.tokenizer.encode("Tom had a red ball")]
    pad = len(a) - len(b)
    assert pad > 0
    ids = np.array([a, [0] * pad + b])
    mask = np.array([[1] * len(a), [0] * pad + [1] * len(b)])
    seqs, past, logits_rows = [list(a), list(b)], None, [[], []]
    for _ in range(4):  # prefill, then 3 greedy decode steps fed with the graph's own cache
        pos = np.clip(mask.cumsum(1) - 1, 0, None)[:, -ids.shape[1] :]
        logits, past = rt.step(ids, mask, pos, past)
        nxt = logits[:, -1].argmax(-1)
        for r in range(2):
            logits_rows[r].append(logits[r, -1])
            seqs[r].append(int(nxt[r]))
        ids = nxt[:, None]
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    for r in range(2):
        with torch.no_grad():
            ref = ckpt.model(torch.tensor([seqs[r][:-1]]))[0].numpy()[-4:]
        assert np.abs(np.stack(logits_rows[r]) - ref).max() < 1e-4


def test_int8_int4_agree_with_fp32_on_held_out_text(exports, debug_run):
    tok = load_checkpoint(debug_run).tokenizer
    text = "\n".join(generate_corpus(seed=7, target_bytes=20_000))  # training used seed 0
    chunks = make_chunks(tok.encode(text), 128, tok.bos_id, max_chunks=8)
    base = np.concatenate(list(chunk_logprobs(load_runtime(debug_run), chunks)))
    y = targets(chunks)
    result = {}
    for q in ("fp32", "int8", "int4"):
        result[q] = compare(base, np.concatenate(list(chunk_logprobs(OnnxRuntime(exports[q]), chunks))), y)
    print({q: (round(r.same_top, 4), round(r.kld_mean, 5)) for q, r in result.items()})
    assert result["fp32"].same_top == 1.0 and result["fp32"].kld_mean < 1e-6
    assert result["int8"].same_top >= 0.93 and result["int8"].kld_mean < 0.01
    assert result["int4"].same_top >= 0.88 and result["int4"].kld_mean < 0.03
    assert result["int8"].kld_mean < result["int4"].kld_mean  # 8 bits lose less than 4


def test_graph_io_manifest_and_sizes(exports):
    manifests = {q: json.loads((p / "manifest.json").read_text()) for q, p in exports.items()}
    for q, path in exports.items():
        m = manifests[q]
        assert m["format"] == "onnx" and m["quant"] == q and m["source"]["family"] == "lite"
        assert {"tokenizer.model", "tokenizer_config.json", "model.onnx"} <= {f.name for f in path.iterdir()}
        assert m["check"]["top1_agreement"] >= (1.0 if q == "fp32" else 0.8)
        assert any("kititans generate" in h for h in m["next"])
        graph = onnx.load(str(path / "model.onnx"), load_external_data=False)
        names = [i.name for i in graph.graph.input]
        assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
        assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
        outs = {
            o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
            for o in graph.graph.output
        }
        assert outs["logits"][:2] == ["batch", "sequence_length"]
        assert outs["present.0.key"][2] == "total_sequence_length"
        past = [d.dim_param for d in graph.graph.input[3].type.tensor_type.shape.dim]
        assert past[0] == "batch" and past[2] == "past_sequence_length"
    ops = {q: m["onnx"]["ops"] for q, m in manifests.items()}
    assert ops["fp32"]["Attention"] == 2 and "RotaryEmbedding" in ops["fp32"]  # fused opset-23 ops
    # q/k/v and gate/up packed: 4 weight MatMuls a layer + the head, all of them 4-bit
    assert ops["int4"]["com.microsoft.MatMulNBits"] == 4 * 2 + 1 and "MatMul" not in ops["int4"]
    assert ops["int8"]["com.microsoft.MatMulNBits"] == 4 * 2 + 1  # int8 is weight-only 8-bit blocks now
    q4 = manifests["int4"]["quantization"]
    assert (q4["weights"], q4["block_size"], q4["symmetric"], q4["accuracy_level"]) == ("int4", 32, True, 4)
    size = {q: m["size_bytes"] for q, m in manifests.items()}
    assert size["int4"] < size["int8"] < 0.5 * size["fp32"]


def test_fp16_external_data_and_opset18_graph(ckpt, debug_run, tmp_path):
    """fp16 weights as model.onnx.data; the plain opset-18 graph computes the same as the fused one."""
    opts = ExportOptions(progress=False, extra={"external_data": True})
    r16 = export_model(debug_run, "onnx", "fp16", tmp_path / "fp16", opts)
    assert (r16.path / "model.onnx.data").stat().st_size > 2_000_000
    assert (
        r16.manifest["onnx"]["external_data"] == "model.onnx.data"
        and r16.manifest["onnx"]["dtype"] == "float16"
    )
    r18 = export_model(
        debug_run, "onnx", "fp32", tmp_path / "o18", ExportOptions(progress=False, extra={"opset": 18})
    )
    assert r18.manifest["onnx"]["opset"] == 18 and "Attention" not in r18.manifest["onnx"]["ops"]
    ids = [ckpt.tokenizer.bos_id, *ckpt.tokenizer.encode(PROMPT)]
    with torch.no_grad():
        ref = ckpt.model(torch.tensor([ids]))[0].numpy()
    for path, tol in ((r16.path, 0.05), (r18.path, 1e-4)):
        got = OnnxRuntime(path).forward(ids, all_logits=True)
        assert np.abs(got - ref).max() < tol, path


def test_unsupported_combinations_fail_with_one_line(debug_run, tmp_path):
    with pytest.raises(UnsupportedExport, match="no quantization 'q4_k_m'"):
        export_model(debug_run, "onnx", "q4_k_m")
    with pytest.raises(KititansError, match="opset 17 is not supported"):
        export_model(debug_run, "onnx", "fp32", tmp_path / "x", ExportOptions(extra={"opset": 17}))
    with pytest.raises(UnsupportedExport, match="--imatrix applies to gguf only"):
        export_model(debug_run, "onnx", "int8", tmp_path / "y", ExportOptions(imatrix="val"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cli_export_and_generate(debug_run, exports, tmp_path, capsys):
    from kititans.cli import main

    assert main(["export", str(debug_run), "--format", "onnx", "--quant", "int2", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: onnx has no quantization 'int2'")
    args = ["--prompt", PROMPT, "--temperature", "0", "--max-tokens", "12"]
    assert main(["generate", str(exports["fp32"]), *args]) == 0
    onnx_text = capsys.readouterr().out
    assert main(["generate", str(debug_run), *args]) == 0
    assert onnx_text == capsys.readouterr().out and len(onnx_text) > len(PROMPT)
