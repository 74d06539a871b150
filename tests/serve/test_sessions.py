"""`kititans serve --sessions DIR`: a Titans conversation's state saved per session name and API key, continued
by a later request or another server: a conversation split across two servers (each its own runtime, loaded
from disk) gives the tokens of one uninterrupted run; a prompt that does not continue the session, a bad name,
another key, a Lite model are each refused in one clear way, the file untouched. A random titans-debug model
(no training), a few tokens per turn: a few seconds."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from kititans.checkpoint import save_checkpoint
from kititans.cli import main
from kititans.generate import Generation, SamplingConfig
from kititans.runtimes import load_runtime
from kititans.runtimes.session import read_header
from kititans.serve.sessions import tenant_folder

from .conftest import client, start

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True}


@contextlib.contextmanager
def serving(path: Path, runtime: str, **cfg):
    server = start(path, runtime, **cfg)
    try:
        yield server
    finally:
        server.close()


def random_run(out: Path, tok, family: str, preset: str, **over) -> Path:
    from kititans.models import get_family

    spec = get_family(family)
    cfg = spec.make_config(preset, over)
    torch.manual_seed(0)
    return save_checkpoint(out, spec.build(cfg).eval(), spec, cfg, tok, extra={"step": 0})


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from kititans.data.builtin import generate_corpus
    from kititans.data.tokenizer import train_tokenizer

    return train_tokenizer(generate_corpus(0, 100_000), tmp_path_factory.mktemp("tok"), 512)


@pytest.fixture(scope="module")
def titans(tmp_path_factory, tokenizer) -> Path:
    return random_run(
        tmp_path_factory.mktemp("titans") / "run", tokenizer, "titans", "titans-debug", block="mac"
    )


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(5, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def complete(server, prompt: list[int], session: str | None, key: str = "alice") -> list[int]:
    """The generated token ids of a /v1/completions request with token-id prompts (greedy, 4 tokens)."""
    extra = {**GREEDY, "return_tokens_as_token_ids": True}
    if session is not None:
        extra["session"] = session
    out = client(server, key).completions.create(
        model=server.info.id, prompt=prompt, logprobs=0, extra_body=extra
    )
    return [int(t.removeprefix("token_id:")) for t in out.choices[0].logprobs.tokens]


def reference(run: Path, turns: list[list[int]]) -> list[list[int]]:
    """One uninterrupted run over the conversation: what `kititans chat` does (the runtime's cache continues
    from turn to turn); each turn's prompt is the whole conversation so far."""
    rt, history, out, prompt = load_runtime(run, "torch"), [], [], []
    for turn in turns:
        prompt = prompt + (out[-1] if out else []) + turn
        gen = Generation(rt, prompt, SamplingConfig(temperature=0.0, max_tokens=4), (), history=history)
        out.append(list(gen))
    return out


def test_a_conversation_split_across_two_servers_gives_the_tokens_of_one_run(titans, tmp_path):
    store = tmp_path / "sessions"
    t1, t2, t3 = ids(20, 1), ids(13, 2), ids(6, 3)
    with serving(titans, "torch", sessions=str(store)) as server:
        r1 = complete(server, t1, "me")
    path = store / tenant_folder("alice") / "me.state"
    assert path.is_file() and not list(store.rglob("*.tmp*"))
    with serving(titans, "torch", sessions=str(store)) as server:  # another runtime, loaded from disk
        r2 = complete(server, t1 + r1 + t2, "me")
        r3 = complete(server, t1 + r1 + t2 + r2 + t3, "me")
        fresh = complete(server, t1 + r1 + t2, None)  # no session: the whole prompt from the empty state
        alone = complete(server, r1[-1:] + t2, None)
    want = reference(titans, [t1, t2, t3])
    assert [r1, r2, r3] == want
    assert fresh == want[1]
    assert (
        alone != r2
    )  # the saved state mattered: the new part alone, from the empty state, answers otherwise
    # the state holds the prompt and the reply tokens fed back (the last sampled token is fed next turn)
    assert read_header(path)["tokens"] == len(t1 + r1 + t2 + r2 + t3 + r3) - 1


def test_refusals_leave_the_session_untouched_and_keys_are_apart(titans, tmp_path):
    """(b) a prompt that does not continue the session: 409, the file unchanged; (c) another key's session
    of the same name is invisible (a new session); (d) a bad name: 400; a session without --sessions: 400;
    n > 1 with a session: 400."""
    store = tmp_path / "sessions"
    t1 = ids(12, 4)
    with serving(titans, "torch", sessions=str(store)) as server:
        r1 = complete(server, t1, "me")
        path = store / tenant_folder("alice") / "me.state"
        before = path.read_bytes()
        with pytest.raises(openai.ConflictError) as e:  # (b) the reply left out
            complete(server, t1 + ids(5, 5), "me")
        err = e.value.body
        assert err["code"] == "session_mismatch" and err["param"] == "session"
        assert "does not continue session 'me'" in err["message"] and "differs from them at token 12" in err[
            "message"]  # fmt: skip
        assert str(tmp_path) not in err["message"]
        with pytest.raises(openai.ConflictError, match="adds nothing"):
            complete(server, t1 + r1[:-1], "me")
        assert path.read_bytes() == before
        # (c) bob's "me" is a new session: his answer is the empty state's, and alice's file stays hers
        assert complete(server, t1 + r1 + ids(3, 6), "me", key="bob") == complete(
            server, t1 + r1 + ids(3, 6), None
        )
        assert path.read_bytes() == before
        assert (store / tenant_folder("bob") / "me.state").is_file() and tenant_folder("bob") != tenant_folder(
            "alice")  # fmt: skip
        # (d) names that could leave the tenant's folder
        for bad in ("../me", "a/b", ".hidden", "", "x" * 200):
            with pytest.raises(openai.BadRequestError) as e:
                complete(server, t1, bad)
            assert e.value.body["code"] == "invalid_session_name" and e.value.body["param"] == "session"
        r = httpx.post(server.url + "/v1/completions", json={"prompt": t1, "session": "me", "n": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = httpx.post(server.url + "/v1/completions", json={"prompt": t1, "session": 7})
        assert r.status_code == 400 and "must be a string" in r.json()["error"]["message"]
        assert sorted(p.name for p in store.rglob("*") if p.is_file()) == ["me.state", "me.state"]
    with serving(titans, "torch") as server:  # no --sessions
        r = httpx.post(server.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "session": "me"})  # fmt: skip
        assert r.status_code == 400 and "--sessions" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "sessions_off"


def test_chat_with_a_session_continues_the_conversation(titans, tmp_path):
    """The chat endpoint: turn 2 sends the whole conversation back (the reply as it was given); the session
    feeds only what is new and answers what the uninterrupted conversation answers."""
    store, c = tmp_path / "sessions", None
    msgs = [{"role": "user", "content": "Once upon a time"}]
    with serving(titans, "torch", sessions=str(store)) as server:
        c = client(server, "alice")
        first = c.chat.completions.create(
            model=server.info.id, messages=msgs, extra_body={**GREEDY, "session": "s"}
        )
        msgs += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "and then"}]  # fmt: skip
        try:
            second = c.chat.completions.create(
                model=server.info.id, messages=msgs, extra_body={**GREEDY, "session": "s"}
            )
        except openai.ConflictError as e:  # the reply's text did not tokenize back to its tokens
            assert e.value.body["code"] == "session_mismatch"
            pytest.skip("this random model's reply does not tokenize back to its own tokens")
        plain = c.chat.completions.create(model=server.info.id, messages=msgs, extra_body=GREEDY)
    assert second.choices[0].message.content == plain.choices[0].message.content
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_a_lite_model_with_sessions_is_refused_in_one_line(tokenizer, tmp_path, capsys):
    lite = random_run(tmp_path / "lite", tokenizer, "lite", "debug")
    assert main(["serve", str(lite), "--port", "0", "--sessions", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --sessions needs a Titans model") and len(err[-1]) < 300


def test_one_request_at_a_time_per_session_and_a_cut_stream_saves_nothing(titans, tmp_path):
    """While a session answers (a stream, slowed to 50 ms a token), a second request on it gets 409
    session_busy and another session name is served; the client closing the stream mid-reply saves nothing
    (the file stays the previous turn's) and frees the session."""
    store = tmp_path / "sessions"
    t1 = ids(10, 7)
    with serving(titans, "torch", sessions=str(store)) as server:
        r1 = complete(server, t1, "me")
        path = store / tenant_folder("alice") / "me.state"
        before = path.read_bytes()
        step = server.engine.seqs.step
        server.engine.seqs.step = lambda tokens: (time.sleep(0.05), step(tokens))[1]
        body = {"prompt": t1 + r1 + ids(4, 8), "session": "me", "stream": True, **GREEDY, "max_tokens": 100}
        headers = {"Authorization": "Bearer alice"}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers) as stream:
            lines = stream.iter_lines()  # kept: dropping the iterator would close the connection
            assert next(lines).startswith("data: ")  # the reply is under way
            with pytest.raises(openai.ConflictError) as e:
                complete(server, t1 + r1 + ids(4, 8), "me")
            assert e.value.body["code"] == "session_busy"
            assert len(complete(server, t1, "other")) == 4
        deadline = time.monotonic() + 10
        while True:  # the engine notices the closed stream at its next turn and lets the session go
            try:
                complete(server, t1 + r1 + ids(2, 9), "me")
                break
            except openai.ConflictError as e:
                assert e.body["code"] == "session_busy" and time.monotonic() < deadline
                time.sleep(0.1)
        assert path.read_bytes() != before  # that request finished: it saved
    # the cut stream saved nothing: had it, the request above would have been refused as not continuing it


@pytest.mark.slow
def test_onnx_sessions_split_across_two_servers(titans, tmp_path):
    """The same conversation through an fp32 ONNX export (its recurrent step graphs): a session saved by one
    server continues in another and gives the torch run's tokens. Slow: the export takes about a minute here."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from kititans.export import ExportOptions, export_model

    onnx = export_model(titans, "onnx", "fp32", tmp_path / "onnx", ExportOptions(progress=False)).path
    store, (t1, t2) = tmp_path / "sessions", (ids(20, 1), ids(13, 2))
    with serving(onnx, "onnx", sessions=str(store)) as server:
        r1 = complete(server, t1, "me")
    with serving(onnx, "onnx", sessions=str(store)) as server:
        r2 = complete(server, t1 + r1 + t2, "me")
    assert [r1, r2] == reference(titans, [t1, t2])
