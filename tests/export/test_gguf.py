"""GGUF export: every type written once from the session's `debug` run, re-read with gguf-py, checked against
the weights, against llama.cpp's own quantizer, and run in llama.cpp; refusals and errors leave nothing behind.

About 25 s on a quiet 2-core machine after the shared `debug_run` fixture.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from kititans.checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from kititans.cli import main  # noqa: E402
from kititans.errors import KititansError, UnsupportedExport  # noqa: E402
from kititans.export import ExportOptions, export_model  # noqa: E402
from kititans.export import gguf as gx  # noqa: E402
from kititans.models.layers import apply_rope, rope_tables  # noqa: E402
from kititans.models.lite import SPEC, LiteConfig, LiteModel  # noqa: E402
from kititans.models.spec import FamilySpec, Unsupported, load_families  # noqa: E402
from kititans.quantize.gguf import Q8_0, TYPES, llama_quantize, quantize  # noqa: E402
from kititans.quantize.imatrix import collect_imatrix  # noqa: E402
from kititans.runtimes.llamacpp import LlamaCppRuntime  # noqa: E402

OPTS = ExportOptions(progress=False)


@pytest.fixture(scope="module")
def exports(debug_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gguf")
    return {q: export_model(debug_run, "gguf", q, out / f"m.{q}.gguf", OPTS) for q in TYPES}


def fields(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}


def tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_every_type_rereads_with_names_shapes_and_metadata(exports, debug_run):
    ckpt = load_checkpoint(debug_run)
    cfg, tok = ckpt.config, ckpt.tokenizer
    expected = {"token_embd.weight": (512, 256), "output_norm.weight": (256,)}
    for i in range(cfg.n_layers):
        for name, shape in [
            ("attn_norm", (256,)),
            ("ffn_norm", (256,)),
            ("attn_q", (256, 256)),
            ("attn_k", (128, 256)),
            ("attn_v", (128, 256)),
            ("attn_output", (256, 256)),
            ("ffn_gate", (512, 256)),
            ("ffn_up", (512, 256)),
            ("ffn_down", (256, 512)),
        ]:
            expected[f"blk.{i}.{name}.weight"] = shape
    for q, r in exports.items():
        ts = tensors(r.path)
        assert {n: tuple(t.shape[::-1]) for n, t in ts.items()} == expected, q  # tied: no output.weight
        assert all(t.tensor_type == 0 for n, t in ts.items() if n.endswith("norm.weight"))
        f = fields(r.path)
        assert f["general.architecture"] == "llama" and f["general.name"] == debug_run.name
        assert f["general.file_type"] == TYPES[q].file_type
        assert (f.get("general.quantization_version") == 2) == TYPES[q].quantized
        hp = {
            "context_length": 256,
            "embedding_length": 256,
            "block_count": 2,
            "feed_forward_length": 512,
            "attention.head_count": 4,
            "attention.head_count_kv": 2,
            "rope.dimension_count": 64,
            "vocab_size": 512,
        }
        assert {k: f[f"llama.{k}"] for k in hp} == hp
        assert f["llama.rope.freq_base"] == 10000.0
        assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
        pieces = tok.pieces()
        assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.tokens"] == [
            p for p, _, _ in pieces
        ]
        assert f["tokenizer.ggml.scores"] == pytest.approx([s for _, s, _ in pieces])
        types = f["tokenizer.ggml.token_type"]
        # role tokens are CONTROL: llama.cpp parses them in a rendered template (special=True), never in text
        assert [types[tok.sp.PieceToId(p)] for p in ("<|system|>", "<|user|>", "<|assistant|>")] == [3, 3, 3]
        assert types[tok.end_id] == 3 and types[tok.bos_id] == 3 and types[300] in (1, 6)
        special = {
            k: f[f"tokenizer.ggml.{k}"]
            for k in ("bos_token_id", "eos_token_id", "eot_token_id", "padding_token_id", "unknown_token_id")
        }
        assert special == {
            "bos_token_id": 1,
            "eos_token_id": 2,
            "eot_token_id": tok.end_id,
            "padding_token_id": 3,
            "unknown_token_id": 0,
        }
        assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_space_prefix"] is False
        assert f["tokenizer.chat_template"] == tok.chat_template


def test_manifest(exports):
    for q, r in exports.items():
        m = json.loads(r.manifest_path.read_text())
        assert m == json.loads(json.dumps(r.manifest)) and r.manifest_path.name == f"m.{q}.gguf.json"
        assert m["format"] == "gguf" and m["type"] == q and m["size_bytes"] == r.path.stat().st_size
        assert m["quantizer"] == ("llama.cpp llama_model_quantize" if TYPES[q].needs_llamacpp else "gguf-py")
        assert set(m["tensors"]) == set(tensors(r.path)) and m["warnings"] == [] and m["tied_embeddings"]
        assert any("llama-cli" in h for h in m["next"]) and any("kititans chat" in h for h in m["next"])
    err = {q: max(t["max_rel_error"] for t in exports[q].manifest["tensors"].values()) for q in TYPES}
    assert err["f32"] == 0 and err["f16"] < 1e-3 and err["bf16"] < 1e-2
    assert err["q8_0"] < 0.02 < err["q4_0"] < 0.3 and err["q6_k"] < err["q4_k_m"]
    assert exports["q4_0"].manifest["tensor_types"] == {"F32": 5, "Q4_0": 14, "Q8_0": 1}  # output in q8_0
    assert exports["q4_k_m"].manifest["tensor_types"]["Q4_K"] > 0
    assert exports["q4_k_m"].manifest["tensors"]["token_embd.weight"]["type"] == "Q6_K"  # tied = output
    assert exports["q6_k"].manifest["tensor_types"] == {"F32": 5, "Q6_K": 15}
    sizes = [exports[q].path.stat().st_size for q in ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")]
    assert sizes == sorted(sizes, reverse=True)


def test_q_and_k_rows_are_permuted_for_interleaved_rope(exports, debug_run):
    ckpt = load_checkpoint(debug_run)
    ts = tensors(exports["f32"].path)
    sd = ckpt.model.state_dict()
    q = sd["model.layers.1.self_attn.q_proj.weight"].numpy()
    k = sd["model.layers.1.self_attn.k_proj.weight"].numpy()
    np.testing.assert_array_equal(ts["blk.1.attn_q.weight"].data, gx.permute_rope(q, 4))
    np.testing.assert_array_equal(ts["blk.1.attn_k.weight"].data, gx.permute_rope(k, 2))  # n_kv_heads
    np.testing.assert_array_equal(
        ts["blk.1.attn_v.weight"].data, sd["model.layers.1.self_attn.v_proj.weight"]
    )
    # the math: rotate-half RoPE on (q, k) == llama.cpp's pairwise RoPE on the permuted rows
    hd, T = 16, 5
    x = torch.randn(T, hd)
    wq, wk = torch.randn(hd, hd), torch.randn(hd, hd)
    cos, sin = rope_tables(hd, T, 10000.0)
    half = (
        apply_rope((x @ wq.T)[None, None], cos, sin)[0, 0]
        @ apply_rope((x @ wk.T)[None, None], cos, sin)[0, 0].T
    )

    def pairwise(v: torch.Tensor) -> torch.Tensor:  # GGML_ROPE_TYPE_NORM: rotate (2i, 2i+1)
        theta = torch.arange(T)[:, None] * 10000.0 ** (-torch.arange(0, hd, 2) / hd)
        a, b = v[:, 0::2], v[:, 1::2]
        return torch.stack(
            [a * theta.cos() - b * theta.sin(), a * theta.sin() + b * theta.cos()], -1
        ).flatten(1)

    pq, pk = (torch.from_numpy(gx.permute_rope(w.numpy(), 1)) for w in (wq, wk))
    torch.testing.assert_close(pairwise(x @ pq.T) @ pairwise(x @ pk.T).T, half, rtol=1e-4, atol=1e-4)


def test_gguf_py_quants_are_byte_identical_to_llamacpp(exports, tmp_path):
    for q in ("q8_0", "q4_0"):
        ours = tensors(exports[q].path)
        # the same fp32 weights through llama.cpp's quantizer (output matrix q8_0, as we write it)
        dst = tmp_path / f"llama.{q}.gguf"
        llama_quantize(exports["f32"].path, dst, TYPES[q], output_type=Q8_0)
        theirs = tensors(dst)
        assert set(theirs) == set(ours)
        for n, t in ours.items():
            assert (t.tensor_type, t.data.tobytes()) == (theirs[n].tensor_type, theirs[n].data.tobytes()), n
        # from our f16 file: gguf-py on the f16 values gives exactly llama.cpp's bytes too
        dst16 = tmp_path / f"llama16.{q}.gguf"
        llama_quantize(exports["f16"].path, dst16, TYPES[q], output_type=Q8_0, pure=False)
        for n, t in tensors(exports["f16"].path).items():
            if t.data.ndim == 2:
                mine = quantize(np.asarray(t.data, np.float32), int(tensors(dst16)[n].tensor_type))
                assert mine.tobytes() == tensors(dst16)[n].data.tobytes(), n


def test_imatrix(exports, debug_run, tmp_path):
    ckpt = load_checkpoint(debug_run)
    im = collect_imatrix(ckpt, "val", gx.gguf_name_of(ckpt), max_tokens=2048, n_ctx=128)
    two_d = {n: t for n, t in tensors(exports["f32"].path).items() if len(t.shape) == 2}
    assert set(im.data) == set(two_d)  # the tied lm_head's input lands on token_embd
    assert all(v.shape == (two_d[n].shape[0],) and (v > 0).all() for n, v in im.data.items())
    assert im.tokens == 2048
    calib = tmp_path / "calib.txt"
    calib.write_text("Once upon a time, Tom saw a big dog in the park. " * 400)
    for q, src in (("q4_k_m", "val"), ("q4_0", str(calib))):
        opts = ExportOptions(imatrix=src, progress=False, extra={"imatrix_tokens": 2048})
        r = export_model(debug_run, "gguf", q, tmp_path / f"im.{q}.gguf", opts)
        assert r.manifest["imatrix"] == {"source": src, "tokens": 2048, "tensors": len(two_d)}
        assert r.manifest["quantizer"].startswith("llama.cpp")
        plain, weighted = tensors(exports[q].path), tensors(r.path)
        changed = [n for n in plain if plain[n].data.tobytes() != weighted[n].data.tobytes()]
        assert len(changed) >= 10  # the importance weights change the rounding of the block weights
        assert r.manifest["tensor_types"] == exports[q].manifest["tensor_types"]


def _odd_checkpoint(debug_run: Path, out: Path) -> Checkpoint:
    """Untied, GQA 4/2 with head_dim 40, dims not multiples of 256, and 8 more embedding rows than tokens."""
    tok = load_checkpoint(debug_run).tokenizer
    cfg = LiteConfig(
        vocab_size=520,
        dim=160,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=320,
        context_length=64,
        tie_embeddings=False,
        init_std=0.1,
    )
    torch.manual_seed(0)
    model = LiteModel(cfg).eval()
    save_checkpoint(out, model, SPEC, cfg, tok)
    return Checkpoint(out, SPEC, cfg, model, tok, {"step": 0})


def test_untied_padded_odd_model_runs_in_llamacpp_and_refuses_kquants(debug_run, tmp_path):
    ckpt = _odd_checkpoint(debug_run, tmp_path / "odd")
    r = gx.export(ckpt, "f32", tmp_path / "odd.f32.gguf", OPTS)
    f = fields(r.path)
    assert "output.weight" in tensors(r.path) and not r.manifest["tied_embeddings"]
    assert len(f["tokenizer.ggml.tokens"]) == 520 and f["tokenizer.ggml.tokens"][-1] == "[PAD519]"
    assert f["tokenizer.ggml.token_type"][-1] == 5 and r.manifest["vocab"]["padded"] == 8
    assert f["llama.rope.dimension_count"] == 40 and "llama.attention.key_length" not in f
    # float32 KV cache and no flash attention (its f16 internals): llama.cpp matches PyTorch to 1e-6
    rt = LlamaCppRuntime(r.path, kv_type="f32", flash_attn=False)
    ids = [1, *ckpt.tokenizer.encode("Tom and Lily like to play with the ball.")]
    with torch.inference_mode():
        ref = ckpt.model(torch.tensor([ids]))[0].numpy()
    got = rt.forward(ids, all_logits=True)
    assert got.shape == ref.shape == (len(ids), 520)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-5
    assert gx.export(ckpt, "q8_0", tmp_path / "odd.q8_0.gguf", OPTS).manifest["tensor_types"]["Q8_0"] == 16
    out = tmp_path / "odd.q4_k_m.gguf"
    with pytest.raises(
        UnsupportedExport,
        match=r"multiple of 256.*types that work for this model: f32, "
        r"f16, bf16, q8_0, q4_0$",
    ) as e:
        gx.export(ckpt, "q4_k_m", out, OPTS)
    assert "\n" not in str(e.value) and not out.exists() and not out.with_name(out.name + ".json").exists()


def test_vocabulary_pads_and_flags_long_pieces():
    tok = SimpleNamespace(
        pieces=lambda: [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("▁" * 11, -1.0, 1), ("<|end|>", 0.0, 4)],
        end_id=3,
    )
    pieces, too_long = gx.vocabulary(SimpleNamespace(tokenizer=tok), rows=6)
    assert pieces[3] == ("<|end|>", 0.0, 3) and pieces[4:] == [("[PAD4]", -1000.0, 5), ("[PAD5]", -1000.0, 5)]
    assert too_long == [2]  # 11 x 3 bytes > 32


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_export_and_quant_list(debug_run, capsys):
    rc, out, _ = run_cli(capsys, "export", str(debug_run), "--format", "gguf", "--quant", "list")
    assert rc == 0 and "q4_k_m" in out and "4.89 bits/weight" in out and "(--q4)" in out and "(--q8)" in out
    rc, out, _ = run_cli(capsys, "export", str(debug_run), "--format", "gguf", "--q4", "-q")
    path = debug_run / "export" / "model.q4_k_m.gguf"
    assert rc == 0 and f"wrote {path}" in out and f"llama-cli -m {path}" in out
    assert path.with_name("model.q4_k_m.gguf.json").is_file()


def test_errors_are_one_line_and_leave_nothing(debug_run, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    cases = [
        (["--quant", "q3_x"], "gguf has no quantization 'q3_x'; valid: f32, f16"),
        (["--quant", "f16", "--imatrix", "val"], "--imatrix does not change gguf f16"),
        (["--q4", "--imatrix", str(tmp_path / "nope.txt")], "no such file"),
    ]
    for extra, message in cases:
        rc, _, err = run_cli(capsys, "export", str(debug_run), "--format", "gguf", "--out", str(out), *extra)
        assert rc == 2 and message in err and err.count("\n") == 1, err
        assert list(tmp_path.iterdir()) == []
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((debug_run / "config.json").read_text())
    rc, _, err = run_cli(capsys, "export", str(broken), "--format", "gguf", "--q8")
    assert rc == 2 and "missing model.safetensors" in err and err.count("\n") == 1
    assert sorted(p.name for p in broken.iterdir()) == ["config.json"]
    # a crash or failure in llama.cpp's quantizer leaves no file under the destination name
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(KititansError, match="llama.cpp's quantizer failed"):
        llama_quantize(bad, tmp_path / "never.gguf", TYPES["q4_k_m"])
    assert not (tmp_path / "never.gguf").exists()


def test_families_without_gguf_are_refused(tmp_path, capsys):
    spec = FamilySpec(
        name="memory",
        config_cls=LiteConfig,
        model_cls=LiteModel,
        presets={},
        description="test",
        formats={
            "gguf": Unsupported("llama.cpp has no Titans architecture"),
            "onnx": object(),
            "coreml": object(),
        },
    )
    out = tmp_path / "m.gguf"
    with pytest.raises(UnsupportedExport) as e:
        gx.export(SimpleNamespace(spec=spec), "q4_k_m", out, OPTS)
    assert str(e.value) == (
        "gguf export of a memory model is not possible: llama.cpp has no Titans architecture; "
        "formats that work for memory: onnx, coreml"
    )
    assert not out.exists()
    if "titans" not in load_families():
        return  # the Titans family is not in this build yet
    run = tmp_path / "titans-run"
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"kititans": {"format_version": 1, "family": "titans", "model": {}}})
    )
    rc, _, err = run_cli(capsys, "export", str(run), "--format", "gguf", "--q4")
    assert rc == 2 and "gguf export of a titans model is not possible" in err and err.count("\n") == 1
    assert not (run / "export").exists()
