"""kititans qat: short fine-tunes of the shared debug runs, and the exact hand-off per format: the exported
artifact (GGUF tensors, ONNX MatMulNBits blocks, CoreML compressed consts), dequantized, equals the QAT
model's fake-quantized weights. Plus the one-line errors and the export warning. About 90 s after the shared
runs (CoreML and Titans exports are the slow part)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kititans.checkpoint import load_checkpoint, read_meta
from kititans.cli import main
from kititans.quantize import qat as Q
from kititans.train.qat import QatSpec, default_out, qat, qat_config

STEPS = 12


def fine_tune(base: Path, target: str, out: Path, steps: int = STEPS, **over) -> Path:
    spec = QatSpec(base, Q.parse_target(target), out, steps=steps)
    layers = [("train.batch_size", 4), ("train.eval_batches", 4), *over.items()]
    result = qat(spec, qat_config(spec, layers), progress=False)
    assert result.step == steps and result.extra["ptq_val_loss"] is not None
    return out


@pytest.fixture(scope="module")
def runs(debug_run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qat")
    return {
        t: fine_tune(debug_run, t, root / t.replace(":", "-"))
        for t in ("gguf:q4_0", "gguf:q4_k_m", "onnx:int4")
    }


def fake_quantized(run: Path) -> tuple[object, Q.Plan, dict[str, torch.Tensor]]:
    """The QAT run's latent weights through its own plan: what the device must see."""
    ckpt = load_checkpoint(run)
    plan = Q.make_plan(ckpt.model, ckpt.spec, Q.parse_target(read_meta(run)["qat"]["target"]))
    return ckpt, plan, Q.quantized_weights(ckpt.model, plan)


def test_plan_and_metadata(runs, debug_run):
    meta = read_meta(runs["gguf:q4_0"])
    q = meta["qat"]
    assert q["target"] == "gguf:q4_0" and q["base_steps"] == read_meta(debug_run)["step"]
    assert meta["base_run"]["path"] == str(debug_run) and meta["stage"] == "pretrain"
    counts = q["plan"]["counts"]
    assert counts == {"q4_0": 14, "q8_0": 2}  # 7 matrices x 2 layers; the tied embedding and its head: q8_0
    # windows of the model's whole context (256), not the base's 128: the float model matched where it is run
    assert meta["run"]["train"]["seq_len"] == meta["model"]["context_length"] == 256
    assert default_out(debug_run, Q.parse_target("gguf:q4_0")).name == "debug-qat-q4_0"
    assert default_out(debug_run, Q.parse_target("onnx:int4")).name == "debug-qat-onnx-int4"


def kl_to_float(base: Path, run: Path, target: str) -> float:
    """Mean KL(float base || `run` fake-quantized at `target`) per token on the base run's held-out windows."""
    import torch.nn.functional as F

    from kititans.data.tokendata import TokenData

    teacher = load_checkpoint(base).model.eval()
    ckpt = load_checkpoint(run)
    Q.prepare(ckpt.model, Q.make_plan(ckpt.model, ckpt.spec, Q.parse_target(target))).eval()
    total = count = 0.0
    with torch.no_grad():
        for x, _ in TokenData(base / "data").eval_batches(4, 8, 128):
            p = F.log_softmax(teacher(x).float(), -1).flatten(0, 1)
            q = F.log_softmax(ckpt.model(x).float(), -1).flatten(0, 1)
            total += F.kl_div(q, p, log_target=True, reduction="sum").item()
            count += p.shape[0]
    return total / count


def test_qat_brings_the_quantized_model_closer_to_the_float_one(debug_run, tmp_path):
    """PTQ (the base rounded at q4_0) vs 30 QAT steps at the default learning rate: the KL of the quantized
    model to the float model it is measured against drops (on the debug run by ~70%)."""
    out = fine_tune(debug_run, "gguf:q4_0", tmp_path / "q", steps=30)
    rows = [__import__("json").loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[0] > read_meta(out)["qat"]["float_val_loss"]  # quantization costs something before QAT
    ptq, after = kl_to_float(debug_run, debug_run, "gguf:q4_0"), kl_to_float(debug_run, out, "gguf:q4_0")
    assert after < 0.7 * ptq, (ptq, after)


def test_gguf_handoff_is_exact(runs, tmp_path):
    """Every 2-D tensor of the exported file, dequantized, is the fake-quantized weight (Q/K rows permuted
    for llama.cpp's RoPE layout, a row permutation that commutes with row-block quantization)."""
    gguf = pytest.importorskip("gguf")
    from kititans.export import export_model
    from kititans.export.gguf import permute_rope
    from kititans.quantize.gguf import dequantize

    for target in ("gguf:q4_0", "gguf:q4_k_m"):
        run = runs[target]
        ckpt, plan, fq = fake_quantized(run)
        res = export_model(run, "gguf", target.split(":")[1], tmp_path / f"{target[5:]}.gguf")
        assert res.manifest["qat_handoff"] is True
        heads = {"attn_q": ckpt.config.n_heads, "attn_k": ckpt.config.n_kv_heads}
        seen = 0
        for t in gguf.GGUFReader(str(res.path)).tensors:
            if len(t.shape) < 2:
                continue
            want = fq[_module_of(t.name)].numpy()
            kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
            if kind in heads:
                want = permute_rope(want, heads[kind])
            got = dequantize(t.data, int(t.tensor_type)).reshape(want.shape)
            assert np.array_equal(got, want), (target, t.name)
            seen += 1
        assert seen == len(plan.kernels) - 1  # every planned tensor is in the file (the tied head once)


def _module_of(gguf_name: str) -> str:
    table = {
        "token_embd": "model.embed_tokens",
        "output": "lm_head",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{table[parts[2]]}"
    return table[parts[0]]


def test_q4_k_m_mix_is_llamacpps(debug_run, tmp_path):
    """The q4_k_m plan gives each tensor the type llama.cpp's own quantizer picks (8 layers: the layer rule)."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from kititans.checkpoint import Checkpoint
    from kititans.export import ExportOptions
    from kititans.export.gguf import export
    from kititans.quantize.gguf import TYPE_NAMES

    base = load_checkpoint(debug_run)
    spec = base.spec
    cfg = spec.make_config("debug", {"n_layers": 8, "vocab_size": base.config.vocab_size})
    torch.manual_seed(0)
    model = spec.build(cfg).eval()
    ckpt = Checkpoint(debug_run, spec, cfg, model, base.tokenizer, dict(base.meta))
    res = export(ckpt, "q4_k_m", tmp_path / "m.gguf", ExportOptions(progress=False))
    types = {
        t.name: TYPE_NAMES[int(t.tensor_type)]
        for t in gguf.GGUFReader(str(res.path)).tensors
        if len(t.shape) == 2
    }
    _, by_name, _ = Q._gguf_layout(model, spec, "q4_k_m")
    assert {n: k.upper() for n, k in by_name.items()} == types
    assert sum(v == "Q6_K" for v in types.values()) > 1


def onnx_rows(graph: Path) -> list[np.ndarray]:
    """Every row of every MatMulNBits weight of one graph file, dequantized: (N, K) float32 each."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        n, k, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
        packed = init[node.input[1]].reshape(n, -1)
        q = np.stack([packed & 15, packed >> 4], -1).reshape(n, -1) if bits == 4 else packed
        scale = init[node.input[2]].reshape(n, -1)
        blocks = q.reshape(n, -1, block).astype(np.float32) - (1 << (bits - 1))
        out.append((blocks * scale[..., None]).reshape(n, -1)[:, :k])
    return out


def assert_onnx_handoff(run: Path, quant: str, tmp_path: Path) -> None:
    """Every graph (Titans: one per kind of step) holds only fake-quantized rows, none twice; a graph that runs
    every linear (Lite's one graph, Titans' chunk-closing ones) holds each planned row once (the exporter may
    fuse linears that read the same input, which only stacks rows; a Titans token inside a memory chunk reads
    the memory through its query rows alone)."""
    pytest.importorskip("onnxruntime")
    from kititans.export import export_model

    _, _plan, fq = fake_quantized(run)
    res = export_model(run, "onnx", quant, tmp_path / "onnx")
    want = {r.tobytes() for w in fq.values() for r in w.numpy()}
    graphs = sorted(res.path.glob("*.onnx"))
    assert graphs
    planned, rows = sum(w.shape[0] for w in fq.values()), {}
    for g in graphs:
        got = [r.tobytes() for m in onnx_rows(g) for r in m.astype(np.float32)]
        assert got and all(r in want for r in got), (
            f"{g.name}: a block differs from the fake-quantized weights"
        )
        assert len(got) <= planned, f"{g.name}: more MatMul rows than the plan"
        rows[g.name] = len(got)
    assert max(rows.values()) == planned, f"no graph holds every planned row: {rows}"


def test_onnx_int4_handoff_is_exact(runs, tmp_path):
    assert_onnx_handoff(runs["onnx:int4"], "int4", tmp_path)


def test_titans_onnx_handoff_keeps_memory_state_fp32(titans_run, tmp_path):
    run = fine_tune(titans_run, "onnx:int4", tmp_path / "t", steps=4)
    plan = read_meta(run)["qat"]["plan"]["modules"]
    assert not any(k.endswith(("w1", "w2", "gamma")) for k in plan)  # the memory state is no nn.Linear
    assert_onnx_handoff(run, "int4", tmp_path)


def test_coreml_int4_handoff_is_exact(debug_run, tmp_path):
    pytest.importorskip("coremltools")
    from kititans.export import export_model
    from kititans.quantize.coreml import coremltools, weight_values

    run = fine_tune(debug_run, "coreml:int4", tmp_path / "c", steps=4)
    _, _plan, fq = fake_quantized(run)
    res = export_model(run, "coreml", "int4", tmp_path / "m.mlpackage")
    ct = coremltools()
    load = coremltools("coremltools.converters.mil.frontend.milproto.load").load
    spec = ct.models.MLModel(str(res.path), skip_model_load=True).get_spec()
    prog = load(spec, spec.specificationVersion, str(res.path / "Data/com.apple.CoreML/weights"))
    values = weight_values(prog.functions["decode"])
    checked, aliased = [], []
    for mod, w in fq.items():
        # an fp16 op's weight is <name>_to_fp16, an fp32 op's <name>; the step wrapper may hold the LM as `model`
        stems = ["p_" + f"{pre}{mod}.weight".replace(".", "_") for pre in ("", "model.")]
        key = next((s + x for s in stems for x in ("_to_fp16", "") if s + x in values), None)
        if key is None:
            aliased.append(mod)  # a tied weight is stored once, under its other name
            continue
        assert np.array_equal(values[key].astype(np.float32), w.numpy()), mod
        checked.append(mod)
    assert len(checked) >= len(fq) - 1
    for mod in aliased:
        assert any(torch.equal(fq[mod], fq[c]) for c in checked), (mod, sorted(values))


def test_exporting_another_level_warns_in_one_line(runs, tmp_path, caplog):
    """The CLI logs it to stderr (under pytest the log capture takes it), and still exports."""
    import logging

    run = runs["gguf:q4_0"]
    with caplog.at_level(logging.INFO, logger="kititans"):
        argv = ["export", str(run), "--format", "gguf", "--quant", "q8_0", "--out", str(tmp_path / "x.gguf")]
        assert main(argv) == 0
    err = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(err) == 1 and "\n" not in err[0], err
    assert err[0].startswith("warning:") and "gguf:q4_0" in err[0] and "--quant q4_0" in err[0]
    assert (tmp_path / "x.gguf").is_file()


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["qat", *args, "-q"])
    return code, capsys.readouterr().err


def test_errors_are_one_line_and_write_nothing(debug_run, titans_run, tmp_path, capsys):
    code, err = run_cli(capsys, str(debug_run), "--target", "gguf:q5_1", "--out", str(tmp_path / "a"))
    assert (
        code == 2 and "unknown QAT target 'gguf:q5_1'" in err and "gguf:q4_0" in err and err.count("\n") == 1
    )
    code, err = run_cli(capsys, str(titans_run), "--target", "gguf:q4_0", "--out", str(tmp_path / "b"))
    assert code == 2 and "gguf export of a titans model is not possible" in err and "onnx" in err
    orphan = tmp_path / "orphan"
    shutil.copytree(
        debug_run, orphan, ignore=shutil.ignore_patterns("data", "checkpoints", "export", "bench")
    )
    cfg = orphan / "config.json"
    cfg.write_text(cfg.read_text().replace(str(debug_run / "data"), str(tmp_path / "gone")))
    code, err = run_cli(capsys, str(orphan), "--target", "gguf:q4_0", "--out", str(tmp_path / "c"))
    assert code == 2 and "--data" in err and err.count("\n") == 1
    code, err = run_cli(
        capsys, str(debug_run), "--target", "onnx:int4", "--data", str(tmp_path), "--out", str(tmp_path / "d")
    )
    assert code == 2 and "not a prepared token data folder" in err
    for d in "abcd":
        assert not (tmp_path / d).exists()
