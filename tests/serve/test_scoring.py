"""Scoring through `kititans serve`: echo + logprobs return each prompt token's log-probability, exactly the
in-process numbers (torch fp32), in the shape lm-eval's `local-completions` sends and reads (token-id
prompts, a batch of prompts matched by index, `token_logprobs[ctxlen:-1]`, `max(top.values())`), and lm-eval
itself scores through the server with its remote tokenizer; chat and completion logprobs shapes. ~10 s."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

from kititans.generate import Generation, SamplingConfig, stream_text
from kititans.runtimes import load_runtime
from kititans.serve.sequence import log_softmax
from tests.serve.conftest import client, start

openai = pytest.importorskip("openai", reason="the serve tests talk to the server with the openai client")


@pytest.fixture(scope="module")
def served(debug_run):
    s = start(debug_run)
    yield s, load_runtime(debug_run)
    s.close()


def in_process(rt, ids: list[int]) -> np.ndarray:
    """log p(ids[j] | ids[:j]) for j >= 1, and the greedy next token's log-prob at the end."""
    rt.reset()
    logp = log_softmax(rt.forward(ids, all_logits=True))  # (T, V)
    return np.array([logp[j - 1, ids[j]] for j in range(1, len(ids))] + [logp[-1].max()])


def post(server, path: str, body: dict) -> dict:
    req = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_lm_eval_request_shape_scores_exactly_in_process(served):
    server, rt = served
    codec = rt.codec
    rows = [
        [codec.bos_id, *codec.encode(t)] for t in ("Tom had a red ball.", "Lily saw a big dog in the park.")
    ]
    # the body lm-eval's local-completions sends for a batch of loglikelihood requests (batch_size > 1)
    body = {"model": server.info.id, "prompt": rows, "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}  # fmt: skip
    out = post(server, "/v1/completions", body)
    choices = sorted(out["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    for ids, choice in zip(rows, choices):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1  # every prompt token + the generated one
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        want = in_process(rt, ids)
        assert np.array_equal(np.array(lp["token_logprobs"][1:]), want)  # bit for bit: the same forward
        ctxlen = 3  # what lm-eval does with them: continuation = tokens[ctxlen:]
        score = sum(lp["token_logprobs"][ctxlen:-1])
        assert score == pytest.approx(float(want[ctxlen - 1 : -1].sum()), abs=1e-9)
        greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                             lp["top_logprobs"][ctxlen:-1]))  # fmt: skip
        rt.reset()
        logits = rt.forward(ids, all_logits=True)
        assert greedy == all(int(np.argmax(logits[j - 1])) == ids[j] for j in range(ctxlen, len(ids)))
        assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])  # logprobs=1: the best + the chosen
    # a string prompt goes in after BOS: the BOS entry is left out, every text token has a log-prob
    text = "Tom had a red ball."
    one = post(server, "/v1/completions", {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0})
    lp = one["choices"][0]["logprobs"]
    assert one["choices"][0]["text"] == text and None not in lp["token_logprobs"]
    assert np.array_equal(np.array(lp["token_logprobs"]), in_process(rt, rows[0])[:-1])
    assert "".join(lp["tokens"]) == text and lp["text_offset"] == sorted(lp["text_offset"])
    assert [text[o:].startswith(t) for o, t in zip(lp["text_offset"], lp["tokens"])] == [True] * len(
        lp["tokens"]
    )


def test_lm_eval_scores_through_the_server(served):
    """lm-eval's own `local-completions` backend (its remote tokenizer: the server's /tokenize), batch size 2:
    the log-likelihoods equal the in-process ones."""
    pytest.importorskip("lm_eval", reason="needs lm-evaluation-harness (pip install 'lm-eval[api]')")
    for pkg in ("aiohttp", "tenacity", "requests"):
        pytest.importorskip(pkg, reason=f"lm-eval's API models need {pkg} (pip install 'lm-eval[api]')")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    server, rt = served
    greedy = SamplingConfig(temperature=0, max_tokens=12)
    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model=server.info.id,
                             tokenizer_backend="remote", batch_size=2, max_length=256, max_retries=1)  # fmt: skip
    pairs = [
        ("Tom had a red ball.", " He liked it."),
        ("The dog", " ran to the park."),
        ("Lily", " was happy."),
    ]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(reqs)
    for (ctx, cont), (score, _) in zip(pairs, got):
        c, w = rt.codec.encode_special(ctx), rt.codec.encode_special(ctx + cont)
        ids, ctxlen = w, len(c)
        want = in_process(rt, ids)[ctxlen - 1 : -1].sum()
        assert score == pytest.approx(float(want), abs=1e-6), (ctx, cont)
    # generate_until: token-id prompts, its `until` list as stop strings, answers by index
    gen = [Instance("generate_until", {}, (ctx, {"until": ["\n", ".", "!", "?", "zz"], "max_gen_toks": 12}), i)
           for i, (ctx, _) in enumerate(pairs)]  # fmt: skip
    for (ctx, _), text in zip(pairs, lm.generate_until(gen)):
        want = "".join(
            stream_text(Generation(rt, rt.codec.encode_special(ctx), greedy, rt.codec.stop_ids), rt.codec)
        )
        cut = min([want.index(s) for s in ("\n", ".", "!", "?", "zz") if s in want] + [len(want)])
        assert text == want[:cut], ctx


def test_echo_reports_a_generated_end_of_turn_token(served, monkeypatch):
    """Scoring with echo + logprobs always gets prompt + max_tokens rows, even when the token generated is an
    end-of-turn id (lm-eval drops the last row: `token_logprobs[ctxlen:-1]`)."""
    server, rt = served
    ids = [rt.codec.bos_id, *rt.codec.encode("Tom had a red ball.")]
    want = in_process(rt, ids)
    rt.reset()
    greedy = int(np.argmax(rt.forward(ids)))
    monkeypatch.setattr(type(server.engine.codec), "stop_ids", property(lambda self: [greedy]))
    body = {"prompt": ids, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    choice = post(server, "/v1/completions", body)["choices"][0]
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "stop" and len(lp["token_logprobs"]) == len(ids) + 1
    assert np.array_equal(np.array(lp["token_logprobs"][1:]), want)


def test_return_tokens_as_token_ids(served):
    """vLLM's `return_tokens_as_token_ids`: every token of the log-probs is named "token_id:N", so top-k entries
    map back to ids even where several ids decode to the same text (what `kititans distill score` sends)."""
    server, rt = served
    ids = [rt.codec.bos_id, *rt.codec.encode("Tom had a red ball. \u3042")]  # a character as byte pieces
    body = {"prompt": ids, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 5,
            "return_tokens_as_token_ids": True}  # fmt: skip
    lp = post(server, "/v1/completions", body)["choices"][0]["logprobs"]
    assert lp["tokens"][: len(ids)] == [f"token_id:{i}" for i in ids]
    rt.reset()
    logp = log_softmax(rt.forward(ids, all_logits=True))
    for j in range(1, len(ids)):
        top = {int(k.removeprefix("token_id:")): v for k, v in lp["top_logprobs"][j].items()}
        best = np.argsort(-logp[j - 1], kind="stable")[:5]
        assert set(best.tolist()) <= set(top) and ids[j] in top
        assert all(top[int(i)] == logp[j - 1, i] for i in best)
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                                 "temperature": 0, "logprobs": True, "top_logprobs": 2,
                                                 "return_tokens_as_token_ids": True})  # fmt: skip
    for e in chat["choices"][0]["logprobs"]["content"]:
        assert e["token"].startswith("token_id:") and all(
            t["token"].startswith("token_id:") for t in e["top_logprobs"]
        )


def test_chat_and_completion_logprobs_shapes(served):
    server, _ = served
    c = client(server)
    out = c.chat.completions.create(model=server.info.id, messages=[{"role": "user", "content": "Hi"}],
                                    max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)  # fmt: skip
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens - (out.choices[0].finish_reason == "stop")
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and entry.logprob == tops[0]  # greedy
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    text = b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace")
    assert text == out.choices[0].message.content
    streamed = list(c.chat.completions.create(model=server.info.id, messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=6, temperature=0, logprobs=True, stream=True))  # fmt: skip
    tokens = [e.token for ev in streamed if ev.choices and ev.choices[0].logprobs
              for e in ev.choices[0].logprobs.content]  # fmt: skip
    assert tokens == [e.token for e in content]
    comp = c.completions.create(model=server.info.id, prompt="Tom", max_tokens=5, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(t == max(top.values()) for t, top in zip(lp.token_logprobs, lp.top_logprobs))
    with pytest.raises(openai.BadRequestError):  # echo + logprobs is for scoring, not streaming
        list(c.completions.create(model=server.info.id, prompt="Tom", max_tokens=2, echo=True, logprobs=1,
                                  stream=True))  # fmt: skip


def test_tokenizer_endpoints(served):
    server, rt = served
    info = json.loads(urllib.request.urlopen(server.url + "/tokenizer_info", timeout=30).read())
    assert info["eos_token"] and info["model_max_length"] == 256
    toks = post(server, "/tokenize", {"prompt": "Tom had a ball.", "add_special_tokens": False})["tokens"]
    assert toks == rt.codec.encode("Tom had a ball.")
    assert post(server, "/tokenize", {"prompt": info["eos_token"]})["tokens"] == [rt.codec.stop_ids[0]]
    assert post(server, "/detokenize", {"tokens": toks})["prompt"] == "Tom had a ball."
