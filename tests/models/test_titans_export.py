"""The functional decode step exports to ONNX as it is (no autograd, no value-dependent control flow) and runs in
ONNX Runtime with the state as explicit inputs/outputs, matching torch. Slow (the exporter takes ~30 s per graph
on the shared CPU): the ONNX exporter's own tests cover the shipped path; this guards the step's design."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kititans.models.titans import SPEC

pytestmark = pytest.mark.slow


class Step(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, *state):
        return self.model.step(ids, *state)


@pytest.mark.parametrize("T", [1, 8], ids=["decode", "chunk_prefill"])
def test_step_exports_to_onnx_and_matches(tmp_path, T):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = SPEC.build(SPEC.make_config("titans-debug")).eval()  # window 32, chunk 8
    names = [n for n, _, _ in model.state_spec(1)]
    state = model.state_to_tensors(model.new_state(1))
    path = tmp_path / "step.onnx"
    torch.onnx.export(
        Step(model),
        (torch.zeros(1, T, dtype=torch.long), *state),
        str(path),
        input_names=["input_ids", *(f"past.{n}" for n in names)],
        output_names=["logits", *(f"present.{n}" for n in names)],
        opset_version=18,
        dynamo=True,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randint(0, 512, (1, 72), generator=torch.Generator().manual_seed(0))
    st_t, st_o, worst = state, [t.numpy() for t in state], 0.0
    with torch.no_grad():
        full = model(x)
        for i in range(0, 72, T):  # > 2 windows, 9 chunk ends
            out_t = model.step(x[:, i : i + T], *st_t)
            feeds = {"input_ids": x[:, i : i + T].numpy(), **{f"past.{n}": a for n, a in zip(names, st_o)}}
            out_o = sess.run(None, feeds)
            st_t, st_o = out_t[1:], out_o[1:]
            worst = max(worst, float(np.abs(out_o[0] - full[:, i : i + T].numpy()).max()))
    assert worst < 1e-4
    assert int(st_o[0][0]) == 72
