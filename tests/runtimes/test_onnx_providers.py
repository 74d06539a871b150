"""The ONNX runtime's execution providers for each --device (no GPU needed: the provider list is checked as
built, with the CUDA provider reported available)."""

from __future__ import annotations

import pytest

from kititans.errors import KititansError
from kititans.runtimes.onnx import device_index, providers_for

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_cuda_n_sets_the_cuda_providers_device_id():
    assert providers_for("cuda:1", CUDA) == [
        ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]
    assert providers_for("cuda", CUDA)[0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert providers_for("auto", CUDA)[0] == ("CUDAExecutionProvider", {"device_id": 0})
    assert providers_for("cpu", CUDA) == ["CPUExecutionProvider"]
    assert providers_for("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert device_index("cuda:3") == 3 and device_index("cpu") == 0


@pytest.mark.parametrize(
    "device, have, msg",
    [("cuda:1", ["CPUExecutionProvider"], "no CUDA provider"), ("cuda:x", CUDA, "expected cuda:N"),
     ("mps", CUDA, "cpu or cuda")],
)  # fmt: skip
def test_bad_devices_end_in_one_line(device, have, msg):
    with pytest.raises(KititansError, match=msg):
        providers_for(device, have)
