"""Titans config revisions and the options of issue 29: a run saved before the paper-faithful defaults loads
with its own behaviour (same logits); global (full causal) layers decode like the parallel forward, past the
training length too, and see beyond the window; the presets; one-line errors for bad options."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kititans.checkpoint import load_checkpoint, save_checkpoint
from kititans.data.tokenizer import train_tokenizer
from kititans.errors import KititansError
from kititans.models.spec import count_params
from kititans.models.titans import SPEC, TitansConfig, TitansModel
from kititans.models.titans.config import LEGACY, REVISION, upgrade_config

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(
    vocab_size=300, dim=64, n_layers=3, n_heads=2, ffn_dim=128, context_length=40, window=8, n_persistent=2,
    mem_chunk=4, mem_max_lr=1.0,
)  # fmt: skip


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(
        ["a few words of text, again and again. " * 30] * 40, tmp_path_factory.mktemp("t"), 300
    )


@pytest.mark.parametrize("block", ["mal", "mac"])
def test_a_run_saved_before_revision_2_loads_with_its_own_behaviour(block, tokenizer, tmp_path):
    """config.json written by a kititans before `revision` (and before the options it brought): the load fills
    in that version's values (values normalised, forget bias per chunk, the first MAC block), not today's
    defaults, so the run computes what it computed; the same weights under today's defaults differ."""
    old = {**BASE, "block": block, "memory_layers": [2]}  # what such a run stored: no revision, no new keys
    legacy = TitansConfig(**{**old, **LEGACY[1], "revision": 1})
    torch.manual_seed(0)
    model = TitansModel(legacy).eval()
    run = save_checkpoint(tmp_path / "run", model, SPEC, legacy, tokenizer)
    cfg = json.loads((run / "config.json").read_text())
    cfg["kititans"]["model"] = old
    (run / "config.json").write_text(json.dumps(cfg))
    ckpt = load_checkpoint(run)
    assert ckpt.config.revision == 1 and ckpt.config.mem_norm_v and ckpt.config.mem_forget_bias == "chunk"
    x = ids(30)
    with torch.no_grad():
        assert torch.equal(ckpt.model(x), model(x))
        today = TitansModel(TitansConfig(**old))
        today.load_state_dict(model.state_dict(), strict=False)  # mac's open gate: a new g, 0 at init
        assert (today.eval()(x) - model(x)).abs().max() > 1e-3  # the defaults did change
    assert TitansConfig(**old).revision == REVISION and upgrade_config({"revision": 2}) == {"revision": 2}


def test_a_new_run_asked_for_revision_1_gets_revision_1s_defaults():
    """`kititans train --set model.revision=1` (the preset plus that key): revision 1's values for every key
    not given, so the run computes what revision 1 computed, not today's defaults under an old label."""
    from kititans.models.spec import find_preset

    spec, p = find_preset("titans-tiny")
    cfg = spec.make_config(p.name, {"block": "mac", "revision": 1, "mac_gate": "tanh"})
    assert cfg.revision == 1 and cfg.mem_norm_v and cfg.mac_attention == "segment" and cfg.mac_keys == "y"
    assert cfg.mac_gate == "tanh"  # what was given stays
    now = spec.make_config(p.name, {"block": "mac"})
    assert now.revision == REVISION and not now.mem_norm_v and now.mac_attention == "sliding"


def _attention_only(**kw) -> TitansModel:
    torch.manual_seed(0)
    return TitansModel(TitansConfig(**{**BASE, "memory_layers": [], **kw})).eval()


@pytest.mark.parametrize("block", ["mal", "mac"])
def test_global_layers_see_the_whole_context_and_decode_past_it(block):
    """A global layer attends over everything before (within context_length): the first token reaches the last
    logits, which a stack of windows/segments cannot relay over 39 tokens; decoding one token at a time past
    the training length (its cache then holds the last context_length tokens, as the parallel forward's
    window does) equals the parallel forward."""
    x = ids(60)
    y = x.clone()
    y[0, 0] = (y[0, 0] + 1) % BASE["vocab_size"]
    for layers, reaches in (([2], True), (None, False)):
        model = _attention_only(block=block, global_layers=layers)
        with torch.no_grad():
            moved = (model(x[:, :40])[0, -1] - model(y[:, :40])[0, -1]).abs().max()
        assert (moved > 1e-4) == reaches, (layers, moved)
    model = _attention_only(block=block, global_layers=[2], memory_layers=[1] if block == "mal" else [3])
    with torch.no_grad():
        full = model(x)
        state = model.new_state(1)
        parts = [model(x[:, :8], state=state)] + [model(x[:, i : i + 1], state=state) for i in range(8, 60)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-4
    assert state.layers[1]["k"].shape[1] == BASE["n_persistent"] + BASE["context_length"]  # the cache's rows


def test_hybrid_preset():
    cfg = SPEC.make_config("titans-500m-hybrid")
    pure = SPEC.make_config("titans-500m")
    assert cfg.block == "mac" and cfg.global_layers == [3, 7, 11, 15, 19, 23]
    assert (
        not cfg.global_set & cfg.memory_set
    )  # every 4th layer global, the memory layers keep their segments
    with torch.device("meta"):
        assert count_params(TitansModel(cfg)) == count_params(TitansModel(pure))  # same weights, other masks


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"global_layers": [0]}, r"global_layers must be distinct layer numbers in 1..2, got \[0\]"),
        ({"global_layers": [3]}, r"global_layers must be distinct layer numbers in 1..2, got \[3\]"),
        ({"global_layers": [1, 1]}, "global_layers must be distinct"),
        ({"block": "mac", "global_layers": [2]}, r"layers \[2\] are in both memory_layers and global_layers"),
        ({"mac_gate": "relu"}, "mac_gate must be one of sigmoid, tanh, got 'relu'"),
        ({"mac_attention": "full"}, "mac_attention must be one of segment, sliding"),
        ({"mac_keys": "x"}, "mac_keys must be one of y, u"),
        ({"mac_values": "v"}, "mac_values must be one of y, u"),
        ({"revision": REVISION + 1}, "config revision 3 is not one this kititans knows"),
    ],
)
def test_bad_options_are_one_clear_error(bad, message):
    with pytest.raises(KititansError, match=message):
        SPEC.make_config("titans-debug", bad)


def test_a_run_from_a_newer_revision_is_refused_in_one_line(tokenizer, tmp_path):
    model = TitansModel(TitansConfig(**BASE))
    run = save_checkpoint(tmp_path / "run", model, SPEC, model.config, tokenizer)
    shutil.copy(run / "config.json", tmp_path / "keep.json")
    cfg = json.loads((run / "config.json").read_text())
    cfg["kititans"]["model"]["revision"] = REVISION + 1
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(KititansError, match="revision 3 is not one this kititans knows.*pip install -U"):
        load_checkpoint(run)


ONNX_OPTIONS = {
    "keys_u_tanh_sliding_h_residual_global": dict(
        memory_layers=[1], global_layers=[2], mac_attention="sliding", mac_gate="tanh", mac_keys="u",
        mac_h_residual=True,
    ),
    "values_u_no_h_rows": dict(memory_layers=[2], mac_values="u", mac_h_rows=False, mac_h_residual=True),
}  # fmt: skip


@pytest.mark.parametrize(
    "options",
    # each export is ~35 s of CPU: the second (split keys/values, no h rows) runs with -m slow
    [pytest.param(name, marks=[pytest.mark.slow] if i else []) for i, name in enumerate(ONNX_OPTIONS)],
)
def test_onnx_export_of_the_mac_options_and_a_global_layer(options, tokenizer, tmp_path):
    """Every MAC option and a global layer go through the same step code the exporters trace (the first set: keys
    from u, the open gate, sliding attention, h on the residual, a global layer; the second: values from u
    beside keys from y, no h rows): the ONNX graphs
    (fixed-size state; the global layer's cache a ring of context_length rows beside it) decode 60 tokens, past
    the training length of 40, in chunk prefills and single tokens, equal to the parallel forward."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from kititans.export import ExportOptions, export_model
    from kititans.runtimes import load_runtime

    cfg = TitansConfig(**{**BASE, "block": "mac", **ONNX_OPTIONS[options]})
    torch.manual_seed(0)
    model = TitansModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = save_checkpoint(tmp_path / "run", model, SPEC, cfg, tokenizer)
    result = export_model(run, "onnx", "fp32", tmp_path / "onnx", ExportOptions(progress=False))
    assert result.manifest["check"]["max_abs_logit_diff"] < 1e-4
    rt = load_runtime(result.path)
    seq = ids(60, seed=3)[0].tolist()
    got = [rt.forward(seq[:9], all_logits=True)] + [rt.forward([t], all_logits=True) for t in seq[9:30]]
    got.append(rt.forward(seq[30:], all_logits=True))
    with torch.no_grad():
        ref = model(torch.tensor([seq]))[0].numpy()
    assert np.abs(np.concatenate(got) - ref).max() < 1e-4


@pytest.mark.slow
def test_coreml_export_of_the_mac_options_and_a_global_layer(tmp_path):
    """The CoreML package of a mac model with every option (keys and values from u, the open gate, sliding
    attention, h on the residual) and a global layer (its cache an MLState of context_length rows beside the
    fixed-size ones) converts, passes its validation (decode rewrites no state per token) and its converted
    wrapper equals the parallel forward over a second segment (~1 min of CPU: -m slow)."""
    pytest.importorskip("coremltools")
    from kititans.data.builtin import generate_corpus
    from kititans.export import ExportOptions, export_model

    tok = train_tokenizer(generate_corpus(0, 200_000), tmp_path / "tok", 512)
    over = {
        "block": "mac", "n_layers": 3, "memory_layers": [2], "global_layers": [3], "mac_keys": "u",
        "mac_values": "u", "mac_gate": "tanh", "mac_attention": "sliding", "mac_h_residual": True,
    }  # fmt: skip
    cfg = SPEC.make_config("titans-debug", over)
    torch.manual_seed(0)
    model = SPEC.build(cfg).eval()
    with torch.no_grad():  # away from the init's exact ones and zeros, which coremltools folds away (and an
        for name, p in model.named_parameters():  # open gate at g = 0 would hide the memory's read)
            if name.endswith(("norm.weight", "qkv_gain", "gamma", "gate_scale")):
                p.add_(0.1 * torch.randn_like(p))
    run = save_checkpoint(tmp_path / "run", model, SPEC, cfg, tok)
    pkg = export_model(
        run, "coreml", "fp16", run / "export" / "model.fp16.mlpackage", ExportOptions(progress=False)
    )
    report = pkg.manifest["validation"]
    assert report["problems"] == []
    assert {"decode", "decode_close", "prefill", "decode_segment", "prefill_segment"} <= set(
        report["spec"]["functions"]
    )
    w = report["wrapper"]
    assert w["max_abs_diff_fp32"] < 1e-4 and w["tokens"] > cfg.window
