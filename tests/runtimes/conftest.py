"""Fixtures of the Titans runtime tests: a random titans-debug run (block mac) and its fp32 ONNX export, made
once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kititans.checkpoint import save_checkpoint
from kititans.models.titans import SPEC


@pytest.fixture(scope="session")
def titans_tokenizer(tmp_path_factory):
    from kititans.data.builtin import generate_corpus
    from kititans.data.tokenizer import train_tokenizer

    return train_tokenizer(generate_corpus(0, 200_000), tmp_path_factory.mktemp("tok"), 512)


def random_run(out: Path, tok, seed: int = 0, **over) -> Path:
    """A random titans-debug run (window 32, memory chunk 8) whose memory stores and forgets visibly."""
    cfg = SPEC.make_config("titans-debug", over)
    torch.manual_seed(seed)
    model = SPEC.build(cfg).eval()
    with torch.no_grad():
        for layer in model.layers:
            if layer.memory is not None:
                layer.memory.gates.bias.view(4, -1)[0].fill_(1.0)
                layer.memory.gates.bias.view(4, -1)[2].fill_(-2.0)
    return save_checkpoint(out, model, SPEC, cfg, tok, extra={"step": 0})


@pytest.fixture(scope="session")
def make_titans_run():
    """random_run(out, tok, seed=0, **config overrides) -> a saved run."""
    return random_run


@pytest.fixture(scope="session")
def titans_run_mac(tmp_path_factory, titans_tokenizer) -> Path:
    return random_run(tmp_path_factory.mktemp("titans") / "run", titans_tokenizer, block="mac")


@pytest.fixture(scope="session")
def titans_onnx_mac(titans_run_mac) -> Path:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from kititans.export import ExportOptions, export_model

    return export_model(
        titans_run_mac,
        "onnx",
        "fp32",
        titans_run_mac / "export" / "onnx" / "fp32",
        ExportOptions(progress=False),
    ).path
