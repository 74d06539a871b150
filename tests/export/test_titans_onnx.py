"""Titans ONNX export (decode + chunk-prefill graphs over one fixed-size state), run back in onnxruntime:
logits equal PyTorch across memory-chunk boundaries and past the attention window, greedy decode equal,
int8/int4 agreement bounded, manifest and state layout. About 40 s."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from kititans.checkpoint import load_checkpoint
from kititans.errors import KititansError
from kititans.export import ExportOptions, export_model
from kititans.generate import Generation, SamplingConfig
from kititans.runtimes import load_runtime
from kititans.runtimes.onnx import OnnxRuntime

PROMPT = "Once upon a time, a little girl named Mia found a red ball in the garden. She asked her mother"


@pytest.fixture(scope="module")
def exports(titans_run, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("titans-onnx")
    return {
        q: export_model(titans_run, "onnx", q, out / q, ExportOptions(progress=False)).path
        for q in ("fp32", "int8", "int4")
    }


@pytest.fixture(scope="module")
def ckpt(titans_run):
    return load_checkpoint(titans_run)


def test_folder_has_both_graphs_and_the_state_layout(exports, ckpt):
    folder = exports["fp32"]
    info = json.loads((folder / "manifest.json").read_text())["onnx"]
    assert info["kind"] == "recurrent" and info["prefill"]["tokens"] == ckpt.config.mem_chunk
    assert (folder / "model.onnx").is_file() and (folder / "prefill.onnx").is_file()
    names = [n for n, _, _ in ckpt.model.state_spec(1)]
    assert [s["input"] for s in info["states"]] == [f"past_{n}" for n in names]
    assert [s["output"] for s in info["states"]] == [f"present_{n}" for n in names]
    assert all(s["grow_axis"] is None for s in info["states"])  # fixed size: nothing grows
    # the two graphs read one weight file, each weight stored once (the memory's W_0 ships as the state)
    params = sum(p.numel() for p in ckpt.model.parameters())
    assert (folder / "weights.onnx.data").stat().st_size < 1.1 * 4 * params
    assert (
        info["external_data"] == "weights.onnx.data" and info["initial_state"] == "initial_state.safetensors"
    )
    rt = OnnxRuntime(folder)
    assert [i.name for i in rt.prefill.get_inputs()] == [i.name for i in rt.session.get_inputs()]
    with pytest.raises(KititansError, match="recurrent"):  # the KV-cache batch API does not apply
        rt.step(np.zeros((1, 1)), np.ones((1, 1)), np.zeros((1, 1)))
    assert [tuple(i.shape) for i in rt.session.get_inputs()][1:] == [
        tuple(s["shape"]) for s in info["states"]
    ]


def test_fp32_logits_equal_pytorch_over_chunks_and_past_the_window(exports, ckpt):
    """A prompt through the prefill graph (chunks of 8) plus a remainder through the decode graph, then
    token-by-token decode to 3x the window (96 positions, 12 memory chunks), against the parallel forward."""
    rt = load_runtime(exports["fp32"])
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, ckpt.config.vocab_size, (100,), generator=g).tolist()
    got = [rt.forward(seq[:21], all_logits=True)]  # 2 prefill chunks + 5 decode steps
    got += [rt.forward([t], all_logits=True) for t in seq[21:]]
    assert rt.n_past == 100
    with torch.no_grad():
        ref = ckpt.model(torch.tensor([seq]))[0].numpy()
    assert np.abs(np.concatenate(got) - ref).max() < 1e-4


def test_greedy_equals_pytorch_and_int_quants_agree(exports, ckpt, titans_run):
    torch_rt = load_runtime(titans_run)
    ids = [torch_rt.codec.bos_id, *torch_rt.codec.encode(PROMPT)]
    want = list(Generation(torch_rt, ids, SamplingConfig(temperature=0, max_tokens=32), stop_ids=()))
    rt = load_runtime(exports["fp32"])
    assert list(Generation(rt, ids, SamplingConfig(temperature=0, max_tokens=32), stop_ids=())) == want
    seq = ids + want
    with torch.no_grad():
        ref = ckpt.model(torch.tensor([seq]))[0].numpy().argmax(-1)
    for quant, floor in (("int8", 0.9), ("int4", 0.75)):
        manifest = json.loads((exports[quant] / "manifest.json").read_text())
        assert manifest["check"]["top1_agreement"] >= floor, quant
        q = load_runtime(exports[quant])
        top1 = (q.forward(seq, all_logits=True).argmax(-1) == ref).mean()
        assert top1 >= floor, (quant, top1)
        size = lambda q: (exports[q] / "weights.onnx.data").stat().st_size  # noqa: E731
        assert size(quant) < 0.6 * size("fp32"), quant


def test_runtime_decodes_past_the_training_length(exports, ckpt):
    """The state does not grow: decoding past context_length works and costs the same per token."""
    rt = load_runtime(exports["fp32"])
    n = ckpt.config.context_length + 8
    ids = torch.randint(0, ckpt.config.vocab_size, (n,), generator=torch.Generator().manual_seed(2)).tolist()
    out = rt.forward(ids)
    assert rt.n_past == n and np.isfinite(out).all()
