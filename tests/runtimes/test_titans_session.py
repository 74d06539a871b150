"""Titans sessions that outlive a process (kititans/runtimes/session.py): the fixed-size state, its tokens and
the caller's messages saved to one safetensors file and loaded later, in the torch and ONNX runtimes and in the
CoreML package's state layout; a conversation split across two processes gives the tokens of one; a file
from another model, of a newer format or of another state layout is refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from kititans.checkpoint import load_checkpoint, save_checkpoint
from kititans.errors import KititansError
from kititans.models import get_family
from kititans.models.titans.coreml_step import TitansCoreMLStep
from kititans.models.titans.state import pick_kind
from kititans.runtimes import load_runtime
from kititans.runtimes.coreml import canonical_from_coreml, coreml_from_canonical
from kititans.runtimes.session import META_KEY, load_session, read_header, save_session

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_torch_session_continues_exactly(titans_run_mac, tmp_path):
    """Prompt (past a mac segment and inside a memory chunk), save, load into a new runtime: the next tokens'
    logits equal the uninterrupted runtime's; the file holds the tokens and the caller's extra."""
    first, more = ids(45, 1), ids(21, 2)
    a = load_runtime(titans_run_mac, "torch")
    a.forward(first)
    header = save_session(a, tmp_path / "s.state", first, {"messages": [{"role": "user", "content": "hi"}]})
    want = a.forward(more, all_logits=True)
    b = load_runtime(titans_run_mac, "torch")
    session = load_session(b, tmp_path / "s.state")
    assert session.tokens == first and session.extra["messages"][0]["content"] == "hi"
    assert b.n_past == 45 and header["tokens"] == 45 and header["family"] == "titans"
    np.testing.assert_array_equal(b.forward(more, all_logits=True), want)
    fresh = load_runtime(titans_run_mac, "torch")  # the state matters: without it the logits differ
    assert np.abs(fresh.forward(more, all_logits=True) - want).max() > 1e-2


def test_a_session_of_another_model_version_or_kind_is_refused_in_one_line(
    titans_run_mac, titans_tokenizer, make_titans_run, tmp_path
):
    a = load_runtime(titans_run_mac, "torch")
    a.forward(ids(10, 3))
    path = tmp_path / "s.state"
    save_session(a, path, ids(10, 3))
    other = load_runtime(make_titans_run(tmp_path / "other", titans_tokenizer, seed=1, block="mac"), "torch")
    with pytest.raises(KititansError, match="belongs to another model") as e:
        load_session(other, path)
    assert "\n" not in str(e.value)
    assert other.n_past == 0  # refused before the state was touched
    reshaped = load_runtime(make_titans_run(tmp_path / "mal", titans_tokenizer, block="mal"), "torch")
    reshaped._weights_sha256 = a.session_identity()["weights_sha256"]  # same hash, another layout
    with pytest.raises(KititansError, match="state layout differs"):
        load_session(reshaped, path)
    tensors = load_file(str(path))
    header = read_header(path)
    save_file(tensors, str(tmp_path / "new.state"), {META_KEY: json.dumps({**header, "version": 99})})
    with pytest.raises(KititansError, match="newer than this kititans reads"):
        load_session(a, tmp_path / "new.state")
    (tmp_path / "junk.state").write_bytes(b"not a session")
    with pytest.raises(KititansError, match="not a kititans session file"):
        load_session(a, tmp_path / "junk.state")
    with pytest.raises(KititansError, match="no session file"):
        load_session(a, tmp_path / "missing.state")


def test_a_kv_cache_model_says_sessions_need_titans(titans_tokenizer, tmp_path):
    lite = get_family("lite")
    cfg = lite.make_config("debug", {"vocab_size": 512})
    rt = load_runtime(
        save_checkpoint(tmp_path / "lite", lite.build(cfg), lite, cfg, titans_tokenizer), "torch"
    )
    with pytest.raises(KititansError, match="KV cache that grows"):
        save_session(rt, tmp_path / "s.state", [])
    assert not (tmp_path / "s.state").exists()


def test_onnx_session_round_trip_and_across_runtimes(titans_run_mac, titans_onnx_mac, tmp_path):
    """ONNX saves and loads its own sessions, and loads the torch runtime's (the same run's weights)."""
    first, more = ids(37, 4), ids(19, 5)
    o = load_runtime(titans_onnx_mac, "onnx", threads=1)
    o.forward(first)
    save_session(o, tmp_path / "o.state", first)
    want = o.forward(more, all_logits=True)
    o2 = load_runtime(titans_onnx_mac, "onnx", threads=1)
    load_session(o2, tmp_path / "o.state")
    np.testing.assert_allclose(o2.forward(more, all_logits=True), want, atol=1e-5)
    t = load_runtime(titans_run_mac, "torch")
    t.forward(first)
    save_session(t, tmp_path / "t.state", first)
    o3 = load_runtime(titans_onnx_mac, "onnx", threads=1)
    load_session(o3, tmp_path / "t.state")
    np.testing.assert_allclose(o3.forward(more, all_logits=True), t.forward(more, all_logits=True), atol=1e-4)


def test_the_coreml_state_layout_maps_both_ways(titans_run_mac):
    """The package's states (the torch wrapper holds them exactly: fp32 buffers here) <-> the session layout:
    after the same tokens they read back as the torch runtime's state, and a torch session written into them
    continues as torch does."""
    ckpt = load_checkpoint(titans_run_mac)
    step = TitansCoreMLStep(ckpt.model).to(torch.float32)
    info = json.loads(json.dumps(step.session_layout()))  # as the manifest holds it
    base = {n: t.numpy() for n, t in step.memory_base().items()}
    tokens = ids(41, 6)  # past a segment, inside a chunk
    t = load_runtime(titans_run_mac, "torch")
    t.forward(tokens)
    with torch.no_grad():
        at = 0
        for n in [8] * 5 + [1]:  # the runtime's calls: chunk prefills, then a token
            fn = step.function(pick_kind(ckpt.model.kinds(), at, n).name)
            fn(torch.tensor([tokens[at : at + n]], dtype=torch.int32), torch.tensor([at], dtype=torch.int32))
            at += n
    read = {s: getattr(step, s).numpy() for s in info["states"].values()}
    got, want = canonical_from_coreml(read, 41, info, base), t.get_state()
    assert got.keys() == want.keys()
    for name in want:
        assert np.abs(got[name] - want[name]).max() < 1e-4, name
    stored = coreml_from_canonical(want, info, base, np.float32)
    for state, value in stored.items():
        getattr(step, state).copy_(torch.from_numpy(value))
    more = ids(7, 7)
    with torch.no_grad():
        out = [step(torch.tensor([[tok]], dtype=torch.int32), torch.tensor([41 + i], dtype=torch.int32))[0, -1]
               for i, tok in enumerate(more)]  # fmt: skip
    np.testing.assert_allclose(torch.stack(out).numpy(), t.forward(more, all_logits=True), atol=1e-4)


SCRIPT = textwrap.dedent(
    """
    import json, sys
    from kititans.generate import Generation, SamplingConfig
    from kititans.runtimes import load_runtime
    from kititans.runtimes.session import load_session, save_session
    model, runtime, session, turns = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    rt = load_runtime(model, runtime, threads=1)
    hist = load_session(rt, session).tokens if session != "-" and turns[0] == "load" else []
    prompt, out = list(hist), []
    for turn in turns[1:]:
        prompt += turn
        gen = Generation(rt, prompt, SamplingConfig(temperature=0.0, max_tokens=6), history=hist)
        out.append(list(gen))
        assert gen.stats.prompt_tokens == len(turn), "the state was not continued"
        prompt = list(hist)
    if session != "-":
        save_session(rt, session, hist)
    print(json.dumps(out))
    """
)


def converse(model: Path, runtime: str, session: str, turns: list) -> list[list[int]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", SCRIPT, str(model), runtime, session, json.dumps(turns)]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_a_conversation_split_across_two_processes_gives_the_tokens_of_one(
    titans_run_mac, titans_onnx_mac, runtime, tmp_path
):
    model = titans_run_mac if runtime == "torch" else titans_onnx_mac
    one, two, three = ids(30, 8), ids(5, 9), ids(9, 10)
    whole = converse(model, runtime, "-", ["new", one, two, three])
    path = str(tmp_path / "me.state")
    part = converse(model, runtime, path, ["new", one])
    part += converse(model, runtime, path, ["load", two, three])
    assert part == whole and len(whole) == 3 and all(len(t) == 6 for t in whole)


def test_chat_session_continues_in_a_new_process(titans_run_mac, tmp_path):
    """`kititans chat RUN --session FILE`: two invocations, one turn each, reply as one with both turns; a
    session of another model is refused in one line, exit 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def chat(text: str, *extra: str) -> subprocess.CompletedProcess:
        args = [
            sys.executable,
            "-m",
            "kititans",
            "chat",
            str(titans_run_mac),
            "--temperature",
            "0",
            "--max-tokens",
            "8",
        ]
        return subprocess.run(
            [*args, *extra], input=text, capture_output=True, text=True, env=env, timeout=300
        )

    whole = chat("Hello there\nTell me more\n")
    path = tmp_path / "me.state"
    a, b = chat("Hello there\n", "--session", str(path)), chat("Tell me more\n", "--session", str(path))
    assert whole.returncode == a.returncode == b.returncode == 0, b.stderr[-1000:]
    assert a.stdout + b.stdout == whole.stdout and whole.stdout.count("> ") == 2
    assert "2 messages" in b.stderr and path.is_file()
    bad = chat("Hi\n", "--session", str(REPO / "pyproject.toml"))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "not a kititans session file" in bad.stderr


def test_a_server_session_name_maps_to_one_file_in_its_store(tmp_path):
    from kititans.runtimes.session import session_path

    assert session_path(tmp_path, "alice-2.chat") == tmp_path / "alice-2.chat.state"
    for bad in ("../etc/passwd", ".hidden", "a/b", "", "x" * 129, "-rf", "a..b", 7):
        with pytest.raises(KititansError, match="bad session name"):
            session_path(tmp_path, bad)
