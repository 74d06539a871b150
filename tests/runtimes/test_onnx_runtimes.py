"""The ONNX Runtime runtimes: onnxruntime-genai's builder and generator on the same weights as PyTorch, our
runtime driving a foreign (genai) graph by its names, clear errors. About 25 s (one builder run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from kititans.checkpoint import load_checkpoint, save_checkpoint
from kititans.errors import KititansError, UnsupportedExport
from kititans.export import ExportOptions, export_model
from kititans.generate import Generation, SamplingConfig
from kititans.models.lite import SPEC, LiteConfig, LiteModel
from kititans.runtimes import load_runtime
from kititans.runtimes.onnx import OnnxRuntime


@pytest.fixture(scope="module")
def wide_run(debug_run, tmp_path_factory):
    """Random weights whose layer widths all differ from the vocab size (onnxruntime-genai's builder
    takes any Linear with vocab_size outputs for the LM head), with the debug tokenizer."""
    tok = load_checkpoint(debug_run).tokenizer
    cfg = LiteConfig(
        vocab_size=tok.vocab_size,
        dim=256,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=768,
        context_length=256,
    )
    torch.manual_seed(0)
    model = LiteModel(cfg).eval()
    with torch.no_grad():  # larger weights than the init: logits far from flat, so argmax means something
        for p in model.parameters():
            p.mul_(4.0) if p.ndim == 2 else p.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("wide") / "run"
    save_checkpoint(out, model, SPEC, cfg, tok)
    return out


def greedy(rt, ids, n=16):
    return list(Generation(rt, ids, SamplingConfig(temperature=0, max_tokens=n), stop_ids=()))


def test_genai_builder_and_runtime_follow_pytorch(wide_run):
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("transformers")
    from kititans.export.onnx import export_genai

    result = export_genai(wide_run, "fp32", progress=False)
    assert (result.path / "genai_config.json").is_file() and (
        result.path / "tokenizer/tokenizer.model"
    ).is_file()
    ckpt = load_checkpoint(wide_run)
    ids = [ckpt.tokenizer.bos_id, *ckpt.tokenizer.encode("Once upon a time, a little girl")]
    genai = load_runtime(result.path, "genai")
    assert genai.context_length == 256 and genai.vocab_size == ckpt.config.vocab_size
    expected = greedy(load_runtime(wide_run), ids)
    assert greedy(genai, ids) == expected
    # our runtime drives the builder's graph too (no position_ids, GroupQueryAttention), by its names
    assert greedy(OnnxRuntime(result.path), ids) == expected
    genai.reset()
    seq = ids + expected[:4]
    got = [genai.forward(ids, all_logits=True)] + [genai.forward([t], all_logits=True) for t in expected[:3]]
    with torch.no_grad():
        ref = ckpt.model(torch.tensor([seq[:-1]]))[0].numpy()
    assert np.abs(np.concatenate(got) - ref).max() < 1e-3 * np.abs(ref).max()


def test_genai_refuses_what_its_builder_would_get_wrong(debug_run):
    pytest.importorskip("onnxruntime_genai")
    from kititans.export.onnx import export_genai

    # the debug preset's FFN width equals its vocab size (512)
    with pytest.raises(UnsupportedExport, match="mistake model.layers.0.mlp.gate_proj"):
        export_genai(debug_run, "int4", progress=False)


def test_runtime_errors_are_one_line(wide_run, tmp_path):
    path = export_model(wide_run, "onnx", "fp32", tmp_path / "fp32", ExportOptions(progress=False)).path
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(KititansError, match="no CUDA provider: pip install onnxruntime-gpu"):
            OnnxRuntime(path, device="cuda")
    rt = OnnxRuntime(path, device="auto", threads=1, spin=False)
    rt.forward(list(range(3, 253)))
    with pytest.raises(KititansError, match="exceed the model's context of 256"):
        rt.forward(list(range(3, 10)))
    with pytest.raises(KititansError, match="no such model"):
        load_runtime(tmp_path / "missing")
