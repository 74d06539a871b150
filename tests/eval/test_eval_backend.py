"""The KiTitans lm-eval backend on real runtimes: per-item log-likelihoods equal lm-eval's own `hf` backend
(same BOS handling), llama.cpp and ONNX Runtime agree with torch, Titans through torch and ONNX, generation
stops at stop strings, lm-eval's Japanese task and the chat template go through the same backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.eval.conftest import evaluate, per_item

pytestmark = pytest.mark.usefixtures("offline")

MC_TASKS = ["kt_mc", "kt_rolling"]


def kt(path, **kw):
    from kititans.eval.backend import KititansLM

    return KititansLM(path, **kw)


def acc(res, task="kt_mc"):
    return res["results"][task]["acc,none"]


@pytest.fixture(scope="module")
def torch_res(lite, tm, offline):
    return evaluate(kt(lite), tm, [*MC_TASKS, "kt_gen"])


def test_parity_with_lm_evals_hf_backend(lite, tm, torch_res):
    """Same per-item log-likelihoods as HFLM (max |diff| <= 1e-4 fp32) and the same accuracy; contexts start
    with BOS (add_bos_token=True), rolling documents with one BOS (HFLM with add_bos_token=False: with True
    it would add a second BOS after its prefix token)."""
    pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(lite), dtype="float32", batch_size=4, device="cpu", add_bos_token=True)
    ref = evaluate(hf, tm, ["kt_mc"])
    ours, theirs = np.array(per_item(torch_res, "kt_mc")), np.array(per_item(ref, "kt_mc"))
    assert ours.shape == theirs.shape == (32,)
    assert np.abs(ours - theirs).max() <= 1e-4
    assert acc(torch_res) == acc(ref)
    assert acc(torch_res, "kt_mc") is not None
    hf.add_bos_token = False
    ref = evaluate(hf, tm, ["kt_rolling"])
    ours, theirs = np.array(per_item(torch_res, "kt_rolling")), np.array(per_item(ref, "kt_rolling"))
    # a document's total is a sum of ~300 float32 log-probs in HFLM (one float32 ulp at 1,000 is 6e-5)
    assert np.abs(ours - theirs).max() <= 1e-6 * np.abs(theirs).max() + 1e-4
    assert len(kt(lite).tok_encode(Path("rolling.jsonl").read_text())) > 256  # several windows were scored


def test_llamacpp_f32_gguf_matches_torch(lite, tm, torch_res):
    """Within 1e-3 with an f32 KV cache and no flash attention (llama.cpp's defaults, an f16 cache and flash
    attention's f16 products, move scores by ~2e-3)."""
    pytest.importorskip("llama_cpp")
    lm = kt(lite / "export" / "model.f32.gguf", kv_type="f32", flash_attn=False)
    assert lm.rt.name == "llamacpp"
    res = evaluate(lm, tm, [*MC_TASKS, "kt_gen"])
    for task in MC_TASKS:
        ours, theirs = np.array(per_item(res, task)), np.array(per_item(torch_res, task))
        assert np.abs(ours - theirs).max() <= 1e-3, task
    assert acc(res) == acc(torch_res)
    assert per_item(res, "kt_gen") == per_item(torch_res, "kt_gen")


def test_onnx_batched_and_one_by_one_match_torch(lite, tm, torch_res):
    pytest.importorskip("onnxruntime")
    from kititans.eval.scoring import OneByOne, OnnxBatches

    batched = kt(lite / "export" / "onnx" / "fp32", batch_size=4)
    assert isinstance(batched.source, OnnxBatches)
    single = kt(lite / "export" / "onnx" / "fp32", batch_size=1)
    assert isinstance(single.source, OneByOne)
    for lm in (batched, single):
        res = evaluate(lm, tm, ["kt_mc"])
        assert np.abs(np.array(per_item(res, "kt_mc")) - np.array(per_item(torch_res, "kt_mc"))).max() <= 1e-4


@pytest.fixture(scope="module")
def titans_res(titans_run, tm, offline):
    from kititans.eval.scoring import TorchBatches

    lm = kt(titans_run, batch_size=4)
    assert isinstance(lm.source, TorchBatches)
    return evaluate(lm, tm, [*MC_TASKS, "kt_gen"])


def test_titans_torch_batched_equals_stateful(titans_run, tm, titans_res):
    """Titans scored in right-padded batches without state equals the runtime's stateful forward."""
    from kititans.eval.scoring import OneByOne

    stateful = kt(titans_run, batch_size=1)
    assert isinstance(stateful.source, OneByOne)
    b = evaluate(stateful, tm, MC_TASKS)
    for task in MC_TASKS:
        x, y = np.array(per_item(titans_res, task)), np.array(per_item(b, task))
        assert np.abs(x - y).max() <= 1e-4, task
    assert all(isinstance(t, str) for t in per_item(titans_res, "kt_gen"))


@pytest.mark.slow
def test_titans_onnx_matches_torch(titans, tm, titans_res):
    """The recurrent ONNX graphs (one window per call) within 1e-3 of torch (the export takes ~20 s of CPU)."""
    pytest.importorskip("onnxruntime")
    onnx = kt(titans / "export" / "onnx" / "fp32")
    assert onnx.rt.name == "onnx" and onnx.rt.recurrent
    c = evaluate(onnx, tm, [*MC_TASKS, "kt_gen"])
    for task in MC_TASKS:
        x, y = np.array(per_item(titans_res, task)), np.array(per_item(c, task))
        assert np.abs(x - y).max() <= 1e-3, task
    assert per_item(titans_res, "kt_gen") == per_item(c, "kt_gen")


def test_generation_stops_at_the_stop_string(lite):
    from kititans.generate import Generation, SamplingConfig

    lm = kt(lite)
    prompt = "Once upon a time"
    ids = lm.tok_encode(prompt)
    full = lm.codec.decode(list(Generation(lm.rt, ids, SamplingConfig(temperature=0, max_tokens=40))))
    stop = next(c for c in (" ", "e", "a", "o") if c in full)
    got = lm._generate(prompt, [stop], {"max_gen_toks": 40}, "t")
    assert got == full.split(stop)[0]
    assert stop not in got


def test_lm_evals_japanese_task_through_the_backend(lite, tm):
    """lm-eval's own ja_leaderboard_jcommonsenseqa (prompt, choices from process_docs, 3-shot) on local
    JCommonsenseQA-shaped data."""
    res = evaluate(kt(lite), tm, ["kt_ja_local"])
    samples = res["samples"]["ja_leaderboard_jcommonsenseqa"]
    assert len(samples) == 5
    ctx, choice = samples[0]["arguments"][0]
    assert "### 指示" in ctx and ctx.count("### 応答") == 4  # 3 shots and the question
    assert choice == "\n図書館"
    assert 0.0 <= res["results"]["ja_leaderboard_jcommonsenseqa"]["acc,none"] <= 1.0


def test_chat_template_and_registered_name(lite, tm):
    import lm_eval

    res = evaluate(kt(lite), tm, ["kt_mc"], apply_chat_template=True, limit=2)
    ctx = res["samples"]["kt_mc"][0]["arguments"][0][0]
    assert ctx.startswith("<s><|user|>\n") and ctx.endswith("<|assistant|>\n")
    lm = kt(lite)
    ids = lm.tok_encode(ctx)
    assert ids[0] == lm.codec.bos_id and ids[1] != lm.codec.bos_id  # the template's BOS, not a second one
    by_name = lm_eval.simple_evaluate(
        model="kititans",
        model_args=f"model={lite},batch_size=2",
        tasks=["kt_mc"],
        task_manager=tm,
        limit=2,
        bootstrap_iters=0,
    )
    assert by_name["results"]["kt_mc"]["acc,none"] is not None


def test_encoder_is_refused(monkeypatch):
    from kititans.errors import KititansError
    from kititans.eval.backend import load_lm_runtime

    class Encoder:
        task, codec = "embed", None

        def forward(self, ids):
            return None

    with pytest.raises(KititansError, match="is an encoder"):
        load_lm_runtime(Encoder())


def test_prefix_sharing_computes_each_longest_window_once():
    from kititans.eval.scoring import Request, longest_windows, score

    class Counting:
        def __init__(self):
            self.seen = []

        def logits(self, seqs):
            for i, s in enumerate(seqs):
                self.seen.append(list(s))
                # logits that depend only on the prefix: row t favours token (sum of prefix) % 7
                rows = np.zeros((len(s), 7), np.float32)
                for t in range(len(s)):
                    rows[t, sum(s[: t + 1]) % 7] = 3.0
                yield i, rows

    windows = [[1, 2, 3], [1, 2], [1, 2, 3, 4], [5, 6], [5]]
    seqs, owner = longest_windows(windows)
    assert seqs == [[1, 2, 3, 4], [5, 6]] and owner == [0, 0, 0, 1, 1]
    reqs = [Request(w, [sum(w) % 7]) for w in windows]  # each window's last row favours it
    src = Counting()
    out = score(src, reqs)
    assert src.seen == seqs  # two sequences computed for five requests
    assert all(s.greedy for s in out)
    assert out[1].logprob == pytest.approx(out[0].logprob)  # both read a row that favours their token
