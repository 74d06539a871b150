"""Device, dtype and compile choices on machines this CI does not have (CUDA GPUs of several generations, a
Mac), simulated by patching what torch reports: each bad choice is one line at start-up, auto picks what is
native."""

from __future__ import annotations

import logging

import pytest
import torch

from kititans import device as D
from kititans.errors import KititansError


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two visible GPUs of a chosen compute capability; returns a setter for (capability, name)."""
    state = {"cap": (8, 0), "name": "NVIDIA A100-SXM4-80GB"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: state["cap"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: state["name"])

    def gpu(cap: tuple[int, int], name: str) -> None:
        state.update(cap=cap, name=name)

    return gpu


def test_a_gpu_index_that_does_not_exist_is_one_line(fake_cuda):
    assert D.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert D.resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(
        KititansError, match=r"--device cuda:3: this machine has 2 CUDA GPUs \(cuda:0 .. cuda:1\)"
    ):
        D.resolve_device("cuda:3")


def test_no_cuda_and_bad_device_names():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(KititansError, match="no CUDA GPU is visible"):
        D.resolve_device("cuda:0")
    with pytest.raises(KititansError, match="not a device"):
        D.resolve_device("gpu0")


def test_auto_dtype_is_native_bf16_or_fp16(fake_cuda):
    cuda = torch.device("cuda", 0)
    assert D.resolve_dtype("auto", cuda) == torch.bfloat16  # A100
    fake_cuda((7, 5), "Tesla T4")  # is_bf16_supported() says True there (emulation): we must not
    assert D.resolve_dtype("auto", cuda) == torch.float16
    with pytest.raises(KititansError, match=r"Tesla T4 \(compute capability 7.5\) has no native bf16"):
        D.resolve_dtype("bf16", cuda)
    assert D.resolve_dtype("fp16", cuda) == torch.float16


def test_mps_dtypes(monkeypatch):
    mps = torch.device("mps")
    assert D.resolve_dtype("auto", mps) == torch.float32
    monkeypatch.setattr(D, "macos_version", lambda: (13, 6))
    with pytest.raises(KititansError, match="bf16 on MPS needs macOS 14"):
        D.resolve_dtype("bf16", mps)
    monkeypatch.setattr(D, "macos_version", lambda: (14, 5))
    assert D.resolve_dtype("bf16", mps) == torch.bfloat16
    with pytest.raises(KititansError, match="fp16 training needs a CUDA GPU"):
        D.resolve_dtype("fp16", mps)


def test_compile_needs_a_working_compiler(fake_cuda, monkeypatch, caplog):
    import torch.utils._triton as triton_check

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(triton_check, "has_triton", lambda: False)
    with pytest.raises(KititansError, match="--compile on: Triton is not installed"):
        D.resolve_compile("on", cuda)
    with caplog.at_level(logging.WARNING, logger="kititans"):
        assert D.resolve_compile("auto", cuda) is False
    assert "torch.compile skipped: Triton" in caplog.text
    monkeypatch.setattr(triton_check, "has_triton", lambda: True)
    assert D.resolve_compile("auto", cuda) is True
    fake_cuda((6, 1), "Tesla P100")
    with pytest.raises(KititansError, match="compute capability 7.0 or newer"):
        D.resolve_compile("on", cuda)


def test_cpu_compile_without_a_cxx_compiler(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(D.shutil, "which", lambda _name: None)
    with pytest.raises(KititansError, match=r"no C\+\+ compiler on PATH"):
        D.resolve_compile("on", cpu)
    assert D.resolve_compile("auto", cpu, n_params=50_000_000) is False
    assert D.resolve_compile("off", cpu) is False
    with pytest.raises(KititansError, match="use auto, on or off"):
        D.resolve_compile("maybe", cpu)


def test_out_of_memory_is_recognised_on_cuda_and_mps():
    assert D.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert D.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 7.1 GB, other: 0 B)"))
    assert not D.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not D.is_out_of_memory(ValueError("out of memory"))
