"""The llama.cpp runtime on real GGUF exports of a chat model trained in this session: tokenization parity,
logits parity with PyTorch, quantized quality, the cache protocol, create_chat_completion, and the CLI.

About 40 s on a quiet 2-core machine, most of it training the chat model (200 steps); the tests themselves
take about 10 s.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from kititans.bench.quality import compare, log_softmax, make_chunks, scored_slice
from kititans.cli import main
from kititans.data.builtin import generate_chat_examples, generate_corpus
from kititans.data.chat import render_prompt, render_text
from kititans.data.tokendata import TokenData
from kititans.export import ExportOptions, export_model
from kititans.generate import Generation, SamplingConfig
from kititans.runtimes import load_runtime
from kititans.runtimes.llamacpp import (
    GGUFCodec,
    LlamaCppRuntime,
    chat_completion,
    chat_prompt_ids,
    open_llama,
    repack_setting,
)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory) -> Path:
    """A Lite `debug` model pretrained 200 steps on 1500 built-in chat conversations (rendered with the chat
    template): enough for short answers to end with <|end|>."""
    from kititans.train.pretrain import pretrain
    from tests.conftest import make_config

    root = tmp_path_factory.mktemp("chat")
    data = root / "chats.jsonl"
    with open(data, "w") as f:
        for msgs in generate_chat_examples(seed=0, n=1500):
            f.write(json.dumps({"messages": msgs}) + "\n")
    out = root / "run"
    pretrain(make_config(out, **{"data.sources": [str(data)], "train.steps": 200}), progress=False)
    return out


@pytest.fixture(scope="module")
def ggufs(chat_run) -> dict[str, Path]:
    opts = ExportOptions(progress=False)
    return {
        q: export_model(chat_run, "gguf", q, options=opts).path for q in ("f32", "q8_0", "q4_0", "q4_k_m")
    }


@pytest.fixture(scope="module")
def torch_rt(chat_run):
    return load_runtime(chat_run)


def tricky_lines(n: int, seed: int = 0) -> list[str]:
    """Corpus and chat lines, plus the same lines with unicode, digits, whitespace runs and special tokens mixed in."""
    rng = random.Random(seed)
    lines = [ln for d in generate_corpus(seed, 60_000) for ln in d.split("\n") if ln]
    lines += [render_text(_template(), m) for m in generate_chat_examples(seed=7, n=300)]
    extras = [
        "ünïcödé",
        "日本語",
        "🙂🚀",
        "\u00a0",
        "e\u0301",
        "Ωμέγα",
        "ß",
        "ﬁ",
        "12345678901234567890",
        "3.14159",
        "  ",
        "\t\t",
        "\n\n",
        "   \n ",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
        "<|system|>",
        "<s>",
        "</s>",
        "<unk>",
        "<pad>",
        "<0x41>",
        "▁",
        "<|",
        "|>",
        "<|us",
        "{{ x }}",
    ]
    out = list(lines)
    while len(out) < n:
        words = rng.choice(lines).split(" ")
        for _ in range(rng.randint(1, 4)):
            words.insert(rng.randrange(len(words) + 1), rng.choice(extras))
        out.append((" " * rng.randint(0, 3)).join(words) if rng.random() < 0.3 else " ".join(words))
    crafted = [
        "",
        " ",
        "  leading",
        "trailing  ",
        "a\u200bb",
        "\r\n",
        "x" * 300,
        "<|user|><|end|>",
        "<|user|>Hi<|end|>\n<|assistant|>",
        "1+1=2",
        "100 000",
        "mixed 日本 and 🙂 text\twith tabs",
    ]
    return crafted + out[: n - len(crafted)]


def _template() -> str:
    from kititans.data.tokenizer import CHAT_TEMPLATE

    return CHAT_TEMPLATE


def test_tokenization_matches_llamacpp(chat_run, ggufs):
    rt = load_runtime(ggufs["f32"])
    tok = rt.codec
    assert type(tok).__name__ == "Tokenizer"  # the run's tokenizer, found from RUN/export/
    lines = tricky_lines(3000)
    mismatches = [s for s in lines if rt.tokenize(s, add_bos=False, special=True) != tok.encode_special(s)]
    assert len(lines) == 3000 and mismatches == []
    # the adapter a bare .gguf gets behaves like the run's tokenizer
    codec = GGUFCodec(rt)
    assert all(codec.encode(s) == tok.encode(s) for s in lines[:500])
    assert all(codec.decode(tok.encode(s)) == s for s in lines[:500] if "<|end|>" not in s)


def test_f32_gguf_matches_pytorch(torch_rt, ggufs):
    rt = load_runtime(ggufs["f32"])
    codec = torch_rt.codec
    prompt = [codec.bos_id, *codec.encode("Once upon a time, a little girl named Lily")]
    greedy = SamplingConfig(temperature=0, max_tokens=32)
    ours = list(Generation(torch_rt, prompt, greedy))
    theirs = list(Generation(rt, prompt, greedy))
    assert len(ours) == 32 and ours == theirs
    seq = prompt + ours
    torch_rt.reset()
    rt.reset()
    a, b = torch_rt.forward(seq, all_logits=True), rt.forward(seq, all_logits=True)
    assert a.shape == b.shape == (len(seq), rt.vocab_size)
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-3


def test_cache_protocol(ggufs):
    ids = None
    for name, opts in (("f32", {"kv_type": "f32", "flash_attn": False}), ("q4_k_m", {})):
        # q4_k_m: multi-token decode of a quantized model (the path that crashes with AMX repacking)
        rt = LlamaCppRuntime(ggufs[name], **opts)
        assert rt.settings["use_extra_bufts"] is repack_setting(None)[0] and rt.context_length == 256
        ids = rt.codec.encode_special("<s><|user|>What does a cow say?<|end|>\n<|assistant|>")
        whole = rt.forward(ids, all_logits=True)
        rt.reset()
        rt.forward(ids[:5])
        assert rt.n_past == 5
        last = rt.forward(ids[5:])
        assert rt.n_past == len(ids) and last.argmax() == whole[-1].argmax()
        # exact in float32; quantized matmuls round batches differently (measured 0.4% of the range)
        tol = 1e-4 if name == "f32" else 2e-2
        assert np.abs(last - whole[-1]).max() / np.abs(whole[-1]).max() < tol
        rt.reset()
        assert rt.n_past == 0
    with pytest.raises(ValueError, match="exceeds the context"):
        rt.forward([1] * 300)


def _heldout_chunks(run: Path, n_ctx: int = 128, n: int = 8) -> list[list[int]]:
    meta = json.loads((run / "config.json").read_text())["kititans"]
    val = np.asarray(TokenData(meta["data"]).splits["val"]).tolist()
    return make_chunks(val, n_ctx, 1, max_chunks=n)


def _logprobs(rt, chunks) -> np.ndarray:
    out = []
    for c in chunks:
        rt.reset()
        out.append(log_softmax(rt.forward(c, all_logits=True)[scored_slice(len(c))]))
    return np.concatenate(out)


def test_quantized_quality(chat_run, torch_rt, ggufs):
    chunks = _heldout_chunks(chat_run)
    y = np.concatenate([c[scored_slice(len(c)).start + 1 :] for c in chunks])
    base = _logprobs(torch_rt, chunks)
    q = {
        k: compare(base, _logprobs(load_runtime(ggufs[k]), chunks), y)
        for k in ("f32", "q8_0", "q4_0", "q4_k_m")
    }
    assert q["f32"].kld_mean < 1e-4 and q["f32"].same_top > 0.995
    assert q["q8_0"].same_top >= 0.98 and q["q8_0"].kld_mean < 0.002
    for k in ("q4_0", "q4_k_m"):  # 4-bit: measured KLD 0.0025-0.0031, same-top 97.4-97.8%, PPL +0.1-0.3%
        assert q[k].kld_mean < 0.02 and q[k].same_top > 0.93 and abs(q[k].ppl_drift_pct) < 4
    assert q["q8_0"].kld_mean < q["q4_k_m"].kld_mean


def test_chat_completion_stops_at_end(chat_run, torch_rt, ggufs):
    llm = open_llama(ggufs["q8_0"])
    assert llm.model_params.use_extra_bufts is repack_setting(None)[0]  # on unless the CPU has AMX
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What sound does a cow make?"},
    ]
    ours = render_prompt(torch_rt.codec, messages)
    assert chat_prompt_ids(llm, messages) == ours
    out = chat_completion(llm, messages, temperature=0, max_tokens=60)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["prompt_tokens"] == len(ours)
    reply = out["choices"][0]["message"]["content"]
    assert reply.strip() and "<|" not in reply
    # our sampler on the llama.cpp runtime stops at <|end|> too, with the same greedy reply
    rt = load_runtime(ggufs["q8_0"])
    gen = Generation(rt, ours, SamplingConfig(temperature=0, max_tokens=60), rt.codec.stop_ids)
    text = rt.codec.decode(list(gen))
    assert gen.stats.finish_reason == "stop" and text == reply
    llm.close()


def test_bare_gguf_chat_and_generate(ggufs, tmp_path, capsys, monkeypatch):
    bare = tmp_path / "model.gguf"
    bare.write_bytes(ggufs["q4_k_m"].read_bytes())  # no tokenizer.model anywhere near it
    rt = load_runtime(bare)
    assert isinstance(rt.codec, GGUFCodec) and rt.codec.stop_ids == [2, 7]
    assert (
        main(
            [
                "generate",
                str(bare),
                "--prompt",
                "What does a dog say?",
                "--chat",
                "--temperature",
                "0",
                "--max-tokens",
                "40",
            ]
        )
        == 0
    )
    reply = capsys.readouterr().out
    assert len(reply.strip()) > 3 and "<|" not in reply
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Hi!\nWhat does a cat say?\n"))
    assert main(["chat", str(bare), "--temperature", "0", "--max-tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert out.count("> ") == 2 and len(out) > 20


def test_gpu_offload_option_says_where_the_model_ran(ggufs):
    """--n-gpu-layers reaches llama.cpp, and `placement` (the bench's "ran on" column) tells the truth: on a
    build without a GPU backend (this machine's) the model ran on the CPU, and the row says why."""
    import llama_cpp

    cpu = LlamaCppRuntime(ggufs["q4_0"], threads=1, n_gpu_layers=0)
    assert cpu.settings["placement"] == "cpu" and cpu.settings["n_gpu_layers"] == 0
    rt = LlamaCppRuntime(ggufs["q4_0"], threads=1, n_gpu_layers=-1)
    n = int(rt._lib.llama_model_n_layer(rt._model)) + 1
    want = (
        f"gpu ({n}/{n} layers)"
        if llama_cpp.llama_supports_gpu_offload()
        else "cpu (this llama.cpp has no GPU backend)"
    )
    assert rt.settings["placement"] == want and rt.settings["n_gpu_layers"] == -1
    ids = [1, 5, 9, 12]
    np.testing.assert_allclose(rt.forward(ids), cpu.forward(ids), atol=1e-4)
