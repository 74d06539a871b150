from __future__ import annotations

from pathlib import Path

import pytest

from kititans.config import RunConfig, apply_overrides, load_recipe, parse_set, resolve_run_config
from kititans.errors import KititansError
from kititans.models.spec import find_preset

ROOT = Path(__file__).resolve().parents[1]


def hints(family, preset):
    spec, p = find_preset(preset, family)
    return spec.name, list(p.train.items())


def test_set_overrides_are_typed():
    cfg = apply_overrides(
        RunConfig(),
        parse_set(
            ["optim.lr=1e-3", "train.steps=50", "optim.name=muon", "model.n_layers=3", "train.compile=off"]
        ),
    )
    assert cfg.optim.lr == 1e-3 and cfg.train.steps == 50 and cfg.optim.name == "muon"
    assert cfg.model == {"n_layers": 3} and cfg.train.compile == "off"


@pytest.mark.parametrize(
    "pair, message",
    [
        ("optim.lrr=1", "did you mean 'optim.lr'"),
        ("train.steps=many", "must be an integer"),
        ("optim.name=sgd", "must be one of adamw, muon"),
        ("nonsense", "expects key=value"),
    ],
)
def test_bad_overrides_name_the_fix(pair, message):
    with pytest.raises(KititansError, match=message):
        apply_overrides(RunConfig(), parse_set([pair]))


def test_layers_preset_hints_then_file_then_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preset: debug\ntrain:\n  steps: 77\noptim:\n  name: muon\n")
    layers = load_recipe(recipe) + parse_set(["train.batch_size=3"]) + [("train.steps", 5)]
    cfg = resolve_run_config(layers, hints)
    assert cfg.preset == "debug" and cfg.family == "lite"
    assert cfg.train.seq_len == 128  # from the preset's hints
    assert cfg.train.steps == 5 and cfg.train.batch_size == 3 and cfg.optim.name == "muon"


def test_unknown_preset_lists_valid_names():
    with pytest.raises(KititansError, match="valid presets: .*tiny"):
        resolve_run_config([("preset", "tinyy")], hints)


def test_unknown_model_key_is_rejected():
    spec, _ = find_preset("debug")
    with pytest.raises(KititansError, match="unknown lite model config key 'n_layer'"):
        spec.make_config("debug", {"n_layer": 3})


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(recipe):
    cfg = resolve_run_config(load_recipe(recipe), hints)
    spec, preset = find_preset(cfg.preset, cfg.family)
    spec.make_config(preset.name, cfg.model)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
