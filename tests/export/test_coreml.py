"""CoreML export of the trained debug model: every scheme converts on Linux and passes the package
validation (wrapper == model, spec, op set, decompressed weights), sizes shrink as the scheme says,
unsupported combinations fail with one line. Each scheme is converted once (~15 s each, ~70 s in all)."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")

from kititans.checkpoint import load_checkpoint  # noqa: E402
from kititans.errors import KititansError, UnsupportedExport  # noqa: E402
from kititans.export import ExportOptions, export_model  # noqa: E402
from kititans.export.coreml import deployment_target, validate_package  # noqa: E402
from kititans.models.lite_export import LiteCoreMLStep  # noqa: E402
from kititans.quantize.coreml import ERROR_BOUND  # noqa: E402

SCHEMES = ("fp16", "int8", "int4", "palettize4")


@pytest.fixture(scope="module")
def packages(debug_run, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("coreml")
    return {
        q: export_model(
            debug_run, "coreml", q, out / f"model.{q}.mlpackage", ExportOptions(progress=False)
        ).path
        for q in SCHEMES
    }


def manifest(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".json").read_text())


def weights_bytes(path: Path) -> int:
    return (path / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size


@pytest.mark.parametrize("quant", SCHEMES)
def test_package_passes_validation_read_back(packages, debug_run, quant):
    path = packages[quant]
    ckpt = load_checkpoint(debug_run)
    step = manifest(path)["coreml"]
    report = validate_package(
        path, ckpt, quant, LiteCoreMLStep, deployment_target("iOS18"), step["max_len"], step["prefill_len"]
    )
    assert report["problems"] == []
    assert report["spec"]["specification_version"] >= 9  # iOS18 / macOS15
    # the converted wrapper is the model: fp64 shows the same math, fp32 the rounding
    assert report["wrapper"]["max_abs_diff_fp64"] < 1e-9 and report["wrapper"]["max_abs_diff_fp32"] < 1e-4
    w = report["weights"]
    assert not w["missing"] and w["max_relative_error"] <= ERROR_BOUND[quant]
    assert w["compressed"] == (0 if quant == "fp16" else 15) and w["compressed_but_float"] == []
    ops = report["ops"]
    for fn in ("decode", "prefill"):
        assert {"read_state", "write_state", "scaled_dot_product_attention", "linear"} <= set(ops[fn])
    compressed_op = {"int8": "constexpr_blockwise_shift_scale", "int4": "constexpr_blockwise_shift_scale"}
    compressed_op["palettize4"] = "constexpr_lut_to_dense"
    if quant in compressed_op:
        assert ops["decode"][compressed_op[quant]] == 15  # q/k/v/o + gate/up/down per layer + lm_head


def test_spec_inputs_outputs_states(packages, debug_run):
    cfg = load_checkpoint(debug_run).config
    fns = manifest(packages["int4"])["coreml"]["functions"]
    assert set(fns) == {"decode", "prefill"}
    for f in fns.values():
        assert f["inputs"]["input_ids"]["dtype"] == "int32" and f["inputs"]["causal_mask"]["dtype"] == "fp16"
        assert f["outputs"] == ["logits"]
        cache = [cfg.n_layers, 1, cfg.n_kv_heads, cfg.context_length + 1, cfg.head_dim]
        assert f["states"] == {k: {"dtype": "fp16", "shape": cache} for k in ("key_cache", "value_cache")}
        assert f["inputs"]["causal_mask"]["range"][3] == [1, cfg.context_length]  # any position
    assert (
        fns["decode"]["inputs"]["input_ids"]["shape"] == [1, 1]
        and not fns["decode"]["inputs"]["input_ids"]["range"]
    )
    assert fns["prefill"]["inputs"]["input_ids"]["range"][1] == [1, 128]


def test_sizes_shrink_as_the_scheme_says(packages):
    w = {q: weights_bytes(p) for q, p in packages.items()}
    print({q: (w[q], round(w[q] / w["fp16"], 3)) for q in SCHEMES})
    assert 0.45 < w["int8"] / w["fp16"] < 0.6  # 8 bits + a scale per channel; RoPE/norms stay fp16
    assert 0.25 < w["int4"] / w["fp16"] < 0.36  # 4 bits + an fp16 scale per 32
    assert 0.25 < w["palettize4"] / w["fp16"] < 0.36  # 4-bit indices + a 16-entry LUT per 16 channels
    # two functions, weights stored once: the package is no bigger than one function's weights
    for q, p in packages.items():
        m = manifest(p)
        assert m["size_bytes"] < 1.1 * m["coreml"]["single_function_bytes"], q


def test_tokenizer_files_next_to_the_packages(packages, debug_run):
    tokenizers = pytest.importorskip("tokenizers")
    tok_dir = packages["fp16"].parent / "tokenizer"
    assert (tok_dir / "tokenizer.model").is_file() and (tok_dir / "tokenizer_config.json").is_file()
    ours = load_checkpoint(debug_run).tokenizer
    hf = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))  # what swift-transformers reads
    text = "Once upon a time, Tom had a red ball.<|user|>hi<|end|>\n  two  spaces"
    assert hf.encode(text, add_special_tokens=False).ids == ours.encode_special(text)


def test_unsupported_combinations_fail_with_one_line(debug_run, tmp_path, capsys):
    from kititans.cli import main

    for target, msg in (("iOS17", "too old"), ("iOS99", "unknown CoreML deployment target")):
        with pytest.raises(UnsupportedExport, match=msg):
            export_model(
                debug_run, "coreml", "int4", tmp_path / "a.mlpackage", ExportOptions(extra={"target": target})
            )
    with pytest.raises(UnsupportedExport, match="--imatrix applies to gguf only"):
        export_model(debug_run, "coreml", "int4", tmp_path / "b.mlpackage", ExportOptions(imatrix="val"))
    assert main(["export", str(debug_run), "--format", "coreml", "--quant", "fp32", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "coreml has no quantization 'fp32'" in err[0]
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(platform.system() == "Darwin", reason="checks the refusal on systems without Core ML")
def test_runtime_refuses_off_macos(packages):
    from kititans.runtimes import load_runtime

    with pytest.raises(KititansError, match="run only on macOS 15"):
        load_runtime(packages["fp16"])


@pytest.mark.macos
@pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML runs only on macOS 15+ (no runtime here)")
def test_runtime_on_macos_follows_pytorch(packages, debug_run):
    import torch

    from kititans.runtimes import load_runtime

    ckpt = load_checkpoint(debug_run)
    rt = load_runtime(packages["fp16"], device="cpu")
    ids = [ckpt.tokenizer.bos_id, *ckpt.tokenizer.encode("Once upon a time, a little girl")]
    got = [rt.forward(ids, all_logits=True)] + [rt.forward([t], all_logits=True) for t in ids[1:6]]
    with torch.no_grad():
        ref = ckpt.model(torch.tensor([ids + ids[1:5]]))[0].numpy()
    got = np.concatenate(got)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
