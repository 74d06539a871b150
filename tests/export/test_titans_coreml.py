"""CoreML export of a Titans model (memory as fp16 MLStates, position input, one function per kind of call:
decode inside a chunk, decode closing a chunk, chunk prefill, and for mac the segment-closing ones): the packages
convert on Linux and pass validation read back from disk (spec, fp16 states, iOS18 ops, fp32 memory math,
decompressed weights, converted wrapper == the model's parallel forward past the window and over > 2 memory
chunks, no per-token rewrite of any state in `decode`); the runtime's feeding logic drives the wrapper to the
model's logits. A random titans-debug model with a freshly trained 512-token tokenizer (no training run); fp16,
int8, int4, then mac and mag in fp16: about 2 min in all."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")

from kititans.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from kititans.errors import KititansError  # noqa: E402
from kititans.export import ExportOptions, export_model  # noqa: E402
from kititans.export.coreml import deployment_target, validate_package  # noqa: E402
from kititans.models.titans import SPEC  # noqa: E402
from kititans.models.titans.coreml_step import TitansCoreMLStep, state_writes  # noqa: E402
from kititans.quantize.coreml import ERROR_BOUND  # noqa: E402
from kititans.runtimes.base import pick_step, plan_chunks  # noqa: E402
from kititans.runtimes.coreml import make_feeds  # noqa: E402

SCHEMES = ("fp16", "int8", "int4")
COMPRESSED_OP = {"int8": "constexpr_blockwise_shift_scale", "int4": "constexpr_blockwise_shift_scale"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from kititans.data.builtin import generate_corpus
    from kititans.data.tokenizer import train_tokenizer

    return train_tokenizer(generate_corpus(0, 200_000), tmp_path_factory.mktemp("tok"), 512)


def random_run(out: Path, tok, **over) -> Path:
    """A random titans-debug model (window 32, memory chunk 8, memory on layer 2) saved as a run."""
    cfg = SPEC.make_config("titans-debug", over)
    torch.manual_seed(0)
    model = SPEC.build(cfg).eval()
    with torch.no_grad():  # away from the init's exact ones and zeros (which coremltools would fold away),
        for name, p in model.named_parameters():  # and a livelier memory: stores more, forgets a little
            if name.endswith(("norm.weight", "qkv_gain", "gamma")):
                p.add_(0.1 * torch.randn_like(p))
        for layer in model.layers:
            if layer.memory is not None:
                layer.memory.gates.bias.view(4, -1)[0].fill_(1.0)
                layer.memory.gates.bias.view(4, -1)[2].fill_(-2.0)
    return save_checkpoint(out, model, SPEC, cfg, tok, extra={"step": 0})


@pytest.fixture(scope="module")
def titans_dir(tmp_path_factory, tokenizer) -> Path:
    return random_run(tmp_path_factory.mktemp("titans") / "run", tokenizer)


@pytest.fixture(scope="module")
def packages(titans_dir) -> dict[str, Path]:
    out = titans_dir / "export"
    return {
        q: export_model(
            titans_dir, "coreml", q, out / f"model.{q}.mlpackage", ExportOptions(progress=False)
        ).path
        for q in SCHEMES
    }


def manifest(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".json").read_text())


def mil_program(path: Path):
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    return load(spec, spec.specificationVersion, str(path / "Data/com.apple.CoreML/weights"))


@pytest.mark.parametrize("quant", SCHEMES)
def test_package_passes_validation_read_back(packages, titans_dir, quant):
    ckpt = load_checkpoint(titans_dir)
    cfg = ckpt.config
    report = validate_package(
        packages[quant], ckpt, quant, TitansCoreMLStep, deployment_target("iOS18"), cfg.context_length, 8
    )
    assert report["problems"] == []
    # the converted module is the model: parallel forward vs prefill chunks + decode, past the window
    w = report["wrapper"]
    assert w["tokens"] > cfg.window + 2 * cfg.mem_chunk
    assert w["max_abs_diff_fp64"] < 1e-9 and w["max_abs_diff_fp32"] < 1e-4
    assert 0 < w["max_abs_diff_fp16_state"] < 0.05  # fp16 storage of the state: small, not zero
    weights = report["weights"]
    assert weights["missing"] == [] and weights["max_relative_error"] <= ERROR_BOUND[quant]
    assert weights["compressed_but_float"] == []
    assert {n.rsplit(".", 1)[1] for n in weights["folded"]} <= {
        "persistent_k",
        "persistent_v",
        "qkv_gain",
        "conv",
        "bias",  # the memory's gate biases, sliced into the biases of the projections' row blocks
    }
    assert "model.layers.1.memory.w1" in weights["per_parameter"]  # W_0 is stored (what the state adds to)
    # used only in row blocks (a read needs the query rows alone): placed block by block, within the bound
    assert "model.layers.1.memory.proj.weight" in weights["per_parameter"]
    for fn in ("decode", "decode_close", "prefill"):
        ops = report["ops"][fn]
        assert {"read_state", "write_state", "scaled_dot_product_attention", "sin", "cos"} <= set(ops)
        assert ops["write_state"] == len(TitansCoreMLStep(ckpt.model).state_names)  # each state, once
        if quant in COMPRESSED_OP:
            assert ops[COMPRESSED_OP[quant]] >= 10  # every attention / FFN / memory projection + lm_head


def test_memory_math_and_rope_angles_compute_in_fp32(packages):
    from coremltools.converters.mil.mil import types

    for fn in mil_program(packages["int8"]).functions.values():
        dtypes: dict[str, set[str]] = {}
        for op in fn.operations:
            if op.op_type != "const" and op.outputs:
                dtypes.setdefault(op.op_type, set()).add(types.builtin_to_string(op.outputs[0].dtype))
        assert dtypes["sin"] == dtypes["cos"] == {"fp32"}  # position * frequency, exact past 2048
        assert dtypes["linear"] == {"fp16"} and dtypes["scaled_dot_product_attention"] == {"fp16"}
        assert "fp32" in dtypes["matmul"] and "fp32" in dtypes["sigmoid"]  # memory gradient / gates


def test_spec_inputs_outputs_states(packages, titans_dir):
    ckpt = load_checkpoint(titans_dir)
    C = ckpt.config.mem_chunk
    info = manifest(packages["int4"])["coreml"]
    assert info["kind"] == "recurrent" and info["prefill_exact"] and info["prefill_len"] == C
    assert info["inputs"] == {"input_ids": "int32", "position": "int32"}
    expected = {n.replace(".", "_"): list(s) for n, s, _ in ckpt.model.state_spec(1)[1:]}
    assert info["states"] == list(expected)
    assert info["steps"] == [
        {"function": "decode", "tokens": 1, "every": 1},
        {"function": "decode_close", "tokens": 1, "every": C},
        {"function": "prefill", "tokens": C, "every": C},
    ]
    for name, f in info["functions"].items():
        T = C if name.startswith("prefill") else 1
        assert f["inputs"]["input_ids"] == {"dtype": "int32", "shape": [1, T], "range": []}
        assert f["inputs"]["position"] == {"dtype": "int32", "shape": [1], "range": []}
        assert f["outputs"] == ["logits"]
        assert f["states"] == {n: {"dtype": "fp16", "shape": s} for n, s in expected.items()}


def test_decode_rewrites_no_state_per_token(packages, titans_dir):
    """A token inside a chunk writes its ring rows (one + the persistent rows) and its memory-buffer row, and
    only touches (one element) the memory weights and momentum; the chunk-closing call rewrites those."""
    cfg = load_checkpoint(titans_dir).config
    program = mil_program(packages["fp16"])
    decode, close = state_writes(program.functions["decode"]), state_writes(program.functions["decode_close"])
    D = cfg.dim
    for i in (0, 1):
        for k in ("k", "v"):
            assert decode[f"layers_{i}_{k}"][0] == (cfg.n_persistent + 1) * D
    mem = "layers_1"
    assert decode[f"{mem}_buf"][0] == decode[f"{mem}_buf"][2]  # one row
    for name in ("w1", "w2", "gamma", "s_w1", "s_w2", "s_gamma"):
        assert decode[f"{mem}_{name}"][0] == 1, name
        assert close[f"{mem}_{name}"][0] == close[f"{mem}_{name}"][1], name  # once per chunk: all of it
    assert TitansCoreMLStep(load_checkpoint(titans_dir).model).check_program(program) == []


def weights_bytes(path: Path) -> int:
    return (path / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size


def test_sizes_shrink(packages):
    w = {q: weights_bytes(p) for q, p in packages.items()}
    print({q: (w[q], round(w[q] / w["fp16"], 3)) for q in SCHEMES})
    assert 0.45 < w["int8"] / w["fp16"] < 0.6  # 8 bits + a scale per channel; norms, W_0, gates stay fp16
    assert 0.25 < w["int4"] / w["fp16"] < 0.4  # 4 bits + an fp16 scale per 32
    for q, p in packages.items():  # decode and prefill share one copy of the weights (not of the program)
        assert w[q] < manifest(p)["coreml"]["single_function_bytes"], q


def run_like_the_runtime(step: TitansCoreMLStep, info: dict, calls: list[list[int]]) -> torch.Tensor:
    """Drive the torch wrapper exactly as CoreMLRuntime drives the package: its chunk plan, its choice of
    function (manifest steps) and numpy feeds."""
    n, out = 0, []
    with torch.no_grad():
        for ids in calls:
            for chunk in plan_chunks(ids, n, info["prefill_len"], info["prefill_exact"]):
                feed = make_feeds(list(info["inputs"]), chunk, n)
                fn = step.function(pick_step(info["steps"], len(chunk), n)["function"])
                out.append(fn(*(torch.from_numpy(feed[k]) for k in step.input_names))[0])
                n += len(chunk)
    return torch.cat(out)


def test_runtime_feeding_drives_the_wrapper_to_the_model(packages, titans_dir):
    ckpt = load_checkpoint(titans_dir)
    info = manifest(packages["fp16"])["coreml"]
    ids = torch.randint(0, ckpt.config.vocab_size, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    calls = [ids[:19], ids[19:20], ids[20:45], *([t] for t in ids[45:])]  # unaligned prompt, chat turns
    with torch.no_grad():
        ref = ckpt.model(torch.tensor([ids]))[0]
    exact = TitansCoreMLStep(ckpt.model).to(torch.float32)  # fp32 state: the same math
    assert (run_like_the_runtime(exact, info, calls) - ref).abs().max() < 1e-4
    stored = TitansCoreMLStep(ckpt.model).fp16_state_copy()  # fp16 state, as the package stores it
    got = run_like_the_runtime(stored, info, calls)
    assert (got - ref).abs().max() < 0.05 and (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
    # position 0 starts over whatever the state holds: a reused state gives the same logits
    assert torch.equal(run_like_the_runtime(stored, info, calls), got)


# mal is the packages fixture; mag differs from it only in how the branches combine (slow: -m slow)
@pytest.mark.parametrize("block", ["mac", pytest.param("mag", marks=pytest.mark.slow)])
def test_every_block_converts_and_validates(block, tokenizer, tmp_path):
    """mac (the paper's conv and qk-only norms: conv states, segment functions) and mag, fp16."""
    over = {"block": block, "mem_conv": 4, "mem_norm_v": False} if block == "mac" else {"block": block}
    run = random_run(tmp_path / block, tokenizer, **over)
    pkg = export_model(
        run, "coreml", "fp16", run / "export" / "model.fp16.mlpackage", ExportOptions(progress=False)
    )
    report = pkg.manifest["validation"]
    assert report["problems"] == []  # includes check_program: decode rewrites no state
    extra = {"decode_segment", "prefill_segment"} if block == "mac" else set()
    assert set(report["spec"]["functions"]) == {"decode", "decode_close", "prefill"} | extra
    w = report["wrapper"]
    assert w["max_abs_diff_fp64"] < 1e-9 and w["max_abs_diff_fp32"] < 1e-4 and w["tokens"] > 32  # a segment
    info = pkg.manifest["coreml"]
    ckpt = load_checkpoint(run)
    ids = torch.randint(0, 512, (75,), generator=torch.Generator().manual_seed(4)).tolist()
    calls = [ids[:13], *([t] for t in ids[13:40]), ids[40:]]  # a second and a third segment
    with torch.no_grad():
        ref = ckpt.model(torch.tensor([ids]))[0]
    got = run_like_the_runtime(TitansCoreMLStep(ckpt.model), info, calls)
    assert (got - ref).abs().max() < 1e-4


@pytest.mark.skipif(platform.system() == "Darwin", reason="checks the refusal on systems without Core ML")
def test_runtime_refuses_off_macos(packages):
    from kititans.runtimes import load_runtime

    with pytest.raises(KititansError, match="run only on macOS 15"):
        load_runtime(packages["fp16"])


@pytest.mark.macos
@pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML runs only on macOS 15+ (no runtime here)")
def test_runtime_on_macos_follows_pytorch(packages, titans_dir):
    from kititans.runtimes import load_runtime

    ckpt = load_checkpoint(titans_dir)
    rt = load_runtime(packages["fp16"], device="cpu")
    ids = torch.randint(0, ckpt.config.vocab_size, (50,), generator=torch.Generator().manual_seed(2)).tolist()
    got = np.concatenate(
        [rt.forward(ids[:21], all_logits=True)] + [rt.forward([t], all_logits=True) for t in ids[21:]]
    )
    with torch.no_grad():
        ref = ckpt.model(torch.tensor([ids]))[0].numpy()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
