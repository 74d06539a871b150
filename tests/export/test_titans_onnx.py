"""Titans ONNX export: one step graph per kind of call over one fixed-size state, run back in onnxruntime. Logits
equal PyTorch across memory-chunk boundaries, mac segments and past the attention window; greedy decode equal;
each graph reads and returns only its own state (the ring in place); a graph called at the wrong position
returns NaN; the docs' plain-onnxruntime example works; int8/int4 agreement bounded; every block exports.
About 60 s."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from kititans.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from kititans.export import ExportOptions, export_model  # noqa: E402
from kititans.generate import Generation, SamplingConfig  # noqa: E402
from kititans.models.titans import SPEC  # noqa: E402
from kititans.runtimes import load_runtime  # noqa: E402

PROMPT = "Once upon a time, a little girl named Mia found a red ball in the garden. She asked her mother"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "titans.md"


@pytest.fixture(scope="module")
def exports(titans_run, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("titans-onnx")
    return {
        q: export_model(titans_run, "onnx", q, out / q, ExportOptions(progress=False)).path
        for q in ("fp32", "int8", "int4")
    }


@pytest.fixture(scope="module")
def ckpt(titans_run):
    return load_checkpoint(titans_run)


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())["onnx"]


def test_one_graph_per_kind_of_call_each_with_its_own_state(exports, ckpt):
    folder, C = exports["fp32"], ckpt.config.mem_chunk
    info = manifest(folder)
    steps = {s["name"]: s for s in info["steps"]}
    L = C * (ckpt.config.window // C)  # the long prefill: the whole chunks of a window
    assert info["kind"] == "recurrent" and list(steps) == [
        "decode",
        "decode_close",
        "prefill",
        "prefill_long",
    ]
    assert [(s["file"], s["tokens"], s["every"]) for s in steps.values()] == [
        ("model.onnx", 1, 1), ("decode_close.onnx", 1, C), ("prefill.onnx", C, C),
        ("prefill_long.onnx", L, L),
    ]  # fmt: skip
    names = [n for n, _, _ in ckpt.model.state_spec(1)[1:]]  # the position is an input, not state
    assert [s["input"] for s in info["states"]] == [f"past_{n}" for n in names]
    assert all(s["grow_axis"] is None for s in info["states"])  # fixed size: nothing grows
    mem = "layers.1"  # titans-debug: memory on layer 2
    dec, close = steps["decode"], steps["decode_close"]
    # a token inside a chunk reads the memory weights and writes none of them; it writes its buffer row
    assert f"past_{mem}.w1" in dec["inputs"] and f"present_{mem}.w1" not in dec["outputs"]
    assert f"present_{mem}.s_w1" not in dec["outputs"] and f"past_{mem}.s_w1" not in dec["inputs"]
    assert f"present_{mem}.buf" in dec["outputs"] and f"present_{mem}.buf" not in close["outputs"]
    assert {f"present_{mem}.w1", f"present_{mem}.s_w1"} <= set(close["outputs"])
    # ring rows and the buffer row are written by one ScatterND each, bound in place by the runtime
    assert set(dec["inplace"]) == {f"present_layers.{i}.{k}" for i in (0, 1) for k in ("k", "v")} | {
        f"present_{mem}.buf"
    }
    assert dec["ops"]["ScatterND"] == 5 and "Where" in dec["ops"]  # 4 ring writes + 1 buffer row; the guard
    for op in ("Attention", "RotaryEmbedding", "RMSNormalization"):  # Lite's fused opset-23 ops
        assert op in dec["ops"], op
    for s in steps.values():  # every graph exists and lists exactly its session's inputs and outputs
        sess = ort.InferenceSession(str(folder / s["file"]))
        assert [i.name for i in sess.get_inputs()] == s["inputs"]
        assert [o.name for o in sess.get_outputs()] == s["outputs"]
    params = sum(p.numel() for p in ckpt.model.parameters())  # the graphs share one weight file
    assert (folder / "weights.onnx.data").stat().st_size < 1.2 * 4 * params
    # a token inside a chunk reads the memory through its query rows: not the key and value projections,
    # which the closing call reads once per chunk
    import onnx

    def weight_floats(file: str) -> int:
        graph = onnx.load(str(folder / file), load_external_data=False).graph
        return sum(int(np.prod(t.dims)) for t in graph.initializer)

    memory = ckpt.model.layers[1].memory
    kv = 2 * memory.n_heads * memory.head_dim * ckpt.config.dim
    assert weight_floats(close["file"]) - weight_floats(dec["file"]) >= kv
    assert info["initial_state"] == "initial_state.safetensors"


def test_fp32_logits_equal_pytorch_over_chunks_and_past_the_window(exports, ckpt):
    """A prompt through the long prefill graph (32 tokens), the chunk prefill graph (8) and the decode graphs
    (the remainder), then token-by-token decode to 3x the window (96 positions, 12 memory chunks), against the
    parallel forward."""
    rt = load_runtime(exports["fp32"])
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, ckpt.config.vocab_size, (100,), generator=g).tolist()
    got = [rt.forward(seq[:45], all_logits=True)]  # a long prefill, a prefill chunk, 5 decode steps
    got += [rt.forward([t], all_logits=True) for t in seq[45:]]
    assert rt.n_past == 100
    with torch.no_grad():
        ref = ckpt.model(torch.tensor([seq]))[0].numpy()
    assert np.abs(np.concatenate(got) - ref).max() < 1e-4
    rt.reset()  # in-place ring writes did not touch the initial state: the same logits again
    again = np.concatenate([rt.forward(seq[:21], all_logits=True), rt.forward(seq[21:70], all_logits=True)])
    assert np.abs(again - ref[:70]).max() < 1e-4


def test_a_graph_called_at_the_wrong_position_returns_nan(exports, ckpt):
    """The runtime picks the graph from the position; a caller that does not gets NaN logits, not garbage
    (a prefill at a misaligned position, a chunk-closing graph inside a chunk), or an error (the mid-chunk
    graph at a chunk end: its buffer has no row for the closing token)."""
    from safetensors.numpy import load_file

    folder, C = exports["fp32"], ckpt.config.mem_chunk
    info = manifest(folder)
    state = load_file(str(folder / info["initial_state"]))
    L = C * (ckpt.config.window // C)
    cases = {
        "prefill.onnx": [(0, True), (C, True), (3, False)],
        "prefill_long.onnx": [(0, True), (L, True), (C, False)],
        "decode_close.onnx": [(C - 1, True), (C, False)],
    }
    cases["model.onnx"] = [(0, True), (C + 2, True)]
    for s in info["steps"]:
        sess = ort.InferenceSession(str(folder / s["file"]))
        feed = {n: state[n] for n in s["inputs"][2:]}
        feed["input_ids"] = np.ones((1, s["tokens"]), np.int64)
        for pos, ok in cases[s["file"]]:
            feed["position"] = np.array([pos], np.int64)
            logits = sess.run(["logits"], feed)[0]
            assert np.isfinite(logits).all() if ok else np.isnan(logits).all(), (s["file"], pos)
        if s["file"] == "model.onnx":
            feed["position"] = np.array([C - 1], np.int64)
            with pytest.raises(Exception, match="invalid indice"):
                sess.run(["logits"], feed)


def test_greedy_equals_pytorch_and_int_quants_agree(exports, ckpt, titans_run):
    torch_rt = load_runtime(titans_run)
    ids = [torch_rt.codec.bos_id, *torch_rt.codec.encode(PROMPT)]
    want = list(Generation(torch_rt, ids, SamplingConfig(temperature=0, max_tokens=32), stop_ids=()))
    rt = load_runtime(exports["fp32"])
    assert list(Generation(rt, ids, SamplingConfig(temperature=0, max_tokens=32), stop_ids=())) == want
    seq = ids + want
    with torch.no_grad():
        ref = ckpt.model(torch.tensor([seq]))[0].numpy().argmax(-1)
    for quant, floor in (("int8", 0.9), ("int4", 0.75)):
        m = json.loads((exports[quant] / "manifest.json").read_text())
        assert m["check"]["top1_agreement"] >= floor, quant
        q = load_runtime(exports[quant])
        top1 = (q.forward(seq, all_logits=True).argmax(-1) == ref).mean()
        assert top1 >= floor, (quant, top1)
        size = lambda q: (exports[q] / "weights.onnx.data").stat().st_size  # noqa: E731
        assert size(quant) < 0.6 * size("fp32"), quant


def test_runtime_decodes_past_the_training_length(exports, ckpt):
    """The state does not grow: decoding past context_length works and costs the same per token."""
    rt = load_runtime(exports["fp32"])
    n = ckpt.config.context_length + 8
    ids = torch.randint(0, ckpt.config.vocab_size, (n,), generator=torch.Generator().manual_seed(2)).tolist()
    out = rt.forward(ids)
    assert rt.n_past == n and np.isfinite(out).all()


def test_the_docs_plain_onnxruntime_example(exports, titans_run, tmp_path):
    """The ~30-line example of docs/titans.md, run as written against the export: kititans' greedy text."""
    code = next(
        b for b in re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S) if "onnxruntime example" in b
    )
    assert 25 <= len([ln for ln in code.splitlines() if ln.strip() and not ln.startswith("#")]) <= 40
    code = code.replace('folder = "runs/my-titans/export/onnx/fp32"', f'folder = "{exports["fp32"]}"')
    code += "\nprint(json.dumps(out))\n"
    script = tmp_path / "example.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    torch_rt = load_runtime(titans_run)
    ids = [torch_rt.codec.bos_id, *torch_rt.codec.encode("Once upon a time")]
    assert got == list(Generation(torch_rt, ids, SamplingConfig(temperature=0, max_tokens=32), stop_ids=()))


@pytest.mark.parametrize("block", ["mac", "mag"])
def test_every_block_exports_and_matches(block, titans_run, tmp_path):
    """mac (with the paper's conv and qk-only norms: conv states, segment graphs) and mag (at opset 18: plain
    ops for older runtimes), random weights: prefill chunks and single tokens over several segments equal the
    parallel forward."""
    tok = load_checkpoint(titans_run).tokenizer
    over = {"block": block, "mem_conv": 4, "mem_norm_v": False} if block == "mac" else {"block": block}
    cfg = SPEC.make_config("titans-debug", over)
    torch.manual_seed(0)
    model = SPEC.build(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = save_checkpoint(tmp_path / block, model, SPEC, cfg, tok)
    opset = 23 if block == "mac" else 18
    options = ExportOptions(progress=False, extra={"opset": opset})
    result = export_model(run, "onnx", "fp32", tmp_path / "onnx", options)
    assert result.manifest["onnx"]["opset"] == opset
    assert ("Attention" in result.manifest["onnx"]["ops"]) == (opset == 23)
    names = [s["name"] for s in result.manifest["onnx"]["steps"]]
    extra = (
        ["decode_segment", "prefill_segment", "prefill_long_segment"] if block == "mac" else ["prefill_long"]
    )
    assert sorted(names) == sorted(["decode", "decode_close", "prefill", *extra])
    assert result.manifest["check"]["max_abs_logit_diff"] < 1e-4
    rt = load_runtime(result.path)
    seq = torch.randint(0, 512, (110,), generator=torch.Generator().manual_seed(3)).tolist()  # ~3.5 segments
    got = [rt.forward(seq[:19], all_logits=True)] + [rt.forward([t], all_logits=True) for t in seq[19:50]]
    got.append(rt.forward(seq[50:], all_logits=True))  # aligned at 56: chunks again, at 64 a long prefill
    with torch.no_grad():
        ref = model(torch.tensor([seq]))[0].numpy()
    assert np.abs(np.concatenate(got) - ref).max() < 1e-4


def test_a_run_with_an_unknown_block_is_refused_in_one_line(titans_run, tmp_path):
    """A run from a kititans with blocks this one lacks: `kititans export` says so in one line, writes nothing."""
    import shutil

    run = tmp_path / "future"
    shutil.copytree(titans_run, run, ignore=shutil.ignore_patterns("export", "train_state"))
    cfg = json.loads((run / "config.json").read_text())
    cfg["kititans"]["model"]["block"] = "mat"
    (run / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "kititans", "export", str(run), "--format", "onnx"],
        capture_output=True,
        text=True,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "unknown model.block 'mat'" in lines[0], r.stderr
    assert not (run / "export").exists()


def test_the_runtime_picks_the_step_by_position_and_refuses_a_misaligned_chunk():
    """runtimes.base.pick_step over a mac-like step table (chunk 4, segment 8): the largest `every` that divides
    position + tokens; a chunk call that does not start at a multiple of its size is one clear error."""
    from kititans.errors import KititansError
    from kititans.runtimes.base import pick_step

    table = [
        {"file": "model.onnx", "tokens": 1, "every": 1},
        {"file": "decode_close.onnx", "tokens": 1, "every": 4},
        {"file": "decode_segment.onnx", "tokens": 1, "every": 8},
        {"file": "prefill.onnx", "tokens": 4, "every": 4},
        {"file": "prefill_segment.onnx", "tokens": 4, "every": 8},
    ]
    picks = {
        (t, p): pick_step(table, t, p)["file"] for t, p in [(1, 0), (1, 2), (1, 3), (1, 7), (4, 0), (4, 4)]
    }
    assert picks == {
        (1, 0): "model.onnx",
        (1, 2): "model.onnx",
        (1, 3): "decode_close.onnx",
        (1, 7): "decode_segment.onnx",
        (4, 0): "prefill.onnx",
        (4, 4): "prefill_segment.onnx",
    }
    with pytest.raises(KititansError, match="no step of this export takes 4 tokens at position 2: re-export"):
        pick_step(table, 4, 2)
    with pytest.raises(KititansError, match="takes 3 tokens"):
        pick_step(table, 3, 0)
