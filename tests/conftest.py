"""Shared fixtures: tiny tokenizers and runs trained once per session on the built-in corpus.

Everything is CPU, built from the `debug` presets, and downloads nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# one intra-op thread per xdist worker (`pytest -n N` runs N of them): N workers x 2 threads on N cores spin-wait
# on each other; a lone run keeps two
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is as fast, and immune to the wake-up latency of a second thread on a busy
    shared machine (which made each small-op step 100x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_config(out: Path, **over):
    """A RunConfig for a quick debug run on a slice of the built-in corpus."""
    from kititans.config import RunConfig, apply_overrides

    cfg = RunConfig(preset="debug")
    items = {
        "data.builtin_bytes": 1_500_000,
        "tokenizer.vocab_size": 512,
        "train.steps": 200,
        "train.batch_size": 8,
        "train.seq_len": 128,
        "train.eval_every": 100,
        "train.save_every": 100,
        "train.eval_batches": 8,
        "train.compile": "off",
        "train.dtype": "fp32",
        "out": str(out),
        **over,
    }
    steps = int(items["train.steps"])
    items.setdefault("optim.warmup_steps", 20 if steps > 20 else steps // 4)  # a warmup shorter than the run
    return apply_overrides(cfg, list(items.items()))


@pytest.fixture(scope="session")
def debug_run(tmp_path_factory) -> Path:
    """A Lite `debug` model pretrained for 200 steps on 1.5 MB of the built-in corpus (about 15 s)."""
    from kititans.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("runs") / "debug"
    result = pretrain(make_config(out), progress=False)
    assert result.val_loss is not None and result.val_loss < 3.0
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(debug_run) -> Path:
    return debug_run


@pytest.fixture(scope="session")
def titans_run(tmp_path_factory) -> Path:
    """A `titans-debug` model (window 32, memory chunk 8) pretrained briefly on the built-in corpus (~15 s)."""
    from kititans.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("runs") / "titans-debug"
    cfg = make_config(out, preset="titans-debug", family="titans", **{"train.steps": 80})
    result = pretrain(cfg, progress=False)
    assert result.val_loss is not None and result.val_loss < 4.0
    return out


def enc_config(out: Path, **over):
    """An `encoder-debug` run: unsupervised span pairs from 0.6 MB of the built-in corpus, 40 steps."""
    return make_config(out, **{"preset": "encoder-debug", "family": "encoder", "train.steps": 40,
                               "train.batch_size": 16, "train.seq_len": 64, "train.eval_every": 20,
                               "data.builtin_bytes": 600_000, **over})  # fmt: skip


@pytest.fixture(scope="session")
def encoder_run(tmp_path_factory):
    """(run dir, TrainResult) of an `encoder-debug` model trained once per session (about 20 s)."""
    from kititans.train.contrastive import train_encoder

    out = tmp_path_factory.mktemp("enc") / "enc"
    return out, train_encoder(enc_config(out), progress=False)
