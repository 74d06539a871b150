"""Titans prompts in fewer, larger calls (a long prefill: a whole mac segment, or the whole chunks of a window),
planned alike by the model and every runtime, exported as one more ONNX graph equal to PyTorch; the ONNX
runtime's single-token graphs on one intra-op thread, its prefill graphs on the requested threads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kititans.checkpoint import load_checkpoint
from kititans.models.titans.state import long_prefill, pick_kind, plan, step_kinds
from kititans.runtimes import load_runtime
from kititans.runtimes.base import plan_chunks

pytestmark = pytest.mark.usefixtures("one_thread")


def test_long_prefill_kinds_and_the_plan():
    mal = step_kinds(16, None, long_prefill(16, 128, False))
    assert [(k.name, k.tokens, k.every) for k in mal][-1] == ("prefill_long", 128, 128)
    mac = step_kinds(16, 128, long_prefill(16, 128, True))  # a whole segment: it always closes one
    assert [(k.name, k.tokens, k.every, k.closes_segment) for k in mac][-1] == (
        "prefill_long_segment",
        128,
        128,
        True,
    )
    half = step_kinds(16, 128, 64)  # a long call that divides the segment: two kinds, like the chunk prefill
    assert [(k.name, k.every) for k in half if k.tokens == 64] == [
        ("prefill_long", 64),
        ("prefill_long_segment", 128),
    ]
    assert (
        pick_kind(half, 64, 64).name == "prefill_long_segment"
        and pick_kind(half, 128, 64).name == "prefill_long"
    )
    assert long_prefill(64, 2048, False) == 512  # capped: the graph unrolls one update per chunk
    sizes = [k.tokens for k in mac]
    calls = plan(300, 5, sizes)  # from 5: single tokens to 16, chunks to 128, a segment, chunks, one token
    lengths = [n for _, n in calls]
    assert lengths == [1] * 11 + [16] * 7 + [128] + [16] * 3 + [1]
    assert sum(lengths) == 300
    ids = list(range(300))
    assert [len(c) for c in plan_chunks(ids, 5, 16, exact=True, sizes=sizes)] == lengths  # runtimes alike
    assert [len(c) for c in plan_chunks(ids, 5, 16, exact=True)] == [n for _, n in plan(300, 5, [1, 16])]


def test_onnx_long_prefill_equals_torch_and_decode_graphs_use_one_thread(titans_run_mac, titans_onnx_mac):
    info = json.loads((titans_onnx_mac / "manifest.json").read_text())["onnx"]
    steps = {s["name"]: s for s in info["steps"]}
    assert (steps["prefill_long_segment"]["tokens"], steps["prefill_long_segment"]["every"]) == (32, 32)
    rt = load_runtime(titans_onnx_mac, "onnx", threads=2)
    threads = {f: s.get_session_options().intra_op_num_threads for f, s in rt.steps.sessions.items()}
    assert {f: n for f, n in threads.items() if n == 1} == {
        s["file"]: 1 for s in info["steps"] if s["tokens"] == 1
    }
    assert threads["prefill_long_segment.onnx"] == threads["prefill.onnx"] == 2
    both = load_runtime(titans_onnx_mac, "onnx", threads=2, decode_threads=2)
    assert both.steps.sessions["model.onnx"].get_session_options().intra_op_num_threads == 2
    model = load_checkpoint(titans_run_mac).model
    seq = torch.randint(3, 500, (83,), generator=torch.Generator().manual_seed(0)).tolist()
    got = np.concatenate([rt.forward(seq[:70], all_logits=True), rt.forward(seq[70:], all_logits=True)])
    with torch.no_grad():  # 70: two segments (long), a chunk, 6 tokens; then 13 tokens from an odd position
        ref = model(torch.tensor([seq]))[0].numpy()
    assert np.abs(got - ref).max() < 1e-4
