from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kititans.checkpoint import load_checkpoint, load_train_state, save_train_state
from kititans.errors import KititansError


def test_round_trip_and_tied_weights_stored_once(debug_run):
    ckpt = load_checkpoint(debug_run)
    names = set(load_file(str(debug_run / "model.safetensors")))
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert not any("_orig_mod" in n for n in names)
    assert ckpt.model.lm_head.weight is ckpt.model.model.embed_tokens.weight
    cfg = json.loads((debug_run / "config.json").read_text())
    assert cfg["kititans"]["format_version"] == 1 and cfg["kititans"]["family"] == "lite"
    assert cfg["kititans"]["run"]["preset"] == "debug" and cfg["model_type"] == "llama"
    gen = json.loads((debug_run / "generation_config.json").read_text())
    assert ckpt.tokenizer.end_id in gen["eos_token_id"]


def copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("data", "train_state"))
    return dst


def test_missing_and_wrong_tensors_are_named(debug_run, tmp_path):
    run = copy_run(debug_run, tmp_path / "r")
    state = load_file(str(run / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.norm.weight"] = torch.ones(7)
    save_file(state, str(run / "model.safetensors"))
    with pytest.raises(
        KititansError, match=r"missing model.layers.1.mlp.up_proj.weight.*wrong shape model.norm"
    ):
        load_checkpoint(run)


def test_missing_files_and_future_versions(debug_run, tmp_path):
    with pytest.raises(KititansError, match="not a kititans run directory"):
        load_checkpoint(tmp_path)
    run = copy_run(debug_run, tmp_path / "r")
    (run / "model.safetensors").unlink()
    with pytest.raises(KititansError, match="missing model.safetensors"):
        load_checkpoint(run)
    run = copy_run(debug_run, tmp_path / "r2")
    cfg = json.loads((run / "config.json").read_text())
    cfg["kititans"]["format_version"] = 99
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KititansError, match="newer than this kititans"):
        load_checkpoint(run)


def test_tokenizer_that_does_not_match_the_model(debug_run, tmp_path):
    from kititans.data.tokenizer import train_tokenizer

    run = copy_run(debug_run, tmp_path / "r")
    train_tokenizer(["some other text entirely, " * 40] * 50, run, vocab_size=300)
    with pytest.raises(KititansError, match="tokenizer has 300 tokens but the model has 512"):
        load_checkpoint(run)


def test_train_state_round_trip_without_pickle(tmp_path):
    state = {"step": 7, "optimizer": {"state": {0: {"exp_avg": torch.arange(3.0)}}, "groups": [(1, "a")]}}
    save_train_state(tmp_path, state)
    back = load_train_state(tmp_path)
    assert back["step"] == 7 and torch.equal(back["optimizer"]["state"][0]["exp_avg"], torch.arange(3.0))
    assert back["optimizer"]["groups"] == [(1, "a")]
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in (tmp_path / "train_state").iterdir())
