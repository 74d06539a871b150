"""A Titans run end to end, through the same code paths as Lite: `kititans train --preset titans-debug`, the
run directory in the torch runtime (decode == full forward), generate/chat, exact resume, GGUF refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kititans.checkpoint import load_checkpoint
from kititans.errors import UnsupportedExport
from kititans.export import export_model
from kititans.runtimes.pytorch import TorchRuntime
from kititans.train.pretrain import pretrain
from tests.conftest import make_config


def kititans(*args, input=None):
    return subprocess.run(
        [sys.executable, "-m", "kititans", *args], capture_output=True, text=True, input=input, timeout=300
    )


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: a second thread only adds wake-up latency on a busy machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def titans_run(tmp_path_factory) -> Path:
    """`kititans train --preset titans-debug` for 40 steps on 0.4 MB of the built-in corpus (about 15 s)."""
    out = tmp_path_factory.mktemp("titans") / "run"
    r = kititans(
        "train",
        "--preset",
        "titans-debug",
        "--steps",
        "40",
        "--compile",
        "off",
        "--dtype",
        "fp32",
        "--set",
        "data.builtin_bytes=400000",
        "--set",
        "train.eval_every=20",
        "--set",
        "train.threads=1",
        "--out",
        str(out),
        "-q",
    )
    assert r.returncode == 0, r.stderr
    assert "kititans generate" in r.stdout
    assert "--format onnx --q4" in r.stdout and "gguf" not in r.stdout  # llama.cpp cannot run Titans
    return out


def test_train_writes_a_titans_run(titans_run):
    cfg = json.loads((titans_run / "config.json").read_text())
    assert cfg["model_type"] == "kititans-titans" and cfg["kititans"]["family"] == "titans"
    assert cfg["kititans"]["step"] == 40
    rows = [json.loads(ln) for ln in (titans_run / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(vals) == 2 and vals[-1] < 5.5 and losses[-1] < losses[0] - 0.5  # it learns (ln 512 = 6.24)


def test_torch_runtime_decode_equals_full_forward(titans_run):
    ckpt = load_checkpoint(titans_run)
    ids = ckpt.tokenizer.encode("Once upon a time there was a little fox who lived in the forest. " * 3)
    ids = [ckpt.tokenizer.bos_id, *ids][:70]  # > 2 windows of 32, several chunks of 8
    with torch.no_grad():
        full = ckpt.model(torch.tensor([ids]))[0].numpy()
    rt = TorchRuntime(titans_run)
    assert (rt.vocab_size, rt.context_length) == (512, 256)
    got = [rt.forward(ids[:13], all_logits=True)]
    got += [rt.forward([t])[None] for t in ids[13:]]
    assert rt.n_past == len(ids)
    assert abs(np.concatenate(got) - full).max() < 1e-4
    rt.reset()
    assert rt.n_past == 0


def test_generate_and_chat(titans_run):
    r = kititans(
        "generate", str(titans_run), "--prompt", "Once upon a time", "--max-tokens", "40", "--temperature", "0",
        "--threads", "1", "--stats",
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.startswith("Once upon a time") and len(r.stdout) > 30, r.stderr
    assert "tok/s" in r.stderr
    r = kititans(
        "chat", str(titans_run), "--max-tokens", "8", "--seed", "0", "--threads", "1",
        input="Hi!\n/reset\nHello\n/quit\n",
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.count("> ") == 2, r.stderr


def test_gguf_export_is_refused_with_what_works(titans_run):
    with pytest.raises(UnsupportedExport, match="llama.cpp has no Titans architecture.*use onnx or coreml"):
        export_model(titans_run, "gguf")
    r = kititans("export", str(titans_run), "--format", "gguf", "--q4")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "no Titans architecture" in lines[0], r.stderr
    assert not (titans_run / "export").exists() or not any((titans_run / "export").iterdir())


def losses(run):
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


@pytest.mark.parametrize(
    "optimizer, block, extra",
    [  # every block and both optimizers in the default run; Muon on mal (the same update as on mag) is slow
        ("adamw", "mal", {}),
        pytest.param("muon", "mal", {}, marks=pytest.mark.slow),
        ("adamw", "mac", {"mem_conv": 4}),
        ("muon", "mag", {}),
    ],
)
def test_resume_is_exact(tmp_path, optimizer, block, extra, titans_run):
    over = {
        "preset": "titans-debug",
        "family": "titans",
        "model.block": block,
        **{f"model.{k}": v for k, v in extra.items()},
        "tokenizer.path": str(titans_run),  # reuse the run's tokenizer: no tokenizer training here
        "data.builtin_bytes": 300_000,
        "train.steps": 16,
        "train.save_every": 6,
        "train.eval_every": 6,
        "train.log_every": 1,
        "train.threads": 1,
        "optim.name": optimizer,
    }
    whole = pretrain(make_config(tmp_path / "whole", **over), progress=False)

    def crash(step, loss):
        if step == 9:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(make_config(tmp_path / "cut", **over), progress=False, on_step=crash)
    resumed = pretrain(make_config(tmp_path / "cut", **over), resume=True, progress=False)
    assert resumed.step == whole.step == 16
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    assert resumed.val_loss == whole.val_loss
    a, b = load_checkpoint(tmp_path / "whole").model, load_checkpoint(tmp_path / "cut").model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_run_saved_before_blocks_loads_as_mal(titans_run, tmp_path):
    """config.json written before `block`, the memory options and `revision` existed: the model is today's mal
    with the legacy options (the same logits as those options spelled out)."""
    from kititans.models.titans.config import LEGACY

    cfg = json.loads((titans_run / "config.json").read_text())
    old, spelled = tmp_path / "old", tmp_path / "spelled"
    for folder in (old, spelled):
        shutil.copytree(titans_run, folder)
    model = cfg["kititans"]["model"]
    for key in ("block", "mem_conv", "mem_norm_v", "mem_forget_bias", "revision"):
        model.pop(key, None)
    (old / "config.json").write_text(json.dumps(cfg))
    model.update({**LEGACY[1], "block": "mal", "mem_conv": 0, "revision": 1})
    (spelled / "config.json").write_text(json.dumps(cfg))
    a, b = load_checkpoint(spelled), load_checkpoint(old)
    assert (b.config.block, b.config.mem_conv, b.config.mem_norm_v) == ("mal", 0, True)
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a.model(ids), b.model(ids))


def test_unknown_block_is_one_line(tmp_path):
    """An unknown model.block: one line, exit 2, no checkpoint (--dry-run checks before any work)."""
    for extra in (["--dry-run"], ["-q", "--out", str(tmp_path / "r")]):
        r = kititans("train", "--preset", "titans-debug", "--set", "model.block=mat", *extra)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert "unknown model.block 'mat'; valid blocks: mal, mac, mag" in lines[0]
    assert (
        not (tmp_path / "r" / "config.json").exists() and not (tmp_path / "r" / "model.safetensors").exists()
    )


def test_dry_run_prints_the_component_table():
    r = kititans("train", "--preset", "titans-500m", "--dry-run")
    assert r.returncode == 0, r.stderr
    for part in (
        "embedding",
        "lm head",
        "attention",
        "feed-forward",
        "memory projections",
        "persistent memory",
    ):
        assert part in r.stdout, part
    assert "(500.75M)" in r.stdout
