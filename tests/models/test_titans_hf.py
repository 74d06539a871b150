"""Titans outside KiTitans: every Titans run directory carries a transformers remote-code modeling file, so
`AutoModelForCausalLM.from_pretrained(run, trust_remote_code=True)` loads it, in a process where kititans cannot
be imported, and gives kititans' logits and greedy text (mal from a trained run; mac and mag random)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from kititans.checkpoint import load_checkpoint, save_checkpoint
from kititans.generate import Generation, SamplingConfig
from kititans.models.titans import SPEC
from kititans.models.titans.hf import MODELING_FILE
from kititans.runtimes.pytorch import TorchRuntime

PROMPT = "Once upon a time, a little girl named Mia found a red ball in the garden."

# runs in a fresh interpreter where `import kititans` fails: the run directory alone must be enough
OUTSIDE = """
import json, sys
sys.modules["kititans"] = None  # any kititans import in the remote code now raises ImportError
import numpy as np, torch, transformers
run, ids, new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = transformers.AutoModelForCausalLM.from_pretrained(run, trust_remote_code=True).eval()
x = torch.tensor([ids])
with torch.no_grad():
    logits = model(x).logits[0].numpy()
    greedy = model.generate(x, max_new_tokens=new, do_sample=False, eos_token_id=None)[0, len(ids):].tolist()
    stateful = model.titans_generate(x, new)[0, len(ids):].tolist()
np.save(sys.argv[4], logits)
print(json.dumps({"class": type(model).__name__, "greedy": greedy, "stateful": stateful}))
"""


def outside(run: Path, ids: list[int], new: int, tmp_path: Path) -> tuple[np.ndarray, dict]:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "logits.npy"
    r = subprocess.run(
        [sys.executable, "-c", OUTSIDE, str(run), json.dumps(ids), str(new), str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return np.load(out), json.loads(r.stdout.strip().splitlines()[-1])


def greedy(run: Path, ids: list[int], new: int) -> list[int]:
    rt = TorchRuntime(run)
    return list(Generation(rt, ids, SamplingConfig(temperature=0, max_tokens=new), stop_ids=()))


def test_the_run_carries_a_modeling_file_without_kititans(titans_run):
    text = (titans_run / MODELING_FILE).read_text()
    assert "class TitansForCausalLM" in text and "class TitansModel" in text
    assert "import kititans" not in text and "from kititans" not in text
    cfg = json.loads((titans_run / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_titans.TitansForCausalLM"
    assert cfg["model_type"] == "kititans-titans" and cfg["architectures"] == ["TitansForCausalLM"]


def test_transformers_loads_the_trained_run_and_matches_kititans(titans_run, tmp_path):
    ckpt = load_checkpoint(titans_run)
    ids = [ckpt.tokenizer.bos_id, *ckpt.tokenizer.encode(PROMPT)]  # > one 32-token window, several chunks
    logits, res = outside(titans_run, ids, 24, tmp_path)
    with torch.no_grad():
        ref = ckpt.model(torch.tensor([ids]))[0].numpy()
    assert res["class"] == "TitansForCausalLM"
    assert np.abs(logits - ref).max() < 1e-4
    want = greedy(titans_run, ids, 24)
    assert res["greedy"] == want and res["stateful"] == want  # transformers' generate and the fixed state
    assert ckpt.tokenizer.decode(res["greedy"]) == ckpt.tokenizer.decode(want) and len(set(want)) > 3


@pytest.mark.parametrize("block", ["mac", "mag"])
def test_every_block_loads_in_transformers(block, titans_run, tmp_path):
    """A random model of each block (mac with the paper's conv and qk-only norms), same logits and text."""
    tok = load_checkpoint(titans_run).tokenizer
    over = {"block": block, "mem_conv": 4, "mem_norm_v": False} if block == "mac" else {"block": block}
    cfg = SPEC.make_config("titans-debug", over)
    torch.manual_seed(0)
    model = SPEC.build(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = save_checkpoint(tmp_path / block, model, SPEC, cfg, tok)
    ids = torch.randint(3, 512, (45,), generator=torch.Generator().manual_seed(1)).tolist()  # > a segment
    logits, res = outside(run, ids, 12, tmp_path)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
    assert np.abs(logits - ref).max() < 1e-4
    assert res["greedy"] == res["stateful"] == greedy(run, ids, 12)
